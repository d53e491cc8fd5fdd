"""The draft tree: the one shape every drafter returns and every worker verifies.

Nodes are in topological order: ``parents[i] < i`` and ``-1`` marks a child of
the root (the last token of the context). A path is the special case
``parents == [-1, 0, 1, ...]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class DraftTree:
    token_ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    # Drafter's estimate of each node's probability of being accepted (path
    # probability); used to rank, truncate and merge trees. Not sent to workers.
    probs: list[float] = field(default_factory=list)
    # Length of the context match the draft was built from (0 when unknown).
    match_len: int = 0
    # Nodes the drafter grew but left out, their chance being under the caller's ``min_chance``.
    left_out: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def path(cls, tokens: Sequence[int], probs: Sequence[float] | None = None) -> DraftTree:
        tokens = list(tokens)
        return cls(
            token_ids=tokens,
            parents=list(range(-1, len(tokens) - 1)),
            probs=list(probs) if probs is not None else [1.0] * len(tokens),
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError unless this is a well-formed tree."""
        if len(self.parents) != len(self.token_ids):
            raise ValueError("draft tree: token_ids and parents differ in length")
        if self.probs and len(self.probs) != len(self.token_ids):
            raise ValueError("draft tree: probs and token_ids differ in length")
        seen: set[tuple[int, int]] = set()
        for i, (tok, parent) in enumerate(zip(self.token_ids, self.parents, strict=True)):
            if not -1 <= parent < i:
                raise ValueError(f"draft tree: node {i} has parent {parent}; parents must precede children")
            if tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise ValueError(f"draft tree: node {i} has token id {tok} outside the vocabulary")
            if (parent, tok) in seen:
                raise ValueError(f"draft tree: node {i} duplicates a sibling's token {tok}")
            seen.add((parent, tok))

    def node_depths(self) -> list[int]:
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 if parent < 0 else depths[parent] + 1)
        return depths

    def depth(self) -> int:
        return max(self.node_depths(), default=0)

    def pruned_to_depth(self, max_depth: int) -> DraftTree:
        """The nodes at most ``max_depth`` levels deep (a node's ancestors are shallower, so kept)."""
        depths = self.node_depths()
        if max(depths, default=0) <= max_depth:
            return self
        new_index: dict[int, int] = {}
        out = DraftTree(match_len=self.match_len, left_out=self.left_out)
        for i, depth in enumerate(depths):
            if depth > max_depth:
                continue
            new_index[i] = len(out.token_ids)
            out.token_ids.append(self.token_ids[i])
            out.parents.append(-1 if self.parents[i] < 0 else new_index[self.parents[i]])
            if self.probs:
                out.probs.append(self.probs[i])
        return out

    def judged(self, emitted: Sequence[int]) -> tuple[float, int]:
        """(expected, accepted) over the nodes whose fate ``emitted`` settles, sent or not.

        A node is accepted when its whole path equals the start of ``emitted``, rejected when
        its path departs from it anywhere within ``emitted``'s length; a node that follows
        ``emitted`` all the way and reaches deeper is undecided and left out. Judging the
        whole tree (not only the nodes sent) lets a session whose drafts were cut to nothing
        still show that they would have been accepted."""
        expected, accepted = 0.0, 0
        state: list[int] = []  # 1 accepted, 0 rejected, -1 undecided
        depths = self.node_depths()
        for i, (tok, parent) in enumerate(zip(self.token_ids, self.parents, strict=True)):
            above = 1 if parent < 0 else state[parent]
            if above == 0:
                fate = 0
            elif above == 1 and depths[i] <= len(emitted):
                fate = int(emitted[depths[i] - 1] == tok)
            else:
                fate = -1
            state.append(fate)
            if fate >= 0:
                expected += self.probs[i] if self.probs else 1.0
                accepted += fate
        return expected, accepted

    def truncated(self, budget: int) -> DraftTree:
        """The first ``budget`` nodes: still a tree, since parents come first."""
        if len(self) <= budget:
            return self
        return DraftTree(
            self.token_ids[:budget], self.parents[:budget], self.probs[:budget], self.match_len, self.left_out
        )

    def longest_accepted(self, target: Sequence[int]) -> list[int]:
        """Node indices of the longest branch whose tokens equal a prefix of ``target``."""
        children: dict[tuple[int, int], int] = {}
        for i, (tok, parent) in enumerate(zip(self.token_ids, self.parents, strict=True)):
            children.setdefault((parent, tok), i)
        node, accepted = -1, []
        for tok in target:
            nxt = children.get((node, tok))
            if nxt is None:
                break
            accepted.append(nxt)
            node = nxt
        return accepted
