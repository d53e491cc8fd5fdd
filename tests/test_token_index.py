"""The compiled token index: matches, continuations, boundaries, truncation, eviction."""

import random
import threading
import time
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quickdraft.suffix_cache._core import TokenIndex


def build(seqs):
    index = TokenIndex()
    for seq in seqs:
        index.start_sequence()
        index.extend(seq)
    return index


def test_finds_longest_match_and_its_continuations():
    index = build([[1, 2, 3, 4, 5, 9, 2, 3, 4, 6]])
    occ = index.occurrences([7, 2, 3, 4], 8)
    assert sorted(occ) == [(3, 3), (8, 3)]  # "2 3 4" ends at 3 and at 8, three tokens match
    conts = sorted(tuple(index.continuation(end, 2)) for end, _ in occ)
    assert conts == [(5, 9), (6,)]


def test_match_length_is_exact_beyond_the_hashed_order():
    index = build([[9, 8, 1, 2, 3, 4, 5, 0, 7, 2, 3, 4, 5, 1]])
    occ = index.occurrences([8, 1, 2, 3, 4, 5], 8)
    assert occ[0] == (6, 6)  # the longest match is preferred and its length counted exactly


def test_continuations_stop_at_sequence_boundaries():
    index = build([[1, 2, 3], [1, 2, 7, 8]])
    occ = index.occurrences([1, 2], 8)
    assert sorted(tuple(index.continuation(end, 5)) for end, _ in occ) == [(3,), (7, 8)]


def test_ngrams_never_span_sequences():
    index = build([[1, 2], [3, 4]])
    # "2 3" only exists across the boundary, so the best match is the single token 3.
    assert [n for _, n in index.occurrences([2, 3], 8)] == [1]


def test_excluded_end_is_skipped():
    index = build([[5, 6, 5, 6]])
    assert index.occurrences([5, 6], 8, exclude_end=len(index) - 1) == [(1, 2)]


def test_eviction_floor_hides_old_positions_and_compaction_keeps_the_rest():
    index = build([[1, 2, 3], [1, 2, 4]])
    index.evict_before(4)
    assert [tuple(index.continuation(e, 3)) for e, _ in index.occurrences([1, 2], 8)] == [(4,)]
    big = TokenIndex()
    for i in range(3000):
        big.start_sequence()
        big.extend([1, 2, 100 + i % 50])
    big.evict_before(len(big) - 400)  # more than half dead: compacted
    assert big.floor == 0 and big.live_tokens <= 400
    conts = {tuple(big.continuation(e, 1)) for e, _ in big.occurrences([1, 2], 64)}
    assert conts and all(c[0] >= 100 for c in conts)


def test_rebase_keeps_the_common_prefix():
    index = build([[1, 2, 3, 4]])
    assert index.rebase([1, 2, 9]) == 2
    assert index.tokens == [1, 2, 9]
    assert index.since(1) == [2, 9]


def contexts(alphabet=5, n=3):
    out = [[]]
    for _ in range(n):
        out = [c + [t] for c in out for t in range(alphabet)]
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.data())
def test_truncate_exactly_undoes_appends(tokens, data):
    cut = data.draw(st.integers(0, len(tokens)))
    tail = data.draw(st.lists(st.integers(0, 4), max_size=8))
    truncated = build([tokens])
    truncated.truncate(cut)
    truncated.extend(tail)
    fresh = build([tokens[:cut] + tail])
    assert truncated.tokens == fresh.tokens
    for ctx in contexts():
        assert sorted(truncated.occurrences(ctx, 64)) == sorted(fresh.occurrences(ctx, 64))


def test_extend_sequences_indexes_buffers_as_start_sequence_and_extend_do():
    seqs = [[1, 2, 3, 4, 5], [], [9, 2, 3, 4, 6], [2, 3]]
    bulk = TokenIndex()
    bulk.extend_sequences([array("i", s) for s in seqs])
    one_by_one = build(seqs)
    assert bulk.tokens == one_by_one.tokens
    for ctx in ([2, 3, 4], [3], [7, 2, 3]):
        assert sorted(bulk.occurrences(ctx, 8)) == sorted(one_by_one.occurrences(ctx, 8))
    with pytest.raises(ValueError, match="32-bit ints"):
        bulk.extend_sequences([array("d", [1.0])])


