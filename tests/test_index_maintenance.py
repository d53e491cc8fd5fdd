"""The tenant's response index is frozen in steps, and in the proxy a large one is frozen and
compacted by rebuilding it off the caller's thread (SuffixDrafter.maintain_in; TokenIndex.snapshot,
IndexSnapshot.build and catch_up have their own property test in test_token_index.py), so the
event loop never stalls on it."""

import asyncio
import json
import random
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import pytest

import quickdraft.suffix_cache.suffix as suffix_module
from quickdraft.suffix_cache.base import Scope, SessionKey
from quickdraft.suffix_cache.suffix import SuffixDrafter

A = Scope("tenant-a", "tok")


def answer_alike(answers, i, *drafters):
    """Call i of a stream of agent runs, on each drafter: each drafts from the end of the last answer,
    then learns answer i. Their trees must be the same; returns it."""
    key = SessionKey(A, f"run-{i}")
    trees = []
    for d in drafters:
        d.begin_call(key, answers[i - 1][-6:] if i else [0])
        trees.append(d.propose(key, 8))
        d.accept(key, answers[i])
        d.end_call(key)
    for tree in trees[1:]:
        assert (tree.token_ids, tree.parents) == (trees[0].token_ids, trees[0].parents)
    return trees[0]


def _tenant_drafter(**params):
    d = SuffixDrafter()
    for name, value in params.items():
        setattr(d.params, name, value)
    d._core_params = d.params.core()
    return d


def test_the_tenant_responses_are_frozen_in_steps_and_draft_the_same():
    # The tenant's earlier responses are laid out as blocks (TokenIndex.freeze) each time the part
    # appended since holds freeze_every tokens and freeze_share of the whole: the drafts must be
    # exactly those of an index never frozen, through evictions too.
    rng = random.Random(11)
    answers = [[rng.randrange(40) for _ in range(rng.randrange(5, 60))] for _ in range(120)]
    frozen = _tenant_drafter(freeze_every=200, global_max_tokens=2_500)
    plain = _tenant_drafter(freeze_every=10**9, global_max_tokens=2_500)
    froze_at, drafted = set(), 0
    for i in range(len(answers)):
        drafted += len(answer_alike(answers, i, frozen, plain).token_ids)
        froze_at.add(frozen.responses(A).frozen_tokens)
    assert plain.responses(A).frozen_tokens == 0
    assert len(froze_at) > 3  # frozen several times, after evictions began too
    assert frozen.responses(A).floor > 0
    assert drafted > 8 * len(answers) // 2  # the drafts came from the responses


class _HeldExecutor(Executor):
    # Runs what it is given only when the test says so: a rebuild can then be made to finish after a
    # chosen number of further responses.
    def __init__(self):
        self.held = []

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        self.held.append((future, lambda: fn(*args, **kwargs)))
        return future

    def run_held(self):
        held, self.held = self.held, []
        for future, job in held:
            future.set_result(job())
        return len(held)


@pytest.mark.parametrize("catch_up_per_call", [16_384, 7])
def test_large_tenant_indexes_are_rebuilt_off_the_call_and_draft_the_same(catch_up_per_call, monkeypatch):
    # With a maintenance executor (the proxy's), a tenant index past rebuild_above is frozen by
    # rebuilding it from a snapshot on the executor while responses keep coming, then swapped in
    # (caught up with what came meanwhile): never frozen in the call. Without eviction, what it
    # holds is what the in-place index holds, so the drafts must be the same at every step.
    # Caught up a few tokens a call too: the swap then waits until the rebuild is level.
    monkeypatch.setattr(suffix_module, "CATCH_UP_PER_CALL", catch_up_per_call)
    rng = random.Random(5)
    answers = [[rng.randrange(40) for _ in range(rng.randrange(5, 60))] for _ in range(150)]
    executor = _HeldExecutor()
    rebuilt, in_place = (_tenant_drafter(freeze_every=200, rebuild_above=600) for _ in range(2))
    rebuilt.maintain_in(executor)
    indexes, rebuilds, drafted = set(), 0, 0
    for i in range(len(answers)):
        live = rebuilt.responses(A)
        frozen_before = live.frozen_tokens
        drafted += len(answer_alike(answers, i, rebuilt, in_place).token_ids)
        if executor.held:
            assert live.frozen_tokens == frozen_before  # nothing frozen in the call: a rebuild waits
        indexes.add(id(rebuilt.responses(A)))
        if i % 3 == 2:  # the rebuild finishes two or three responses after it began
            rebuilds += executor.run_held()
    assert rebuilds >= 3 and len(indexes) >= 3  # rebuilt and swapped in several times
    assert rebuilt.responses(A).tokens == in_place.responses(A).tokens
    assert 0 < rebuilt.responses(A).frozen_tokens < len(rebuilt.responses(A))  # the last catch-up is not frozen yet
    assert drafted > 8 * len(answers) // 2


