"""ADED: an adaptive tri-gram matrix with exploration-aware draft construction.

A table per scope (tenant, tokenizer) approximates the target's next-token
distribution from the two preceding tokens (with bigram and unigram fallbacks).
It adapts as decoding goes on: every prompt token and every accepted token is
counted, and older counts fade (``forget`` per observation of a context), so
the matrix tracks the current task rather than the whole history. Drafts are
trees grown best first; each candidate's weight is its count times its
measured acceptance rate plus an exploration bonus (UCB) for candidates rarely
tried, so the drafter keeps testing alternatives while exploiting what works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from quickdraft.suffix_cache.base import Drafter, PositionStats, Scope, SessionKey
from quickdraft.suffix_cache.draft import DraftTree
from quickdraft.suffix_cache.ngram_session import NgramState


@dataclass(slots=True)
class AdedParams:
    max_order: int = 2          # context tokens: a tri-gram matrix
    width: int = 8
    max_entries: int = 2_000_000
    forget: float = 0.98        # fade of a context's old counts per new observation
    explore: float = 0.3        # UCB exploration weight
    max_depth: int = 12
    min_prob: float = 0.02
    branch: int = 3


@dataclass(slots=True)
class _LastDraft:
    tree: DraftTree = field(default_factory=DraftTree)
    context: list[int] = field(default_factory=list)


class AdedDrafter(Drafter):
    name = "aded"

    def __init__(self, params: AdedParams | None = None) -> None:
        self.params = params or AdedParams()
        self.state = NgramState(self.params.max_order, self.params.width, self.params.max_entries)
        self._last: dict[SessionKey, _LastDraft] = {}

    def begin_call(self, key: SessionKey, prompt: Sequence[int]) -> None:
        self.flush(key)
        _, new = self.state.begin(key, prompt)
        if new:
            before = list(prompt[max(0, len(prompt) - len(new) - self.params.max_order): len(prompt) - len(new)])
            self.state.learn(key, before, new, None, self.params.forget)

    def propose(self, key: SessionKey, budget: int, min_chance: float = 0.0) -> DraftTree:
        session = self.state.sessions.get(key)
        table = self.state.tables.get(key.scope)
        if session is None or table is None or budget <= 0:
            return DraftTree()
        p = self.params
        tokens, parents, probs = table.draft_aded(session.tail, budget, p.max_depth, p.min_prob, p.branch, p.explore)
        tree = DraftTree(tokens, parents, probs)
        self._last[key] = _LastDraft(tree, session.tail[-p.max_order:])
        return tree

    def _feedback(self, key: SessionKey, tokens: Sequence[int]) -> None:
        """Credit each tried child on the accepted path's frontier: accepted or not."""
        last = self._last.pop(key, None)
        if last is None or not last.tree.token_ids:
            return
        table = self.state.table(key.scope)
        tree = last.tree
        accepted = tree.longest_accepted(tokens)
        on_path = {-1, *accepted}
        contexts = {-1: last.context}
        for i, parent in enumerate(tree.parents):
            if parent in on_path:
                ctx = contexts[parent]
                table.feedback(ctx, tree.token_ids[i], i in on_path)
                contexts[i] = (ctx + [tree.token_ids[i]])[-self.params.max_order:]

    def accept(self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None) -> None:
        self.flush(key)
        session = self.state.sessions[key]
        self._feedback(key, tokens)
        self.state.learn(key, session.tail, tokens, None, self.params.forget)
        self.state.advance(session, tokens)

    def follow(self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None) -> None:
        # The adaptation on the last draft's outcome is cheap and needs that draft: now; the counts can wait.
        self._feedback(key, tokens)
        self.state.follow(key, tokens, None)

    def flush(self, key: SessionKey) -> None:
        self.state.flush(key, self.params.forget)

    def end_call(self, key: SessionKey) -> None:
        self._last.pop(key, None)
        self.flush(key)

    def drop_session(self, key: SessionKey) -> None:
        self.flush(key)
        self.state.sessions.pop(key, None)
        self._last.pop(key, None)

    def memory_bytes(self) -> int:
        return self.state.memory_bytes()

    def learn_response(self, scope: Scope, response: Sequence[int]) -> None:
        self.state.table(scope).observe_run([], list(response), [], [], 0, self.params.forget)
