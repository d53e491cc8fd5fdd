"""SuffixDecoding: draft trees from the session's history and the tenant's earlier responses.

Two suffix indexes are consulted each step: the session's own (its prompt and the
response so far, extended incrementally across the calls of one agent run) and
a scope-wide one holding the tenant's earlier responses. For each, the longest
suffix match of the context is found, the continuations of its most recent
occurrences are counted into a frequency tree, and a draft tree is grown best
first by estimated path probability, limited to ``factor * match_len + offset``
levels and to nodes whose probability is at least ``min_prob``. The index whose
tree promises more accepted tokens wins.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from quickdraft.suffix_cache.base import Drafter, PositionStats, Scope, SessionKey, common_prefix_len
from quickdraft.suffix_cache.draft import DraftTree
from quickdraft.suffix_cache.token_index import MAX_MATCH, Occurrence, TokenIndex


@dataclass(slots=True)
class SuffixParams:
    max_depth: int = 16          # hard cap on draft depth
    factor: float = 2.0          # depth <= factor * match_len + offset
    offset: float = 1.0
    min_prob: float = 0.05       # prune nodes whose estimated path probability is lower
    max_occurrences: int = 32    # occurrences of the match used to estimate frequencies
    global_max_tokens: int = 4_000_000  # response tokens kept per scope before eviction


@dataclass(slots=True)
class _Session:
    index: TokenIndex = field(default_factory=TokenIndex)
    response_start: int = 0


@dataclass(slots=True)
class _Node:
    count: int = 0
    children: dict[int, _Node] = field(default_factory=dict)


def grow_tree(
    index: TokenIndex,
    occurrences: Sequence[Occurrence],
    max_depth: int,
    budget: int,
    min_prob: float,
) -> DraftTree:
    """Frequency tree of the occurrences' continuations, expanded best first."""
    root = _Node()
    for occ in occurrences:
        node = root
        for tok in index.continuation(occ.end, max_depth):
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = _Node()
            child.count += 1
            node = child
    tree = DraftTree()
    # Heap of (-path probability, tiebreak, token, parent index, node).
    heap: list[tuple[float, int, int, int, _Node]] = []
    serial = 0

    def push_children(node: _Node, parent: int, parent_prob: float) -> None:
        nonlocal serial
        total = sum(c.count for c in node.children.values())
        for tok, child in node.children.items():
            prob = parent_prob * child.count / total
            if prob >= min_prob:
                heapq.heappush(heap, (-prob, serial, tok, parent, child))
                serial += 1

    push_children(root, -1, 1.0)
    while heap and len(tree) < budget:
        neg_prob, _, tok, parent, node = heapq.heappop(heap)
        tree.token_ids.append(tok)
        tree.parents.append(parent)
        tree.probs.append(-neg_prob)
        push_children(node, len(tree) - 1, -neg_prob)
    return tree


class SuffixDrafter(Drafter):
    name = "suffix"

    def __init__(self, params: SuffixParams | None = None) -> None:
        self.params = params or SuffixParams()
        self._sessions: dict[SessionKey, _Session] = {}
        self._responses: dict[Scope, TokenIndex] = {}

    # -- state -------------------------------------------------------------
    def responses(self, scope: Scope) -> TokenIndex:
        index = self._responses.get(scope)
        if index is None:
            index = self._responses[scope] = TokenIndex()
        return index

    def session_tokens(self, key: SessionKey) -> list[int]:
        session = self._sessions.get(key)
        return session.index.tokens if session else []

    def begin_call(self, key: SessionKey, prompt: Sequence[int]) -> None:
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session()
            session.index.start_sequence()
        index = session.index
        # The session's arena holds exactly its history (no boundaries after the start).
        keep = common_prefix_len(index.tokens, prompt)
        if keep < len(index.tokens):
            index.truncate(keep)
        index.extend(prompt[keep:])
        session.response_start = len(index.tokens)

    def accept(
        self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None
    ) -> None:
        self._sessions[key].index.extend(tokens)

    def end_call(self, key: SessionKey) -> None:
        session = self._sessions.get(key)
        if session is None:
            return
        response = session.index.tokens[session.response_start :]
        if response:
            self.learn_response(key.scope, response)

    def learn_response(self, scope: Scope, response: Sequence[int]) -> None:
        index = self.responses(scope)
        index.start_sequence()
        index.extend(response)
        overflow = len(index) - index.floor - self.params.global_max_tokens
        if overflow > 0:
            index.evict_before(index.floor + overflow)

    def drop_session(self, key: SessionKey) -> None:
        self._sessions.pop(key, None)

    # -- drafting ----------------------------------------------------------
    def _tree_from(self, index: TokenIndex, context: Sequence[int], budget: int, exclude: int) -> DraftTree:
        p = self.params
        occs = index.occurrences(context, p.max_occurrences, exclude_end=exclude)
        if not occs:
            return DraftTree()
        match_len = max(o.match_len for o in occs)
        # The deepest matched node of a suffix tree holds only the longest matches.
        occs = [o for o in occs if o.match_len == match_len]
        depth = min(p.max_depth, math.floor(p.factor * match_len + p.offset))
        tree = grow_tree(index, occs, depth, budget, p.min_prob)
        tree.match_len = match_len
        return tree

    def propose(self, key: SessionKey, budget: int) -> DraftTree:
        session = self._sessions.get(key)
        if session is None or budget <= 0 or not session.index.tokens:
            return DraftTree()
        own = session.index
        context = own.tokens[-MAX_MATCH:]
        best = self._tree_from(own, context, budget, exclude=len(own.tokens) - 1)
        shared = self._responses.get(key.scope)
        if shared is not None and len(shared):
            other = self._tree_from(shared, context, budget, exclude=-1)
            if other.expected_accepted() > best.expected_accepted():
                best = other
        return best
