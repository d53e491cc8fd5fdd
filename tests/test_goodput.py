"""Goodput-aware draft sizing: the choices it makes for a free and for a saturated worker."""

import pytest

from quickdraft.proxy.goodput import PassCost, StepOverhead, choose_draft_size


def cost_curve(points):
    cost = PassCost()
    for tokens, ms in points:
        for _ in range(3):
            cost.observe(tokens, ms)
    return cost


# Shaped like SmolLM2 on two CPU cores: one row is a matrix-vector product, a few rows cost
# a little more, and past a few dozen rows every row adds compute.
CPU = cost_curve([(1, 73), (2, 112), (4, 116), (8, 121), (9, 122), (17, 142), (64, 330), (128, 600), (512, 2200)])
CONFIDENT = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
DOUBTFUL = [0.2, 0.05, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01]


def test_without_measurements_the_whole_tree_is_sent():
    assert choose_draft_size(CONFIDENT, 1.0, 1, PassCost()) == 8


def test_an_idle_worker_gets_a_likely_draft_whole_and_an_unlikely_one_not_at_all():
    assert choose_draft_size(CONFIDENT, 1.0, 1, CPU) == 8
    assert choose_draft_size(DOUBTFUL, 1.0, 1, CPU) == 0


def test_a_saturated_worker_gets_only_the_nodes_that_pay_for_their_compute():
    # 64 sessions: every drafted position is paid for in compute by the whole batch.
    assert choose_draft_size(CONFIDENT, 1.0, 64, CPU) == 1
    assert choose_draft_size(DOUBTFUL, 1.0, 64, CPU) == 0
    assert choose_draft_size([0.99] * 8, 1.0, 64, CPU) == 8


def test_moderate_load_still_speculates():
    assert choose_draft_size(CONFIDENT, 1.0, 8, CPU) >= 4


def test_a_drafter_that_overestimates_itself_is_trusted_less():
    assert choose_draft_size(CONFIDENT, 1.0, 8, CPU) > 0
    assert choose_draft_size(CONFIDENT, 0.1, 8, CPU) == 0


def test_pass_cost_interpolates_and_extrapolates():
    assert abs(CPU.predict(9) - 122) < 1e-6
    assert 122 < CPU.predict(13) < 142
    assert CPU.predict(1024) > 2200


def test_unmeasured_draft_sizes_are_tried_not_priced_off_a_prefill_pass():
    # Only single tokens, one-node drafts and a 300-token prefill measured so far: a line through
    # them would price a 9-position pass at ~114 ms and no 8-node draft would ever be sent (so the
    # curve would never be learned). Optimism sends it once; its measurement then decides.
    cost = cost_curve([(1, 60), (2, 90), (300, 1100)])
    assert cost.predict(9) == 90
    assert choose_draft_size(CONFIDENT, 1.0, 1, cost) == 8
    for _ in range(3):
        cost.observe(9, 200)  # it turned out dear on this worker
    assert choose_draft_size(CONFIDENT, 1.0, 1, cost) < 8


def test_a_session_silenced_by_a_bad_stretch_speaks_again_once_its_drafts_would_pay():
    from quickdraft.proxy.goodput import Acceptance
    from quickdraft.suffix_cache.draft import DraftTree

    acceptance = Acceptance()
    tree = DraftTree.path([1, 2, 3, 4, 5, 6, 7, 8], CONFIDENT)
    for _ in range(10):  # the target goes elsewhere at once, step after step
        acceptance.observe(*tree.judged([99]))
    assert choose_draft_size(tree.probs, acceptance.ratio, 1, CPU) == 0
    # Nothing is sent now, yet every step still judges the whole tree against what the
    # target emitted (one token per step): the drafts would have been right again.
    for _ in range(10):
        acceptance.observe(*tree.judged([1]))
    assert choose_draft_size(tree.probs, acceptance.ratio, 1, CPU) == 8


