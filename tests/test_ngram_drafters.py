"""STAND, ADED and the hybrid: their defining behaviour."""

import math

from quickdraft.suffix_cache._core import NgramTable
from quickdraft.suffix_cache.aded import AdedDrafter, AdedParams
from quickdraft.suffix_cache.base import PositionStats, Scope, SessionKey
from quickdraft.suffix_cache.hybrid import Calibration, HybridDrafter
from quickdraft.suffix_cache.stand import StandDrafter, StandParams

A = Scope("tenant-a", "tok")
B = Scope("tenant-b", "tok")


def as_dict(pairs):
    return {t: round(p, 3) for t, p in pairs}


def test_stand_keeps_the_targets_probabilities():
    d = StandDrafter(StandParams(learn_prompt=False))
    key = SessionKey(A, "s")
    d.begin_call(key, [1, 2])
    stats = [PositionStats((5, 6), (math.log(0.7), math.log(0.3)), 0.6)]
    d.accept(key, [5], stats)
    table = d.state.tables[A]
    assert as_dict(table.distribution([1, 2])) == {5: 0.7, 6: 0.3}
    # A second verified visit of the same context averages in the new distribution.
    d.begin_call(key, [1, 2])
    d.accept(key, [6], [PositionStats((6, 5), (math.log(0.9), math.log(0.1)), 0.3)])
    assert as_dict(table.distribution([1, 2])) == {5: 0.4, 6: 0.6}


def test_stand_learns_one_hot_without_stats_and_drafts_from_it():
    d = StandDrafter()
    key = SessionKey(A, "s")
    d.begin_call(key, [7, 8, 9, 7, 8])
    tree = d.propose(key, 4)
    assert tree.token_ids[0] == 9 and tree.probs[0] == 1.0
    assert d.propose(SessionKey(B, "s"), 4).token_ids == []  # nothing learned for another tenant


def test_stand_gumbel_top_k_samples_children_in_proportion_to_their_mass():
    table = NgramTable(2, 8, 1000)
    table.observe_run([1], [2], [2, 3], [0.75, 0.25], 2)
    firsts = [table.draft_stand([1], 1, 1, 0.0, 1, 1.0, seed)[0][0] for seed in range(2000)]
    share = firsts.count(2) / len(firsts)
    assert 0.70 < share < 0.80  # Gumbel-max draws the first child with probability 0.75
    assert table.draft_stand([1], 1, 1, 0.0, 1, 0.0, 0)[0] == [2]  # deterministic without temperature


def test_stand_follows_each_requests_temperature():
    d = StandDrafter(StandParams(learn_prompt=False))
    greedy, sampled, tiny = SessionKey(A, "greedy"), SessionKey(A, "sampled"), SessionKey(A, "tiny")
    for key in (greedy, sampled):
        d.begin_call(key, [1])
    d.accept(greedy, [2], [PositionStats((2, 3), (math.log(0.6), math.log(0.4)), 0.7)])
    d.set_temperature(sampled, 1.0)
    for key in (greedy, sampled):
        d.begin_call(key, [1])
    firsts = {key: {d.propose(key, 1).token_ids[0] for _ in range(200)} for key in (greedy, sampled)}
    assert firsts[greedy] == {2}            # top-k: always the likelier child
    assert firsts[sampled] == {2, 3}        # Gumbel-top-k at the request's temperature: both
    # A temperature the workers decode greedily (below 1e-5, proto/sampling.py) drafts greedily
    # too: between two children of equal mass, always the same one, never a draw.
    d.begin_call(tiny, [5])
    d.accept(tiny, [6], [PositionStats((6, 7), (math.log(0.5), math.log(0.5)), 0.7)])
    d.set_temperature(tiny, 1e-6)
    d.begin_call(tiny, [5])
    assert len({d.propose(tiny, 1).token_ids[0] for _ in range(200)}) == 1


def test_aded_adapts_to_recent_text():
    d = AdedDrafter(AdedParams(forget=0.8))
    key = SessionKey(A, "s")
    d.begin_call(key, [1, 2, 3] * 6)
    first = as_dict(d.state.tables[A].distribution([1, 2]))
    assert max(first, key=first.get) == 3
    d.begin_call(key, [1, 2, 3] * 6 + [1, 2, 4] * 4)
    later = as_dict(d.state.tables[A].distribution([1, 2]))
    assert max(later, key=later.get) == 4  # recent counts outweigh faded older ones


