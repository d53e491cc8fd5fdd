"""Hybrid drafting: the suffix drafter leads, the n-gram drafters stand in where it has nothing.

Each step the first member (the suffix drafter) proposes under the budget; its
node probabilities are already calibrated acceptance chances (learned per scope
by its core). When its tree is (nearly) empty -- no context match worth a node --
STAND and ADED propose too, their probabilities are put on the same scale by a
per-drafter, per-scope calibration (how often nodes it rated p were accepted, as
a moving average), and the trees are merged by calibrated chance (a node shared
by several drafters keeps its best estimate), best first, so any prefix of the
result is again a tree a caller may cut.

Why the n-gram drafters only stand in: on the dev traces (tuned on every third
file, checked on the rest) merging all three every step lost 1 % to the suffix
drafter alone and choosing the single best calibrated tree lost 4 %: their trees
mostly repeat the suffix tree's first nodes. Since the suffix tree is calibrated,
filling whatever budget it leaves with n-gram nodes no longer adds anything
either (2.8300 vs 2.8325 tokens per step at 3x the drafting time), so they are
asked only when the suffix drafter has no node to offer. They still learn every
accepted token (with the target's probabilities, for STAND), but in batches, when
the call ends: a step that asks them mid-call only moves their context past what
the session accepted since (``Drafter.follow``). What they would learn from the
call's own tokens the suffix tree already indexes, so the step needs it no sooner,
and drafting stays near the suffix drafter's own cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from quickdraft.suffix_cache import _core
from quickdraft.suffix_cache.aded import AdedDrafter
from quickdraft.suffix_cache.base import AcceptedRun, Drafter, PositionStats, Scope, SessionKey, takes_min_chance
from quickdraft.suffix_cache.draft import DraftTree
from quickdraft.suffix_cache.prior_text import PriorText
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

    # Both loops run over every node of a stand-in's tree on the steps that ask the stand-ins: the
    # bin is worked out inline and the tables are read through locals (a method call per node
    # doubled their cost).
    def calibrated(self, probs: Sequence[float]) -> list[float]:
        accepted, drafted, bins = self.accepted, self.drafted, self.bins
        top = bins - 1
        out = []
        for p in probs:
            b = int(p * bins)
            if b > top:
                b = top
            # A weak prior at the drafter's own estimate until a bin has data.
            out.append((accepted[b] + 2.0 * p) / (drafted[b] + 2.0))
        return out

    def update(self, tree: DraftTree, accepted_nodes: Sequence[int]) -> None:
        accepted, drafted, bins, decay = self.accepted, self.drafted, self.bins, self.decay
        top = bins - 1
        hit = set(accepted_nodes)
        for i, p in enumerate(tree.probs):
            b = int(p * bins)
            if b > top:
                b = top
            drafted[b] = drafted[b] * decay + 1.0
            accepted[b] = accepted[b] * decay + (1.0 if i in hit else 0.0)


@dataclass(slots=True)
class _Step:
    trees: list[DraftTree] = field(default_factory=list)


class HybridDrafter(Drafter):
    name = "hybrid"

    def __init__(self, members: Sequence[Drafter] | None = None, fill_below: int = 2) -> None:
        self.members: list[Drafter] = list(members) if members else [SuffixDrafter(), StandDrafter(), AdedDrafter()]
        self.fill_below = fill_below  # the others are asked when the leader's tree has fewer nodes
        self._lead_cuts = takes_min_chance(self.members[0])  # a leader may predate min_chance
        self._calibration: dict[tuple[Scope, str], Calibration] = {}
        self._last: dict[SessionKey, _Step] = {}
        self._backlog: dict[SessionKey, AcceptedRun] = {}  # accepted, not yet handed to the stand-ins

    def _cal(self, scope: Scope, name: str) -> Calibration:
        cal = self._calibration.get((scope, name))
        if cal is None:
            cal = self._calibration[(scope, name)] = Calibration()
        return cal

    def _catch_up(self, key: SessionKey, learn: bool = True) -> None:
        """Hand the stand-ins what the session accepted since they were last handed anything: to
        learn at once (between calls), or only to move their context past it (a step that asks
        them mid-call; they learn it when the call ends, off the step's path)."""
        backlog = self._backlog.pop(key, None)
        if backlog is not None and backlog.tokens:
            for m in self.members[1:]:
                if learn:
                    m.accept(key, backlog.tokens, backlog.stats)
                else:
                    m.follow(key, backlog.tokens, backlog.stats)

    def begin_call(self, key: SessionKey, prompt: Sequence[int]) -> None:
        self._catch_up(key)
        for m in self.members:
            m.begin_call(key, prompt)

    def propose(self, key: SessionKey, budget: int, min_chance: float = 0.0) -> DraftTree:
        if budget <= 0:
            return DraftTree()
        # The leader may leave out its nodes under min_chance, but they count for the rule below.
        lead = self.members[0]
        leader = lead.propose(key, budget, min_chance=min_chance) if self._lead_cuts else lead.propose(key, budget)
        if len(leader.token_ids) + leader.left_out >= self.fill_below or len(self.members) == 1:
            if self._last:
                self._last.pop(key, None)
            return leader
        if leader.left_out:  # merge the whole tree, as ties in the merge are broken by node order
            whole = lead.offered(key)  # the tree it grew, without growing it again
            leader = whole if whole is not None else lead.propose(key, budget)
        self._catch_up(key, learn=False)
        trees = [leader, *(m.propose(key, budget) for m in self.members[1:])]
        self._last[key] = _Step(trees)
        ranked = [(leader.token_ids, leader.parents, list(leader.probs))]
        ranked += [(t.token_ids, t.parents, self._cal(key.scope, m.name).calibrated(t.probs))
                   for m, t in zip(self.members[1:], trees[1:], strict=True)]
        tokens, parents, probs, _ = _core.merge_trees(ranked, [1.0] * len(trees), budget)
        return DraftTree(tokens, parents, probs, max(t.match_len for t in trees))

    def accept(self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None) -> None:
        self.members[0].accept(key, tokens, stats)
        step = self._last.pop(key, None) if self._last else None
        if step is not None:  # the stand-ins drafted this step: calibrate them on its outcome
            for member, tree in zip(self.members[1:], step.trees[1:], strict=False):
                if tree.token_ids:
                    self._cal(key.scope, member.name).update(tree, tree.longest_accepted(tokens))
        backlog = self._backlog.get(key)
        if backlog is None:
            backlog = self._backlog[key] = AcceptedRun()
        backlog.add(tokens, stats)

    def end_call(self, key: SessionKey) -> None:
        self._last.pop(key, None)
        self._catch_up(key)
        for m in self.members:
            m.end_call(key)

    def drop_session(self, key: SessionKey) -> None:
        self._last.pop(key, None)
        self._backlog.pop(key, None)
        for m in self.members:
            m.drop_session(key)

    def set_temperature(self, key: SessionKey, temperature: float) -> None:
        for m in self.members:
            m.set_temperature(key, temperature)

    def use_prior(self, prior: PriorText) -> None:
        for m in self.members:
            m.use_prior(prior)

    def parts(self) -> tuple[Drafter, ...]:
        return tuple(self.members)

    def maintain_in(self, executor: Executor | None) -> None:
        for m in self.members:
            m.maintain_in(executor)

    def learn_response(self, scope: Scope, response: Sequence[int]) -> None:
        for m in self.members:
            m.learn_response(scope, response)

    # The leader's calibration is what sizes every tree; the stand-ins' rarely-used scales
    # relearn within a few steps, so only the leader's state is carried.
    def export_state(self, scope: Scope) -> bytes | None:
        return self.members[0].export_state(scope)

    def import_state(self, scope: Scope, data: bytes) -> bool:
        return self.members[0].import_state(scope, data)