def test_extend_sequences_lets_other_threads_run_while_it_indexes():
    # A prior text takes a good part of a second to index, in the proxy's loading thread: the
    # event loop must go on meanwhile. A thread that counts while the call runs shows the GIL free.
    text = array("i", random.Random(7).choices(range(5_000), k=1_500_000))
    counted = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counted[0] += 1

    spinner = threading.Thread(target=count)
    spinner.start()
    try:
        time.sleep(0.05)
        before, t0 = counted[0], time.perf_counter()
        time.sleep(0.2)
        rate = (counted[0] - before) / (time.perf_counter() - t0)  # counts a second, the GIL free
        before, t0 = counted[0], time.perf_counter()
        TokenIndex().extend_sequences([text])
        during, took = counted[0] - before, time.perf_counter() - t0
    finally:
        stop.set()
        spinner.join()
    # Held, the GIL would let the counter run for one switch interval (5 ms) at the most.
    assert took > 0.1 and during > 0.2 * rate * took


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["seq", "freeze", "evict", "cut"]),
                          st.lists(st.integers(0, 4), max_size=30)), min_size=1, max_size=8), st.data())
def test_freezing_never_changes_what_a_query_finds(script, data):
    # freeze() lays the chains indexed so far out as blocks; appends, evictions and truncations of
    # the unfrozen tail go on after it. Every query must give the same occurrences in the same
    # order (the drafts depend on the order) as an index that was never frozen.
    plain, frozen = TokenIndex(), TokenIndex()
    for action, tokens in script:
        if action == "freeze":
            frozen.freeze()
            assert frozen.frozen_tokens == len(frozen)
        elif action == "evict":
            floor = data.draw(st.integers(0, len(plain)))
            plain.evict_before(floor)
            frozen.evict_before(floor)
        elif action == "cut":
            length = data.draw(st.integers(plain.floor, len(plain)))  # into the frozen part: it thaws
            plain.truncate(length)
            frozen.truncate(length)
        for index in (plain, frozen):
            index.start_sequence()
            index.extend(tokens)
        assert frozen.tokens == plain.tokens and frozen.floor == plain.floor
        for ctx in contexts():
            for all_orders in (False, True):
                for max_occ in (1, 3, 64):
                    assert frozen.occurrences(ctx, max_occ, all_orders=all_orders) == plain.occurrences(
                        ctx, max_occ, all_orders=all_orders
                    )


def test_a_long_chain_reads_the_same_across_the_frozen_boundary():
    # Long enough that the walk reads past the links it gathers side by side (24 per order).
    text = random.Random(5).choices(range(3), k=3_000)
    plain, frozen = build([text[:2_000]]), build([text[:2_000]])
    frozen.freeze()
    for index in (plain, frozen):
        index.extend(text[2_000:])
    for ctx in ([0], [1, 2], [2, 0, 1], [0, 0, 0, 0]):
        for all_orders in (False, True):
            assert frozen.occurrences(ctx, 60, all_orders=all_orders) == plain.occurrences(
                ctx, 60, all_orders=all_orders)


def test_a_frozen_index_takes_less_memory_and_thaws_when_cut_into():
    text = random.Random(3).choices(range(50), k=20_000)
    live, frozen = build([text]), build([text])
    frozen.freeze()
    assert frozen.memory_bytes() < live.memory_bytes()  # the links are gone
    frozen.extend([1, 2])  # appending goes on
    frozen.truncate(len(text))  # and so does truncating what was appended since
    assert frozen.frozen_tokens == len(text)
    # A session whose history was rewritten: its chains are built again, unfrozen.
    for index in (live, frozen):
        assert index.rebase(text[:500] + [7, 7, 7]) == 500
    assert frozen.frozen_tokens == 0 and frozen.tokens == live.tokens
    for ctx in ([7, 7], text[490:500], text[100:103]):
        assert frozen.occurrences(ctx, 32, all_orders=True) == live.occurrences(ctx, 32, all_orders=True)