def test_aded_feedback_moves_away_from_rejected_candidates():
    d = AdedDrafter(AdedParams(forget=1.0, explore=0.0))
    key = SessionKey(A, "s")
    d.begin_call(key, [1, 2, 3, 1, 2, 3, 1, 2, 4, 1, 2, 4, 1, 2])
    for _ in range(6):
        tree = d.propose(key, 2)
        assert tree.token_ids
        # The target keeps answering 4 after "1 2".
        d.accept(key, [4])
        d.begin_call(key, [1, 2, 3, 1, 2, 3, 1, 2, 4, 1, 2, 4, 1, 2])
    assert d.propose(key, 1).token_ids == [4]


def test_hybrid_lets_a_suffix_tree_lead_as_it_is():
    from quickdraft.suffix_cache.suffix import SuffixDrafter

    d, alone = HybridDrafter(), SuffixDrafter()
    key = SessionKey(A, "s")
    for drafter in (d, alone):
        drafter.begin_call(key, [5, 6, 7, 8, 1, 5, 6])
    tree = d.propose(key, 8)
    tree.validate()
    assert tree.token_ids[0] == 7
    assert tree.token_ids == alone.propose(key, 8).token_ids  # the n-gram drafters were not asked
    assert (A, "stand") not in d._calibration


def test_hybrid_asks_the_ngram_drafters_where_the_suffix_tree_is_empty():
    d = HybridDrafter()
    # STAND learns every session's prompt; the suffix drafter indexes only this session and earlier responses.
    d.begin_call(SessionKey(A, "earlier"), [40, 41, 42, 43])
    key = SessionKey(A, "now")
    d.begin_call(key, [1, 2, 40])
    assert d.members[0].propose(key, 8).token_ids == []
    tree = d.propose(key, 8)
    tree.validate()
    assert tree.token_ids[0] == 41
    d.accept(key, [41, 42, 9])
    cal = d._calibration[(A, "stand")]
    assert sum(cal.drafted) > 0 and sum(cal.accepted) > 0


def test_hybrid_stand_ins_learn_what_was_accepted_while_the_suffix_tree_led():
    d = HybridDrafter()
    key = SessionKey(A, "s")
    d.begin_call(key, [5, 6, 7, 8, 1, 5, 6])
    d.propose(key, 8)
    d.accept(key, [7, 8, 70, 71])  # the suffix drafter led: STAND and ADED get these later, in one batch
    stand = d.members[1]
    assert stand.state.tables[A].distribution([70]) == []
    d.end_call(key)
    assert [t for t, _ in stand.state.tables[A].distribution([70])] == [71]


def test_hybrid_stand_in_steps_move_the_context_and_learn_at_the_calls_end():
    d = HybridDrafter()
    d.begin_call(SessionKey(A, "earlier"), [40, 41, 42, 43])
    key = SessionKey(A, "now")
    d.begin_call(key, [1, 2, 3])
    d.propose(key, 8)
    # The target's own distribution at both positions, as a worker returns it.
    stats = [PositionStats((50, 60), (math.log(0.7), math.log(0.3)), 0.6),
             PositionStats((40, 44), (math.log(0.9), math.log(0.1)), 0.3)]
    d.accept(key, [50, 40], stats)
    assert d.members[0].propose(key, 8).token_ids == []  # 40 is in no context the suffix drafter indexes
    tree = d.propose(key, 8)
    assert tree.token_ids[0] == 41  # the stand-ins draft from the context as it is now, ending in 40
    stand = d.members[1]
    assert stand.state.tables[A].distribution([3]) == []  # ... but have not learned the call's tokens yet
    d.accept(key, [41, 9])
    d.end_call(key)
    assert as_dict(stand.state.tables[A].distribution([3])) == {50: 0.7, 60: 0.3}
    assert as_dict(stand.state.tables[A].distribution([3, 50])) == {40: 0.9, 44: 0.1}


def test_calibration_learns_acceptance_rates_per_bin():
    from quickdraft.suffix_cache.draft import DraftTree

    cal = Calibration()
    tree = DraftTree([1, 2], [-1, -1], [0.9, 0.9])
    for _ in range(200):
        cal.update(tree, [0])  # of two nodes at 0.9, only one is ever accepted
    assert abs(cal.calibrated([0.9])[0] - 0.5) < 0.05
