"""Prompt lookup: the simple baseline (vLLM's n-gram proposer semantics).

The longest suffix n-gram of the session history (n from ``max_n`` down to
``min_n``) that occurred earlier is located at its earliest occurrence, and the
``k`` tokens after it are the draft (a single path). No state crosses sessions.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from quickdraft.suffix_cache.base import Drafter, PositionStats, SessionKey, common_prefix_len
from quickdraft.suffix_cache.draft import DraftTree


@dataclass(slots=True)
class PldParams:
    min_n: int = 5
    max_n: int = 5
    k: int = 8


@dataclass(slots=True)
class _History:
    tokens: list[int] = field(default_factory=list)
    # n -> n-gram -> earliest start position
    first: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)


class PromptLookupDrafter(Drafter):
    name = "pld"

    def __init__(self, params: PldParams | None = None) -> None:
        self.params = params or PldParams()
        self._sessions: dict[SessionKey, _History] = {}

    def _extend(self, hist: _History, tokens: Sequence[int]) -> None:
        toks = hist.tokens
        for tok in tokens:
            toks.append(int(tok))
            end = len(toks)
            for n in range(self.params.min_n, self.params.max_n + 1):
                if end >= n:
                    hist.first.setdefault(n, {}).setdefault(tuple(toks[end - n : end]), end - n)

    def begin_call(self, key: SessionKey, prompt: Sequence[int]) -> None:
        hist = self._sessions.get(key)
        if hist is None:
            hist = self._sessions[key] = _History()
        keep = common_prefix_len(hist.tokens, prompt)
        if keep < len(hist.tokens):
            # Rare (the prompt rewrote history): rebuild from the common prefix.
            kept = hist.tokens[:keep]
            hist = self._sessions[key] = _History()
            self._extend(hist, kept)
        self._extend(hist, prompt[keep:])

    def propose(self, key: SessionKey, budget: int, min_chance: float = 0.0) -> DraftTree:
        hist = self._sessions.get(key)
        if hist is None or budget <= 0:
            return DraftTree()
        toks = hist.tokens
        k = min(self.params.k, budget)
        for n in range(self.params.max_n, self.params.min_n - 1, -1):
            if len(toks) <= n:
                continue
            start = hist.first.get(n, {}).get(tuple(toks[-n:]))
            # The earliest occurrence must end before the context does.
            if start is not None and start + n < len(toks):
                return DraftTree.path(toks[start + n : start + n + k])
        return DraftTree()

    def accept(
        self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None
    ) -> None:
        self._extend(self._sessions[key], tokens)

    def end_call(self, key: SessionKey) -> None:
        pass

    def drop_session(self, key: SessionKey) -> None:
        self._sessions.pop(key, None)

    def memory_bytes(self) -> int:
        # Python objects, sized without walking them: every token an int object (ids above 256 are
        # not interned) referenced by the list and by the n-gram tuples, whose sizes depend on n only.
        total = 0
        for hist in list(self._sessions.values()):
            total += sys.getsizeof(hist.tokens) + _INT_BYTES * len(hist.tokens)
            for n, first in list(hist.first.items()):
                total += sys.getsizeof(first) + len(first) * sys.getsizeof(tuple(range(n)))
        return total


_INT_BYTES = sys.getsizeof(2**20)
