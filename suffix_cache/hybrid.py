"""Hybrid drafting: every drafter proposes, one tree goes to the worker.

Each step the suffix, STAND and ADED drafters propose trees under the same
budget. Their node probabilities are put on one scale by a per-drafter,
per-scope calibration (how many tokens its trees actually yielded against how
many its probabilities promised, as a moving average), the trees are merged
into one (a node shared by several drafters keeps its best estimate), and the
best nodes within the budget are sent. The merged tree's expected accepted
length is what the selection maximises; a drafter that stops paying off loses
weight without being switched off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from quickdraft.suffix_cache import _core
from quickdraft.suffix_cache.aded import AdedDrafter
from quickdraft.suffix_cache.base import Drafter, PositionStats, Scope, SessionKey
from quickdraft.suffix_cache.draft import DraftTree
from quickdraft.suffix_cache.stand import StandDrafter
from quickdraft.suffix_cache.suffix import SuffixDrafter


@dataclass(slots=True)
class Calibration:
    """How often a drafter's nodes are accepted, by the probability it gave them.

    Node probabilities of different drafters mean different things (a suffix
    match's frequency, an n-gram's learned mass); binning each drafter's own
    estimates and counting how often nodes in each bin were accepted puts them
    on one scale: the chance the target really emits the node.
    """

    bins: int = 20
    accepted: list[float] = field(default_factory=lambda: [0.0] * 20)
    drafted: list[float] = field(default_factory=lambda: [0.0] * 20)
    decay: float = 0.9995

    def _bin(self, p: float) -> int:
        return min(self.bins - 1, int(p * self.bins))

    def calibrated(self, probs: Sequence[float]) -> list[float]:
        out = []
        for p in probs:
            b = self._bin(p)
            # A weak prior at the drafter's own estimate until a bin has data.
            out.append((self.accepted[b] + 2.0 * p) / (self.drafted[b] + 2.0))
        return out

    def update(self, tree: DraftTree, accepted_nodes: Sequence[int]) -> None:
        hit = set(accepted_nodes)
        for i, p in enumerate(tree.probs):
            b = self._bin(p)
            self.drafted[b] = self.drafted[b] * self.decay + 1.0
            self.accepted[b] = self.accepted[b] * self.decay + (1.0 if i in hit else 0.0)


@dataclass(slots=True)
class _Step:
    trees: list[DraftTree] = field(default_factory=list)


class HybridDrafter(Drafter):
    name = "hybrid"

    def __init__(self, members: Sequence[Drafter] | None = None) -> None:
        self.members: list[Drafter] = list(members) if members else [SuffixDrafter(), StandDrafter(), AdedDrafter()]
        self._calibration: dict[tuple[Scope, str], Calibration] = {}
        self._last: dict[SessionKey, _Step] = {}

    def _cal(self, scope: Scope, name: str) -> Calibration:
        cal = self._calibration.get((scope, name))
        if cal is None:
            cal = self._calibration[(scope, name)] = Calibration()
        return cal

    def begin_call(self, key: SessionKey, prompt: Sequence[int]) -> None:
        for m in self.members:
            m.begin_call(key, prompt)

    def propose(self, key: SessionKey, budget: int) -> DraftTree:
        if budget <= 0:
            return DraftTree()
        trees = [m.propose(key, budget) for m in self.members]
        self._last[key] = _Step(trees)
        calibrated = [
            (t.token_ids, t.parents, self._cal(key.scope, m.name).calibrated(t.probs))
            for m, t in zip(self.members, trees, strict=True)
        ]
        tokens, parents, probs, _ = _core.merge_trees(calibrated, [1.0] * len(trees), budget)
        return DraftTree(tokens, parents, probs, max(t.match_len for t in trees))

    def accept(self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None) -> None:
        step = self._last.pop(key, None)
        if step is not None:
            for member, tree in zip(self.members, step.trees, strict=True):
                if tree.token_ids:
                    self._cal(key.scope, member.name).update(tree, tree.longest_accepted(tokens))
        for m in self.members:
            m.accept(key, tokens, stats)

    def end_call(self, key: SessionKey) -> None:
        self._last.pop(key, None)
        for m in self.members:
            m.end_call(key)

    def drop_session(self, key: SessionKey) -> None:
        self._last.pop(key, None)
        for m in self.members:
            m.drop_session(key)

    def set_temperature(self, key: SessionKey, temperature: float) -> None:
        for m in self.members:
            m.set_temperature(key, temperature)

    def learn_response(self, scope: Scope, response: Sequence[int]) -> None:
        for m in self.members:
            m.learn_response(scope, response)
