"""An append-only token arena with hash chains: the suffix index behind the drafters.

It answers the question a suffix tree answers for SuffixDecoding: "where did the
longest suffix of this context occur before, and what followed it?". Instead of
materialising the tree (which costs tens of bytes per token per depth level),
it keeps, for a few n-gram orders, a chain from every position to the previous
position that ended the same n-gram (as LZ77 match finders do). A query walks
the chain of the deepest order that has a hit, measures each occurrence's exact
match length, and rebuilds the matched node's subtree from the tokens that
followed the most recent occurrences. Memory is a few integers per token and
appends are O(orders) per token.

Sequences are separated by a boundary marker so that no n-gram and no
continuation crosses from one sequence into the next. Truncating the tail is
exact (chains are last-in, first-out), which lets a session's history follow a
prompt that diverged from what was appended. Dropping the oldest tokens is a
floor below which chains are cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BOUNDARY = -1
ORDERS: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
MAX_MATCH = 32


@dataclass(slots=True)
class Occurrence:
    end: int        # arena position of the last matched token
    match_len: int  # how many context tokens match, ending there (capped at MAX_MATCH)


class TokenIndex:
    def __init__(self, orders: Sequence[int] = ORDERS) -> None:
        self.orders = tuple(sorted(orders))
        self.tokens: list[int] = []
        # For each order: n-gram key -> last end position; per position, the previous one.
        self._heads: list[dict[int, int]] = [{} for _ in self.orders]
        self._prev: list[list[int]] = [[] for _ in self.orders]
        self.floor = 0  # positions below this are evicted
        self._seq_start = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def _key(gram: Sequence[int]) -> int:
        return gram[0] if len(gram) == 1 else hash(tuple(gram))

    def start_sequence(self) -> None:
        if self.tokens and self.tokens[-1] != BOUNDARY:
            self._append_one(BOUNDARY)
        self._seq_start = len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for tok in tokens:
            self._append_one(int(tok))

    def _append_one(self, tok: int) -> None:
        toks = self.tokens
        toks.append(tok)
        pos = len(toks) - 1
        if tok == BOUNDARY:
            for prev in self._prev:
                prev.append(-1)
            return
        avail = pos - self._seq_start + 1
        for oi, order in enumerate(self.orders):
            prev = self._prev[oi]
            if order > avail:
                prev.append(-1)
                continue
            key = self._key(toks[pos - order + 1 : pos + 1])
            heads = self._heads[oi]
            prev.append(heads.get(key, -1))
            heads[key] = pos

    def truncate(self, length: int) -> None:
        """Drop tokens from position ``length`` on, exactly undoing their appends."""
        toks = self.tokens
        while len(toks) > length:
            pos = len(toks) - 1
            tok = toks[pos]
            if tok != BOUNDARY:
                for oi, order in enumerate(self.orders):
                    before = self._prev[oi][pos]
                    if pos - order + 1 < 0 or BOUNDARY in toks[pos - order + 1 : pos + 1]:
                        continue
                    key = self._key(toks[pos - order + 1 : pos + 1])
                    heads = self._heads[oi]
                    if heads.get(key) == pos:
                        if before >= 0:
                            heads[key] = before
                        else:
                            del heads[key]
            for prev in self._prev:
                prev.pop()
            toks.pop()
        # The open sequence starts after the last boundary still present.
        start = len(toks)
        while start > 0 and toks[start - 1] != BOUNDARY:
            start -= 1
        self._seq_start = start

    def evict_before(self, floor: int) -> None:
        """Forget positions below ``floor`` (chains stop there)."""
        self.floor = max(self.floor, floor)

    def _match_len(self, end: int, context: Sequence[int], limit: int) -> int:
        toks = self.tokens
        n = 0
        floor = self.floor
        while n < limit and end - n >= floor and toks[end - n] == context[-1 - n]:
            n += 1
        return n

    def occurrences(
        self, context: Sequence[int], max_occurrences: int, exclude_end: int = -1
    ) -> list[Occurrence]:
        """Most recent occurrences of the longest suffix of ``context`` that has any.

        Only occurrences followed by at least one token of their sequence count.
        ``exclude_end`` skips one end position (the context's own, when the
        context is this arena's tail).
        """
        limit = min(len(context), MAX_MATCH)
        last = len(self.tokens) - 1
        for oi in range(len(self.orders) - 1, -1, -1):
            order = self.orders[oi]
            if order > limit:
                continue
            pos = self._heads[oi].get(self._key(context[-order:]), -1)
            prev = self._prev[oi]
            found: list[Occurrence] = []
            walked = 0
            while pos >= self.floor and len(found) < max_occurrences and walked < 4 * max_occurrences:
                walked += 1
                if pos != exclude_end and pos < last and self.tokens[pos + 1] != BOUNDARY:
                    n = self._match_len(pos, context, limit)
                    if n >= order:  # guards against hash collisions
                        found.append(Occurrence(pos, n))
                pos = prev[pos]
            if found:
                return found
        return []

    def continuation(self, end: int, depth: int) -> list[int]:
        """Up to ``depth`` tokens after position ``end``, stopping at a boundary."""
        out = self.tokens[end + 1 : end + 1 + depth]
        if BOUNDARY in out:
            out = out[: out.index(BOUNDARY)]
        return out