def test_a_rebuild_in_a_thread_compacts_the_evicted_part_and_keeps_drafting():
    rng = random.Random(7)
    cap = 2_000
    d = _tenant_drafter(global_max_tokens=cap, freeze_every=200, rebuild_above=500)
    with ThreadPoolExecutor(1) as pool:
        d.maintain_in(pool)
        drafted, indexes = 0, set()
        for i in range(200):
            key = SessionKey(A, f"run-{i}")
            answer = [rng.randrange(30) for _ in range(rng.randrange(5, 60))]
            d.begin_call(key, answer[:3])
            drafted += len(d.propose(key, 8).token_ids)
            d.accept(key, answer[3:])
            d.end_call(key)
            index = d.responses(A)
            assert index.live_tokens <= cap
            assert len(index) <= 3 * cap  # compacted by rebuilds, never in the call
            indexes.add(id(index))
            if i % 20 == 19:  # let the thread finish now and then, as an event loop would
                for job in list(d._rebuilds.values()):
                    job.future.result()
        assert not d.responses(A).auto_compact
    assert len(indexes) >= 5  # swapped in again and again
    assert d.responses(A).floor < cap // 2  # the dead part went with the last rebuild
    assert drafted > 0


def test_the_proxy_rebuilds_its_drafters_large_tenant_indexes_on_a_maintenance_thread():
    from test_prior_text import _service

    service, vocabulary = _service("none")
    scope = Scope("default", vocabulary)
    suffix = service.drafters["suffix"]
    suffix.params.rebuild_above = 0  # every freeze is a rebuild
    suffix.params.freeze_every = 500
    first = suffix.responses(scope)
    rng = random.Random(3)
    learned = []
    for _ in range(60):  # what another replica learned arrives through the Redis log's callback
        response = [rng.randrange(100) for _ in range(50)]
        service._learn_remote(scope, response)
        learned += [-1, *response] if learned else response
    assert first.frozen_tokens == 0  # never frozen in the call: rebuilt on the maintenance thread
    deadline = time.monotonic() + 30
    while suffix.responses(scope) is first or suffix.responses(scope).frozen_tokens == 0:
        assert time.monotonic() < deadline, "the rebuilt index was never swapped in"
        time.sleep(0.01)
    assert suffix.responses(scope).tokens == learned  # nothing learned meanwhile was lost
    loop = asyncio.new_event_loop()  # not asyncio.run: it would leave this thread without a current loop
    loop.run_until_complete(service.close())
    loop.close()


def test_the_stall_benchmark_times_both_ways_on_the_same_responses(tmp_path):
    from quickdraft.bench.index_stalls import main

    out = tmp_path / "stalls.json"
    main(["--cap", "30000", "--rebuild-above", "5000", "--tokens-per-s", "0", "--json", str(out)])
    figures = json.loads(out.read_text())["results"]
    assert [f["maintenance"] for f in figures] == ["in the call", "on a thread"]
    assert figures[0]["calls"] == figures[1]["calls"] > 100
    for f in figures:
        assert 0 < f["median_us"] <= f["worst_ms"][0] * 1e3 and len(f["worst_ms"]) == 5


def test_a_finished_rebuild_is_swapped_in_even_after_its_tenant_goes_quiet():
    executor = _HeldExecutor()
    d = _tenant_drafter(freeze_every=100, rebuild_above=0)
    d.maintain_in(executor)
    quiet, busy = Scope("quiet", "tok"), Scope("busy", "tok")
    d.learn_response(quiet, list(range(150)))  # due: a rebuild is submitted
    old = d._responses[quiet]
    assert executor.run_held() == 1
    d.begin_call(SessionKey(busy, "s"), [1, 2, 3])  # another tenant's call
    assert d._responses[quiet] is not old and d._responses[quiet].frozen_tokens == 150


class _FailingExecutor(Executor):
    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        future.set_exception(MemoryError("no room for the copy"))
        return future


def test_a_rebuild_that_fails_or_cannot_start_is_done_in_the_call_instead():
    for executor in (_FailingExecutor(), ThreadPoolExecutor(1)):
        d = _tenant_drafter(freeze_every=100, rebuild_above=0)
        d.maintain_in(executor)
        if isinstance(executor, ThreadPoolExecutor):
            executor.shutdown()  # a stopping proxy: submit refuses
        d.learn_response(A, list(range(150)))
        d.learn_response(A, list(range(10)))  # the failed rebuild is noticed here
        index = d.responses(A)
        assert index.frozen_tokens >= 150 and not d._rebuilds
        assert index.tokens == [*range(150), -1, *range(10)]  # nothing learned was lost


def test_a_single_drafters_stored_state_wins_over_its_composites(tmp_path):
    # Older proxies stored the hybrid's calibration apart; the hybrid's leader is now the suffix
    # drafter itself, and its own stored state must win whatever order Redis returns them in.
    from test_prior_text import _service

    service, vocabulary = _service("none")
    scope = Scope("default", vocabulary)
    older, newer = SuffixDrafter(), SuffixDrafter()
    for d, steps in ((older, 1), (newer, 3)):
        for i in range(steps):
            key = SessionKey(scope, f"s{i}")
            d.begin_call(key, [1, 2, 3, 1, 2])
            d.propose(key, 8)
            d.accept(key, [3, 1])
            d.end_call(key)
    assert older.calibration(scope).observed < newer.calibration(scope).observed
    blobs = {"suffix": newer.export_state(scope), "hybrid": older.export_state(scope)}
    for order in (blobs, dict(reversed(blobs.items()))):
        service._import_state(scope, order)
        assert service.drafters["suffix"].calibration(scope).observed == newer.calibration(scope).observed