def test_a_size_measured_dear_during_a_busy_spell_is_measured_again_later():
    """Draft passes timed while something else held the CPU look 10x dear, so the sizer
    stops sending drafts; single-token steps keep coming. Without a second measurement that would
    last forever: a size unmeasured for STALE_AFTER passes is tried again and priced afresh."""
    from quickdraft.proxy.goodput import STALE_AFTER

    cost = cost_curve([(1, 60), (2, 70), (3, 75), (5, 80), (9, 90), (300, 1100)])
    assert choose_draft_size(CONFIDENT, 1.0, 1, cost) == 8
    for _ in range(20):
        for tokens in (2, 3, 5, 9):
            cost.observe(tokens, 10 * cost.predict(tokens))
    assert choose_draft_size(CONFIDENT, 1.0, 1, cost) == 0
    for _ in range(STALE_AFTER - 10):  # single-token steps, and a prefill now and then
        cost.observe(1, 60)
    cost.observe(300, 1100)
    assert choose_draft_size(CONFIDENT, 1.0, 1, cost) == 0  # still within the window: trusted
    for _ in range(10):
        cost.observe(1, 60)
    assert choose_draft_size(CONFIDENT, 1.0, 1, cost) == 8  # forgotten: tried again
    cost.observe(9, 90)  # and now it is cheap again: drafts keep being sent
    assert cost.predict(9) == 90
    assert choose_draft_size(CONFIDENT, 1.0, 1, cost) > 0


def test_with_only_small_sizes_measured_a_larger_draft_is_still_tried():
    """Prefill buckets are forgotten during a long completion like any other; drafts beyond the
    largest measured size must still be tried once rather than priced off a line through the
    two smallest sizes (here 60 + 30 ms per position: 9 positions at 300 ms, never sent)."""
    cost = cost_curve([(1, 60), (2, 90)])
    assert cost.predict(9) == 90
    assert choose_draft_size(CONFIDENT, 1.0, 1, cost) == 8


def test_a_fresh_proxy_that_has_seen_only_a_prefill_and_whole_trees_tries_smaller_drafts():
    """A session's first pass is its prompt's prefill and its next ones the whole tree: priced at the
    smallest measured size's cost, every smaller draft would cost the same, the whole tree would win
    step after step and a single row would never be measured. On a CPU where 33 rows cost four times
    one, that kept unlikely 32-node drafts going for dozens of steps."""
    cost = cost_curve([(3900, 14000), (33, 260)])
    unlikely = [0.3, 0.2, 0.1] + [0.05] * 29
    assert cost.predict(1) < 260
    assert choose_draft_size(unlikely, 0.2, 1, cost) == 0
    for _ in range(3):
        cost.observe(1, 60)  # a single row turned out far cheaper than the tree
    assert cost.predict(9) == pytest.approx(60)  # sizes between are tried optimistically again, and measured
    assert choose_draft_size(CONFIDENT, 1.0, 1, cost) == 8


def test_a_draft_is_cut_where_its_next_node_stops_paying_not_at_a_power_of_two():
    # Five near-certain nodes, then three long shots: send the five.
    assert choose_draft_size([0.95] * 5 + [0.02] * 3, 1.0, 1, CPU) == 5


def test_a_step_cost_beyond_the_pass_makes_longer_drafts_pay():
    # The call and the proxy's own work are paid once a step: a draft that saves steps saves them too.
    assert choose_draft_size(DOUBTFUL, 1.0, 1, CPU) == 0
    assert choose_draft_size(DOUBTFUL, 1.0, 1, CPU, overhead_ms=150.0) >= 1
    # Saturated, the compute every session of the batch pays for a node still rules.
    assert choose_draft_size(DOUBTFUL, 1.0, 64, CPU, overhead_ms=15.0) == 0


def test_the_step_overhead_is_the_floor_of_the_call_and_the_mean_of_the_proxys_work():
    overhead = StepOverhead()
    assert overhead.ms == 0.0
    overhead.observe_call(50.0, 40.0)   # 10 ms beyond the pass
    overhead.observe_call(95.0, 40.0)   # it waited behind another pass: not a cost of every step
    assert overhead.call_ms == pytest.approx(10.0, abs=0.5)
    for _ in range(200):                # a lasting 20 ms is learned
        overhead.observe_call(60.0, 40.0)
    assert overhead.call_ms == pytest.approx(20.0, abs=0.5)
    overhead.observe_call(30.0, 40.0)   # a pass reported longer than its round trip: no negative cost
    assert overhead.call_ms == 0.0
    for _ in range(50):
        overhead.observe_proxy(5.0)
    assert overhead.ms == pytest.approx(5.0, abs=0.1)
