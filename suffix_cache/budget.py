"""A mean draft budget, spent where drafts are likely to be accepted.

A fixed number of nodes per step wastes budget twice: on steps where nothing is
likely (prose after a short match) and by stopping long copies short. With a
budget that is a *mean* over a run, the best allocation sends, at every step,
the nodes whose acceptance chance is above one threshold (each node's expected
yield is its chance, so a common threshold equalises the marginal yield of a
node across steps). The threshold is steered so the run's mean stays at the
budget, and a step never sends more than ``cap_factor`` times the mean.

The tree's node probabilities must be calibrated acceptance chances for this to
pay (the suffix drafter's are); a drafter whose nodes all claim 1.0 simply sends
what it drafts, up to the cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import exp as _exp

from quickdraft.suffix_cache.draft import DraftTree


@dataclass(slots=True)
class MeanBudget:
    mean: float = 8.0            # drafted nodes per step, on average over the run
    cap_factor: int = 4          # one step sends at most cap_factor * mean nodes
    threshold: float = 0.05      # current acceptance-chance threshold (steered)
    rate: float = 0.01           # how fast the threshold follows the running mean
    steps: int = 0
    sent: int = 0

    @property
    def cap(self) -> int:
        """How many nodes to ask the drafter for."""
        return max(1, int(self.cap_factor * self.mean))

    def cut(self, tree: DraftTree) -> DraftTree:
        """The nodes of ``tree`` worth sending this step (a tree again: a node's parent is kept first)."""
        # This runs every step, in Python: `cap` is worked out inline (the property call alone cost
        # 0.4 us on the dev machine), and the common cases return before any loop.
        cap = int(self.cap_factor * self.mean)
        if cap < 1:
            cap = 1
        # Never run more than one cap ahead of the budget, whatever the threshold says.
        room = min(cap, int(self.mean * (self.steps + 1) + cap) - self.sent)
        if room < 0:
            room = 0
        probs = tree.probs
        threshold = self.threshold
        # Nothing drafted, or a drafter told the threshold has left out what is under it.
        if not probs or min(probs) >= threshold:
            return tree if len(tree.token_ids) <= room else tree.truncated(room)
        # Trees grown best first (the suffix drafter's, merged ones) keep their likeliest nodes in
        # front: the nodes above the threshold are a prefix, and any prefix is a tree. A plain loop
        # finds it cheapest (this runs every step; bisect with a key and slices cost 4x as much).
        k = 0
        for p in probs:
            if p < threshold:
                break
            k += 1
        if k == len(probs) or max(probs[k:]) < threshold:
            return tree.truncated(min(k, room))
        index: dict[int, int] = {}
        out = DraftTree(match_len=tree.match_len, left_out=tree.left_out)
        for i, (tok, parent) in enumerate(zip(tree.token_ids, tree.parents, strict=True)):
            if len(out.token_ids) >= room:
                break
            if probs[i] < threshold or (parent >= 0 and parent not in index):
                continue
            index[i] = len(out.token_ids)
            out.token_ids.append(tok)
            out.parents.append(-1 if parent < 0 else index[parent])
            out.probs.append(probs[i])
        return out

    def spent(self, nodes: int) -> None:
        """Record what a step sent and steer the threshold toward the mean (aiming 1 % under it)."""
        self.steps += 1
        self.sent += nodes
        target = 0.99 * self.mean
        t = self.threshold * _exp(self.rate * (nodes - target) / target)
        self.threshold = 1e-4 if t < 1e-4 else 1.0 if t > 1.0 else t
