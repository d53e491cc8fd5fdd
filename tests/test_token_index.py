import random

from hypothesis import given, settings
from hypothesis import strategies as st

from quickdraft.suffix_cache.token_index import BOUNDARY, TokenIndex


def build(seqs):
    index = TokenIndex()
    for seq in seqs:
        index.start_sequence()
        index.extend(seq)
    return index


def test_finds_longest_match_and_its_continuations():
    index = build([[1, 2, 3, 4, 5, 9, 2, 3, 4, 6]])
    occ = index.occurrences([7, 2, 3, 4], max_occurrences=8)
    # "2 3 4" occurs twice; both are followed by a token.
    assert sorted(o.end for o in occ) == [3, 8] or sorted(o.end for o in occ) == [4, 9]
    assert all(o.match_len == 3 for o in occ)
    conts = sorted(tuple(index.continuation(o.end, 2)) for o in occ)
    assert conts == [(5, 9), (6,)]


def test_continuations_stop_at_sequence_boundaries():
    index = build([[1, 2, 3], [1, 2, 7, 8]])
    occ = index.occurrences([1, 2], max_occurrences=8)
    conts = sorted(tuple(index.continuation(o.end, 5)) for o in occ)
    assert conts == [(3,), (7, 8)]
    assert BOUNDARY not in sum(conts, ())


def test_ngrams_never_span_sequences():
    index = build([[1, 2], [3, 4]])
    # "2 3" only exists across the boundary, so the best match is the single token 3.
    occ = index.occurrences([2, 3], max_occurrences=8)
    assert [o.match_len for o in occ] == [1]


def test_excluded_end_is_skipped():
    index = build([[5, 6, 5, 6]])
    occ = index.occurrences([5, 6], max_occurrences=8, exclude_end=len(index) - 1)
    assert [o.end for o in occ] == [1]


def test_eviction_floor_hides_old_positions():
    index = build([[1, 2, 3], [1, 2, 4]])
    index.evict_before(4)
    occ = index.occurrences([1, 2], max_occurrences=8)
    assert [tuple(index.continuation(o.end, 3)) for o in occ] == [(4,)]


def snapshot(index):
    return ([dict(h) for h in index._heads], [list(p) for p in index._prev], list(index.tokens))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.data())
def test_truncate_exactly_undoes_appends(tokens, data):
    cut = data.draw(st.integers(0, len(tokens)))
    full = build([tokens])
    full.truncate(cut)
    assert snapshot(full) == snapshot(build([tokens[:cut]]))
    # Appending after a truncation behaves like appending to a fresh index.
    tail = [random.Random(cut).randint(0, 4) for _ in range(5)]
    full.extend(tail)
    again = build([tokens[:cut] + tail])
    assert snapshot(full) == snapshot(again)
