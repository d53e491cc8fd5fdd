"""SuffixDecoding: draft trees from the session's history and the tenant's earlier responses.

Two suffix indexes are consulted each step: the session's own (its prompt and the
response so far, extended incrementally across the calls of one agent run) and
a scope-wide one holding the tenant's earlier responses. For each, the longest
suffix match of the context is found, the continuations of its most recent
occurrences are counted into a frequency tree, and a draft tree is grown best
first by estimated path probability, limited to ``factor * match_len + offset``
levels and to nodes whose probability is at least ``min_prob``. The index whose
tree promises more accepted tokens wins. The index and the tree growth are
compiled (``_core.cpp``); this module keeps the sessions and scopes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from quickdraft.suffix_cache import _core
from quickdraft.suffix_cache.base import Drafter, PositionStats, Scope, SessionKey
from quickdraft.suffix_cache.draft import DraftTree


@dataclass(slots=True)
class SuffixParams:
    """Defaults chosen on a third of the dev traces and checked on the other two thirds
    (bench/RESULTS.md); ``merge=False, length_decay=0, min_prob=0.05, max_occurrences=32``
    is SuffixDecoding's own rule."""

    max_depth: int = 16          # hard cap on draft depth
    factor: float = 2.0          # depth <= factor * match_len + offset
    offset: float = 1.0
    min_prob: float = 0.02       # prune nodes whose estimated path probability is lower
    max_occurrences: int = 16    # most recent occurrences per n-gram order used for frequencies
    merge: bool = True           # one tree over session and shared occurrences (not the better of two)
    length_decay: float = 0.5    # weight of an occurrence: length_decay ** (longest match - its match)
    recency_decay: float = 1.0   # ... times recency_decay ** (its rank by recency)
    shared_weight: float = 0.5   # ... times this for occurrences in the tenant's earlier responses
    global_max_tokens: int = 4_000_000  # response tokens kept per scope before eviction

    def core(self) -> _core.DraftParams:
        p = _core.DraftParams()
        for name in ("max_depth", "factor", "offset", "min_prob", "max_occurrences", "merge", "length_decay",
                     "recency_decay", "shared_weight"):
            setattr(p, name, getattr(self, name))
        return p


@dataclass(slots=True)
class _Session:
    index: _core.TokenIndex = field(default_factory=_core.TokenIndex)
    response_start: int = 0


class SuffixDrafter(Drafter):
    name = "suffix"

    def __init__(self, params: SuffixParams | None = None) -> None:
        self.params = params or SuffixParams()
        self._core_params = self.params.core()
        self._sessions: dict[SessionKey, _Session] = {}
        self._responses: dict[Scope, _core.TokenIndex] = {}

    # -- state -------------------------------------------------------------
    def responses(self, scope: Scope) -> _core.TokenIndex:
        index = self._responses.get(scope)
        if index is None:
            index = self._responses[scope] = _core.TokenIndex()
        return index

    def session_tokens(self, key: SessionKey) -> list[int]:
        session = self._sessions.get(key)
        return session.index.tokens if session else []

    def begin_call(self, key: SessionKey, prompt: Sequence[int]) -> None:
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session()
        # The session's arena holds exactly its history: one sequence, no boundaries.
        session.index.rebase(prompt if isinstance(prompt, list) else list(prompt))
        session.response_start = len(prompt)

    def accept(
        self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None
    ) -> None:
        self._sessions[key].index.extend(list(tokens))

    def end_call(self, key: SessionKey) -> None:
        session = self._sessions.get(key)
        if session is None:
            return
        response = session.index.since(session.response_start)
        if response:
            self.learn_response(key.scope, response)

    def learn_response(self, scope: Scope, response: Sequence[int]) -> None:
        index = self.responses(scope)
        index.start_sequence()
        index.extend(list(response))
        overflow = index.live_tokens - self.params.global_max_tokens
        if overflow > 0:
            index.evict_before(index.floor + overflow)

    def drop_session(self, key: SessionKey) -> None:
        self._sessions.pop(key, None)

    # -- drafting ----------------------------------------------------------
    def propose(self, key: SessionKey, budget: int) -> DraftTree:
        session = self._sessions.get(key)
        if session is None or budget <= 0:
            return DraftTree()
        tokens, parents, probs, match_len = _core.propose(
            session.index, self._responses.get(key.scope), budget, self._core_params
        )
        return DraftTree(tokens, parents, probs, match_len)