def mirror(tokens):
    # A plain index holding exactly `tokens` (boundary markers included) from position 0.
    index, seq = TokenIndex(), []
    index.auto_compact = False
    for t in tokens + [-1]:
        if t == -1:
            index.start_sequence()
            index.extend(seq)
            seq = []
        else:
            seq.append(t)
    return index


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["seq", "evict", "snapshot", "swap"]),
                          st.lists(st.integers(0, 4), max_size=30)), min_size=1, max_size=10), st.data())
def test_a_rebuilt_snapshot_caught_up_finds_what_the_source_would(script, data):
    # A large tenant index is rebuilt from snapshot() in another thread while responses are still
    # appended and evicted; catch_up then brings the rebuild level with its source. It must hold and
    # find exactly what the source's live part held at the snapshot plus everything since, at
    # positions shifted by the snapshot's start (a plain index mirrors that).
    source = TokenIndex()
    source.auto_compact = False
    pending = None  # (snapshot, its plain mirror)
    for action, tokens in script:
        if action == "evict":
            source.evict_before(data.draw(st.integers(0, len(source))))
            if pending:
                pending[1].evict_before(source.floor - pending[0].start)
        elif action == "snapshot" and pending is None:
            snap = source.snapshot()
            assert snap.end == len(source) and source.floor <= snap.start <= len(source)
            pending = (snap, mirror(source.tokens[snap.start:]))
        elif action == "swap" and pending is not None:
            snap, plain = pending
            rebuilt = snap.build()
            assert rebuilt.frozen_tokens == len(rebuilt) == snap.end - snap.start
            rebuilt.auto_compact = False
            limit = data.draw(st.sampled_from([-1, 1, 7]))  # all at once, or a few tokens a call
            while not rebuilt.catch_up(source, snap, limit):
                assert 0 < len(rebuilt) - (snap.end - snap.start) < len(source) - snap.end and rebuilt.floor == 0
            assert rebuilt.tokens == plain.tokens == source.tokens[snap.start:]
            assert rebuilt.floor == plain.floor == min(max(source.floor - snap.start, 0), len(rebuilt))
            for ctx in contexts():
                for all_orders in (False, True):
                    assert rebuilt.occurrences(ctx, 64, all_orders=all_orders) == plain.occurrences(
                        ctx, 64, all_orders=all_orders)
                    # Once the source's floor has passed the cut, and the cut is at a sequence's start
                    # (a compaction drops the rest of a sequence the floor cuts), the source finds the
                    # same, at positions shifted by the cut.
                    if source.floor >= snap.start and (snap.start == 0 or source.tokens[snap.start - 1] == -1):
                        shifted = [(p - snap.start, m)
                                   for p, m in source.occurrences(ctx, 64, all_orders=all_orders)]
                        assert rebuilt.occurrences(ctx, 64, all_orders=all_orders) == shifted
            pending = None
        for index in (source, *(pending[1:] if pending else ())):
            index.start_sequence()
            index.extend(tokens)


def test_catch_up_refuses_an_index_that_is_not_the_snapshots_rebuild():
    source = build([[1, 2, 3], [4, 5]])
    snap = source.snapshot()
    with pytest.raises(ValueError, match="not the snapshot's rebuild"):
        TokenIndex([1, 2]).catch_up(source, snap)  # another index altogether
    evicted = snap.build()
    evicted.evict_before(2)
    with pytest.raises(ValueError, match="not the snapshot's rebuild"):
        evicted.catch_up(source, snap)  # changed since it was built
    source.truncate(2)  # the source rewritten after the snapshot
    with pytest.raises(ValueError, match="cut or rewritten"):
        snap.build().catch_up(source, snap)
