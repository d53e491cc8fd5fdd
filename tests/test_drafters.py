import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quickdraft.suffix_cache.aded import AdedDrafter
from quickdraft.suffix_cache.base import Scope, SessionKey, common_prefix_len
from quickdraft.suffix_cache.draft import DraftTree
from quickdraft.suffix_cache.pld import PldParams, PromptLookupDrafter
from quickdraft.suffix_cache.registry import DRAFTERS, make_drafter
from quickdraft.suffix_cache.stand import StandDrafter
from quickdraft.suffix_cache.suffix import SuffixDrafter

A = Scope("tenant-a", "tok")
B = Scope("tenant-b", "tok")


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len(list(range(1000)), list(range(500)) + [-1]) == 500


def test_suffix_drafts_the_continuation_seen_in_the_prompt():
    d = SuffixDrafter()
    key = SessionKey(A, "s")
    text = [10, 11, 12, 13, 14, 15, 16, 17]
    d.begin_call(key, text + [99] + text[:3])
    tree = d.propose(key, 8)
    assert tree.token_ids[:5] == [13, 14, 15, 16, 17]
    assert tree.parents[:3] == [-1, 0, 1]
    assert tree.match_len == 3


def test_suffix_frequency_picks_the_common_continuation_first():
    from quickdraft.suffix_cache.suffix import SuffixParams

    d = SuffixDrafter(SuffixParams(context_window=0))  # frequencies alone, no context weighting
    key = SessionKey(A, "s")
    prompt = [1, 2, 7, 3, 1, 2, 7, 4, 1, 2, 8, 6, 1, 2]
    d.begin_call(key, prompt)
    tree = d.propose(key, 4)
    # Two of three occurrences continue with 7: it is the first node; 8 is a sibling.
    assert tree.token_ids[0] == 7 and tree.parents[0] == -1
    roots = {t for t, p in zip(tree.token_ids, tree.parents, strict=True) if p == -1}
    assert roots == {7, 8}
    assert tree.probs[0] > tree.probs[tree.token_ids.index(8)]


def test_suffix_adaptive_depth_grows_with_match_length():
    d = SuffixDrafter()
    key = SessionKey(A, "s")
    body = list(range(100, 140))
    d.begin_call(key, body + [1] + body[:1])
    short = d.propose(key, 64)
    d.accept(key, body[1:6])
    long = d.propose(key, 64)
    assert short.match_len == 1 and short.depth() == 6  # factor 2 * 1 + offset 4
    assert long.match_len == 6 and long.depth() == 16


def test_responses_are_learned_per_scope_and_never_cross_tenants():
    d = SuffixDrafter()
    answer = [50, 51, 52, 53, 54, 55]
    first = SessionKey(A, "one")
    d.begin_call(first, [1, 2, 3])
    d.accept(first, answer)
    d.end_call(first)
    # A new session of the same tenant drafts the earlier answer ...
    again = SessionKey(A, "two")
    d.begin_call(again, [9, 9, 50, 51])
    assert d.propose(again, 8).token_ids[:4] == [52, 53, 54, 55]
    # ... another tenant with the same tokens gets nothing from it.
    other = SessionKey(B, "two")
    d.begin_call(other, [9, 9, 50, 51])
    assert d.propose(other, 8).token_ids == []


def test_session_history_follows_a_diverged_prompt():
    d = SuffixDrafter()
    key = SessionKey(A, "s")
    d.begin_call(key, [1, 2, 3, 4])
    d.accept(key, [5, 6, 7])
    d.begin_call(key, [1, 2, 3, 4, 5, 8, 9])  # the client re-sent a different answer
    assert d.session_tokens(key) == [1, 2, 3, 4, 5, 8, 9]


def test_global_index_evicts_oldest_responses():
    d = SuffixDrafter()
    d.params.global_max_tokens = 8
    for i in range(5):
        key = SessionKey(A, f"s{i}")
        d.begin_call(key, [0])
        d.accept(key, [100 + i] * 4)
        d.end_call(key)
    index = d.responses(A)
    assert len(index) - index.floor <= 8
    key = SessionKey(A, "probe")
    d.begin_call(key, [7, 100])
    assert d.propose(key, 4).token_ids == []  # the first answer was evicted


def test_pld_uses_the_earliest_occurrence():
    d = PromptLookupDrafter(PldParams(min_n=2, max_n=3, k=3))
    key = SessionKey(A, "s")
    d.begin_call(key, [1, 2, 3, 4, 9, 1, 2, 3, 5, 9, 1, 2, 3])
    assert d.propose(key, 8).token_ids == [4, 9, 1]


def test_pld_drafts_nothing_without_a_match():
    d = PromptLookupDrafter()
    key = SessionKey(A, "s")
    d.begin_call(key, list(range(20)))
    assert d.propose(key, 8).token_ids == []


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(sorted(DRAFTERS)),
    st.lists(st.integers(0, 6), max_size=80),
    st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=6), max_size=10),
    st.integers(0, 16),
    st.lists(st.lists(st.integers(0, 6), max_size=30), max_size=3),
)
def test_every_drafter_returns_a_valid_tree(name, prompt, steps, budget, prior_texts):
    from array import array

    from quickdraft.suffix_cache.prior_text import PriorText

    d = make_drafter(name)
    d.use_prior(PriorText("made by hand", A.tokenizer, [array("i", t) for t in prior_texts]))
    key = SessionKey(A, "s")
    d.begin_call(key, prompt)
    for step in steps:
        tree = d.propose(key, budget)
        tree.validate()
        assert len(tree) <= budget
        d.accept(key, step)
    d.end_call(key)
    d.begin_call(key, prompt + [1])
    d.propose(key, budget).validate()


def test_merged_tree_hedges_between_session_and_earlier_responses():
    d = SuffixDrafter()
    earlier = SessionKey(A, "earlier")
    d.begin_call(earlier, [0])
    d.accept(earlier, [40, 41, 42, 43])
    d.end_call(earlier)
    key = SessionKey(A, "now")
    d.begin_call(key, [40, 41, 50, 51, 9, 40, 41])
    tree = d.propose(key, 8)
    roots = {t for t, p in zip(tree.token_ids, tree.parents, strict=True) if p == -1}
    assert roots == {42, 50}  # the shared response's continuation and the session's, as siblings
    # The session's own occurrence weighs more than the shared one (shared_weight < 1).
    assert tree.token_ids[0] == 50


def test_occurrence_sharing_the_context_outweighs_a_more_frequent_one():
    from quickdraft.suffix_cache.suffix import SuffixParams

    topic = list(range(200, 216))  # e.g. the file and function the agent is talking about
    prompt = (topic + [5, 6, 70]                               # [5, 6] once after the topic: 70
              + list(range(300, 316)) + [5, 6, 80]             # twice elsewhere: 80
              + list(range(400, 416)) + [5, 6, 80]
              + list(range(500, 516)) + topic[:11] + [5, 6])   # now: the topic again, then [5, 6]
    key = SessionKey(A, "s")
    with_context = SuffixDrafter()
    with_context.begin_call(key, prompt)
    assert with_context.propose(key, 4).token_ids[0] == 70
    frequency_only = SuffixDrafter(SuffixParams(context_window=0))
    frequency_only.begin_call(key, prompt)
    assert frequency_only.propose(key, 4).token_ids[0] == 80


@pytest.mark.parametrize("replaced", [777, 3])  # a token never seen before; one seen elsewhere (a 1-token match)
def test_a_copy_with_one_token_replaced_drafts_on_after_it(replaced):
    from quickdraft.suffix_cache.suffix import SuffixParams

    line = list(range(100, 120))
    prompt = [3, 4] + line + [1] + line[:10] + [replaced]  # the agent copies the line, editing its 11th token
    key = SessionKey(A, "s")
    d = SuffixDrafter()
    d.begin_call(key, prompt)
    tree = d.propose(key, 32)
    # The line's continuation after the edited token is a branch: a root, then its path.
    nodes = list(zip(tree.token_ids, tree.parents, strict=True))
    root = nodes.index((line[11], -1))
    assert (line[12], root) in nodes
    if replaced == 777:  # nothing else to draft from: the resync branch is the whole tree
        assert tree.token_ids[:4] == line[11:15] and tree.parents[:4] == [-1, 0, 1, 2]
    off = SuffixDrafter(SuffixParams(resync_weight=0.0))
    off.begin_call(key, prompt)
    without = off.propose(key, 32)
    assert (line[11], -1) not in zip(without.token_ids, without.parents, strict=True)


def test_the_resync_waits_for_a_short_match_and_a_long_agreement():
    from quickdraft.suffix_cache.suffix import SuffixParams

    line = list(range(100, 120))
    # [108, 109, 90] also occurs elsewhere (then 70): the edited copy's context matches 3 tokens on its own.
    prompt = [3, 4] + line + [1] + [108, 109, 90, 70, 71] + [2] + line[:10] + [90]
    key = SessionKey(A, "s")

    def roots(params: SuffixParams) -> set[int]:
        d = SuffixDrafter(params)
        d.begin_call(key, prompt)
        tree = d.propose(key, 32)
        return {t for t, p in zip(tree.token_ids, tree.parents, strict=True) if p == -1}

    assert roots(SuffixParams()) == {70}                       # a 3-token match: no resync
    assert line[11] in roots(SuffixParams(resync_below=4))     # below a 4-token match: the copy's branch joins
    assert line[11] not in roots(SuffixParams(resync_below=4, resync_min=11))  # it agrees on 10 tokens only


def test_suffixdecoding_rule_picks_one_source():
    from quickdraft.suffix_cache.suffix import SuffixParams

    d = SuffixDrafter(SuffixParams(merge=False, length_decay=0.0))
    earlier = SessionKey(A, "earlier")
    d.begin_call(earlier, [0])
    d.accept(earlier, [40, 41, 42, 43])
    d.end_call(earlier)
    key = SessionKey(A, "now")
    d.begin_call(key, [40, 41, 50, 51, 9, 40, 41])
    tree = d.propose(key, 8)
    assert {t for t, p in zip(tree.token_ids, tree.parents, strict=True) if p == -1} in ({42}, {50})


def test_suffix_calibration_learns_from_what_the_target_emitted():
    d = SuffixDrafter()
    key = SessionKey(A, "s")
    body = list(range(100, 120))
    d.begin_call(key, body + [1] + body[:4])
    cal = d.calibration(A)
    before = [d.propose(key, 8).probs[0]]
    for _ in range(50):  # the target keeps diverging right after the match
        tree = d.propose(key, 8)
        d.accept(key, [999])
        d.begin_call(key, body + [1] + body[:4])
    # The first node's acceptance chance follows the evidence (below the prune: no node at all).
    after = (d.propose(key, 8).probs or [0.0])[0]
    assert cal.observed >= 50
    assert after < before[0] / 2
    tree.validate()


def test_calibration_counts_nodes_under_a_rejected_ancestor_as_rejected():
    from quickdraft.suffix_cache import _core

    d = SuffixDrafter()
    key = SessionKey(A, "s")
    d.begin_call(key, [1, 2, 3, 4, 9, 1, 2, 5, 6, 9, 1, 2])
    proposal = _core.propose(d._sessions[key].core.index, None, 8, d.params.core(), d.calibration(A))
    assert set(proposal.depths) >= {1, 2}
    cal = _core.Calibration()
    cal.observe_draft(proposal, [7])  # the target emitted 7: every node is rejected, at every depth
    assert cal.observed == len(proposal)
    cal2 = _core.Calibration()
    first = proposal.tokens[0]
    cal2.observe_draft(proposal, [first])  # one token: depth-2 nodes under it are unknown, not rejected
    # Known: the depth-1 nodes, and everything under a rejected depth-1 node.
    root = [i if par < 0 else None for i, par in enumerate(proposal.parents)]
    for i, par in enumerate(proposal.parents):
        if par >= 0:
            root[i] = root[par]
    known = sum(1 for i, dep in enumerate(proposal.depths) if dep == 1 or proposal.tokens[root[i]] != first)
    assert 0 < known < len(proposal)
    assert cal2.observed == known


def test_lexical_correction_tells_apart_what_the_table_cannot():
    # After the same 83 tokens the history continues with 10 and with 11 equally often: the two
    # roots share every key of the calibration table (depth, raw share, match, support), so the
    # table alone gives them one chance. The target always writes 11; the correction learns the token.
    d = SuffixDrafter()
    key = SessionKey(A, "s")
    lead = list(range(100, 180)) + [1, 2, 3]  # longer than the match cap and the context window
    history = (lead + [10, 20, 9] + lead + [11, 21, 9]) * 2 + lead

    def root_chances() -> dict[int, float]:
        d.begin_call(key, history)
        tree = d.propose(key, 8)
        return {t: p for t, par, p in zip(tree.token_ids, tree.parents, tree.probs, strict=True) if par < 0}

    first = root_chances()
    assert set(first) == {10, 11} and first[10] == first[11]
    for _ in range(60):
        root_chances()
        d.accept(key, [11, 21])
    learned = root_chances()
    assert learned[11] > learned[10] + 0.2
    # The correction travels with the table in a dump (16-bit floats: the same tree, chances
    # within a fraction of a percent).
    from quickdraft.suffix_cache import _core

    copy = _core.Calibration()
    assert copy.load(d.calibration(A).dump())
    assert copy.dump() == d.calibration(A).dump()
    again = _core.propose(d._sessions[key].core.index, None, 8, d.params.core(), copy)
    before = _core.propose(d._sessions[key].core.index, None, 8, d.params.core(), d.calibration(A))
    assert list(again.tokens) == list(before.tokens) and list(again.parents) == list(before.parents)
    assert list(again.probs) == pytest.approx(list(before.probs), rel=0.01)


def test_a_calibration_dump_of_the_32_bit_layout_still_loads():
    # Snapshots an older replica stored in Redis hold 32-bit floats; they load, and dump again in 16 bits.
    import struct

    import numpy as np

    from quickdraft.suffix_cache import _core

    d = SuffixDrafter()
    key = SessionKey(A, "s")
    for i in range(20):
        d.begin_call(key, [1, 2, 3, 4, 5, 1, 2, 3])
        d.propose(key, 8)
        d.accept(key, [4, 5, 6 + i % 3])
    learned = d.calibration(A).dump()
    magic, cells = struct.unpack("<II", learned[:8])
    assert magic == 0x34434451  # "QDC4"
    halves = np.frombuffer(learned[16:], dtype=np.uint16)
    floats = (halves.astype(np.uint32) << 16).view(np.float32)
    # A 32-bit store holds values bfloat16 cannot: nudged by under half a step, each rounds back.
    nudged = (floats * np.float32(1 + 2**-10)).astype(np.float32)
    assert (nudged != floats).any()
    legacy = struct.pack("<II", 0x33434451, cells) + learned[8:16] + nudged.tobytes()
    copy = _core.Calibration()
    assert copy.load(legacy)
    assert copy.observed == d.calibration(A).observed > 0
    assert copy.dump() == learned
    assert not copy.load(legacy[:-2])  # a truncated dump changes nothing
    assert not copy.load(struct.pack("<II", 0x35434451, cells) + learned[8:])  # nor an unknown layout
    assert copy.dump() == learned
    # Rounding is to the nearest bfloat16, ties to even (1 + 2**-8 lies halfway between 1 and 1 + 2**-7).
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, -2.5e-3, 3.0e4], dtype=np.float32)
    table = floats.copy()
    table[: len(values)] = values
    rounded = _core.Calibration()
    assert rounded.load(struct.pack("<II", 0x33434451, cells) + learned[8:16] + table.tobytes())
    back = np.frombuffer(rounded.dump()[16:], dtype=np.uint16)[: len(values)]
    restored = (back.astype(np.uint32) << 16).view(np.float32)
    assert list(restored[:2]) == [1.0, 1 + 4 * 2**-8]
    assert np.allclose(restored[2:], values[2:], rtol=2**-8)


def test_probabilities_never_rise_along_a_path():
    d = SuffixDrafter()
    key = SessionKey(A, "s")
    d.begin_call(key, [1, 2, 3, 4, 9, 1, 2, 5, 6, 9, 1, 2, 3, 4, 8, 1, 2])
    for _ in range(5):
        tree = d.propose(key, 16)
        for p, parent in zip(tree.probs, tree.parents, strict=True):
            assert parent < 0 or p <= tree.probs[parent]
        d.accept(key, tree.token_ids[:1] + [9])


def test_mean_budget_spends_the_mean_where_chances_are_high():
    from quickdraft.suffix_cache.budget import MeanBudget
    from quickdraft.suffix_cache.draft import DraftTree

    budget = MeanBudget(mean=4)
    likely = DraftTree.path(list(range(16)), [0.9] * 16)            # a long, likely copy
    unlikely = DraftTree.path(list(range(16)), [0.05 * 0.9 ** i for i in range(16)])
    sent_likely = sent_unlikely = 0
    for step in range(2000):
        tree = budget.cut(likely if step % 2 else unlikely)
        tree.validate()
        budget.spent(len(tree))
        if step % 2:
            sent_likely += len(tree)
        else:
            sent_unlikely += len(tree)
    assert budget.sent <= 4 * budget.steps + budget.cap  # the mean holds
    assert sent_likely > 3 * sent_unlikely                # and goes where acceptance is likely
    assert budget.cap == 16


def test_mean_budget_cuts_best_first_and_other_trees_alike():
    from quickdraft.suffix_cache.budget import MeanBudget
    from quickdraft.suffix_cache.draft import DraftTree

    budget = MeanBudget(mean=8, threshold=0.5)
    # Best first: the nodes above the threshold are a prefix, sent as they are.
    best_first = DraftTree([1, 2, 3, 4], [-1, 0, -1, 1], [0.9, 0.7, 0.6, 0.2], 3)
    cut = budget.cut(best_first)
    assert (cut.token_ids, cut.parents, cut.match_len) == ([1, 2, 3], [-1, 0, -1], 3)
    # Not best first (a likelier node after an unlikely one): still every node above the
    # threshold whose parent is sent, re-indexed into a tree.
    mixed = DraftTree([1, 2, 3, 4], [-1, -1, 0, 1], [0.9, 0.1, 0.8, 0.7])
    cut = budget.cut(mixed)
    cut.validate()
    assert (cut.token_ids, cut.parents, cut.probs) == ([1, 3], [-1, 0], [0.9, 0.8])
    # Without probabilities every node counts as certain, up to the room left.
    assert budget.cut(DraftTree(list(range(40)), list(range(-1, 39)))).token_ids == list(range(budget.cap))


@pytest.mark.parametrize("name", ["suffix", "hybrid"])
def test_a_drafter_told_the_cut_leaves_out_only_what_the_cut_drops(name):
    from quickdraft.suffix_cache.budget import MeanBudget

    # Two drafters fed alike, one asked for whole trees, one told the budget's threshold: every
    # step, the second sends what cutting the first's tree sends, and both keep learning alike
    # (the calibration judges the whole tree either way).
    whole, told = make_drafter(name), make_drafter(name)
    cut_whole, cut_told = MeanBudget(mean=4), MeanBudget(mean=4)
    body = [5, 6, 7, 8, 9, 10, 11, 12]
    prompt = body + [1] + body[:2] + [3, 4] + body[:3] + [2] + body[:2]
    key = SessionKey(A, "s")
    for d in (whole, told):
        d.begin_call(key, prompt)
    left_out = 0
    for emitted in ([7, 8, 9], [70], [10, 11, 12, 1], [5], [6, 2, 5, 6], [7, 8]):
        full = whole.propose(key, cut_whole.cap)
        short = told.propose(key, cut_told.cap, cut_told.threshold)
        assert short.token_ids == full.token_ids[: len(short)]
        assert len(short) + short.left_out == len(full)
        assert all(p >= cut_told.threshold for p in short.probs)
        left_out += short.left_out
        a, b = cut_whole.cut(full), cut_told.cut(short)
        assert (a.token_ids, a.parents, a.probs) == (b.token_ids, b.parents, b.probs)
        cut_whole.spent(len(a))
        cut_told.spent(len(b))
        whole.accept(key, emitted)
        told.accept(key, emitted)
    assert left_out > 0


def test_the_suffix_drafter_hands_over_the_whole_tree_it_grew_until_tokens_are_accepted():
    # The hybrid asks for the nodes a cut spared the leader from sending (when it must merge the
    # stand-ins' trees with the whole of it): they are the tree a propose without a threshold
    # grows, without growing it again, and nothing is offered once the target's tokens are in.
    told, whole = SuffixDrafter(), SuffixDrafter()
    body = [5, 6, 7, 8, 9, 10, 11, 12]
    prompt = body + [1] + body[:2] + [3, 4] + body[:3] + [2] + body[:2]
    key = SessionKey(A, "s")
    for d in (told, whole):
        d.begin_call(key, prompt)
    assert told.offered(key) is None  # nothing proposed yet
    spared = 0
    for emitted in ([7, 8, 9], [70], [10, 11, 12, 1], [5], [6, 2, 5, 6]):
        short = told.propose(key, 32, min_chance=0.3)
        full = whole.propose(key, 32)
        offered = told.offered(key)
        assert (offered.token_ids, offered.parents, offered.probs, offered.match_len) == (
            full.token_ids, full.parents, full.probs, full.match_len)
        assert offered.token_ids[: len(short)] == short.token_ids
        assert len(offered) == len(short) + short.left_out
        spared += short.left_out
        for d in (told, whole):
            d.accept(key, emitted)
        assert told.offered(key) is None
    assert spared > 0
    told.propose(key, 32, min_chance=0.3)
    assert told.propose(key, 0) == DraftTree() and told.offered(key) is None  # a step that drafted nothing
    told.propose(key, 32, min_chance=0.3)
    told.begin_call(key, prompt + [9, 9])
    assert told.offered(key) is None  # a new call: the last call's tree is no offer
    assert PromptLookupDrafter().offered(key) is None  # a drafter that keeps no tree offers none


def test_a_hybrid_told_the_cut_merges_the_leaders_whole_tree_without_growing_it_again():
    from quickdraft.suffix_cache.hybrid import HybridDrafter

    class Counted(SuffixDrafter):
        def __init__(self, offers: bool = True) -> None:
            super().__init__()
            self.proposals, self.offers = 0, offers

        def propose(self, key, budget, min_chance=0.0):
            self.proposals += 1
            return super().propose(key, budget, min_chance)

        def offered(self, key):
            return super().offered(key) if self.offers else None

    # fill_below=100: the stand-ins are asked every step, so the leader's whole tree is merged every
    # step. A hybrid told the threshold merges what one asked for whole trees merges, and asks its
    # leader once a step; a leader that keeps no tree is asked again where it left nodes out.
    leaders = [Counted(), Counted(), Counted(offers=False)]
    whole, told, old = (HybridDrafter([lead, StandDrafter(), AdedDrafter()], fill_below=100) for lead in leaders)
    body = [5, 6, 7, 8, 9, 10, 11, 12]
    prompt = body + [1] + body[:2] + [3, 4] + body[:3] + [2] + body[:2]
    key = SessionKey(A, "s")
    for d in (whole, told, old):
        d.begin_call(key, prompt)
    steps = 0
    for emitted in ([7, 8, 9], [70], [10, 11, 12, 1], [5], [6, 2, 5, 6]):
        trees = [whole.propose(key, 32), told.propose(key, 32, min_chance=0.3), old.propose(key, 32, min_chance=0.3)]
        assert len({(tuple(t.token_ids), tuple(t.parents), tuple(t.probs)) for t in trees}) == 1
        assert trees[0].token_ids
        for d in (whole, told, old):
            d.accept(key, emitted)
        steps += 1
    assert leaders[0].proposals == leaders[1].proposals == steps < leaders[2].proposals


def test_oracle_replay_still_calls_a_drafter_written_for_the_two_argument_propose():
    from conftest import trace_files

    from quickdraft.bench.oracle_replay import replay_oracle
    from quickdraft.suffix_cache.base import takes_min_chance

    class OldStyle(PromptLookupDrafter):  # a third-party drafter that predates min_chance
        def propose(self, key, budget):
            return super().propose(key, budget)

    class KeywordOnly(PromptLookupDrafter):
        def propose(self, key, budget, *, min_chance=0.0):
            return super().propose(key, budget)

    class OtherThird(PromptLookupDrafter):  # a third argument that is not the threshold
        def propose(self, key, budget, verbose=False):
            return super().propose(key, budget)

    assert all(takes_min_chance(make_drafter(name)) for name in DRAFTERS)
    assert takes_min_chance(KeywordOnly()) and not takes_min_chance(OldStyle())
    assert not takes_min_chance(OtherThird())
    file = trace_files(1)[0]
    old = replay_oracle([file], "pld", drafter=OldStyle(), progress=False)
    new = replay_oracle([file], "pld", progress=False)
    assert old.steps > 0 and old.tokens_per_step == new.tokens_per_step
    # A hybrid led by such a drafter asks it the old way too.
    from quickdraft.suffix_cache.hybrid import HybridDrafter

    assert replay_oracle([file], "hybrid", drafter=HybridDrafter([OldStyle()]), progress=False).steps == old.steps


def test_a_proxy_holds_and_teaches_each_tenant_state_once():
    # The hybrid's members are the proxy's suffix, STAND and ADED drafters themselves: a response is
    # indexed once per tenant, not once for each drafter and again inside the hybrid.
    from test_prior_text import _service

    service, vocabulary = _service("none")
    d = service.drafters
    assert d["hybrid"].members == [d["suffix"], d["stand"], d["aded"]]
    scope = Scope("default", vocabulary)
    service._learn_remote(scope, [1, 2, 3, 4])  # another replica's response
    assert d["suffix"].responses(scope).tokens == [1, 2, 3, 4]
    key = SessionKey(scope, "s")
    d["hybrid"].begin_call(key, [1, 2])
    d["hybrid"].accept(key, [5, 6])
    d["hybrid"].end_call(key)  # the hybrid's parts learn the call here ...
    service._share(d["hybrid"], key, [5, 6])  # ... so sharing it teaches only the others
    assert d["suffix"].responses(scope).tokens == [1, 2, 3, 4, -1, 5, 6]
    d["suffix"].begin_call(key, [5])
    assert d["suffix"].propose(key, 8).token_ids[:1] == [6]
    # Stored state: the suffix drafter's calibration once, under its own name.
    assert "hybrid" not in service._export_state(scope)


def test_the_proxy_reports_each_drafters_learned_memory_once():
    import re

    from test_prior_text import _service

    service, vocabulary = _service("none")
    scope = Scope("default", vocabulary)

    def reported() -> dict[str, float]:
        text = service.metrics.render().decode()
        series = re.finditer(r'quickdraft_drafting_state_bytes\{drafter="(\w+)"\} (\S+)', text)
        return {m[1]: float(m[2]) for m in series}

    before = reported()
    assert set(before) == {"suffix", "stand", "aded", "pld"}  # the hybrid's are these
    for i in range(50):
        service._learn_remote(scope, list(range(i, i + 200)))
    after = reported()
    assert all(after[name] > before[name] for name in ("suffix", "stand", "aded"))
    assert after["suffix"] == service.drafters["suffix"].memory_bytes() > 200 * 50 * 4
    # Prompt lookup learns nothing per tenant: only its sessions' histories, 5-gram tables included.
    assert after["pld"] == before["pld"]
    service.drafters["pld"].begin_call(SessionKey(scope, "s"), list(range(1000, 11000)))
    assert reported()["pld"] - after["pld"] > 10000 * (28 + 8 + 80)


def test_an_evicted_session_is_forgotten_under_every_vocabulary_it_drafted_in():
    """Even one whose model no worker serves any more (a worker redeployed with another model):
    its drafter state would otherwise stay for the life of the proxy."""
    from test_prior_text import _service

    from quickdraft.proxy.sessions import Session

    service, vocabulary = _service("none")
    session = Session("default", "old", "k")
    session.tokenizers = {vocabulary, "tok-of-a-model-gone"}
    keys = [SessionKey(Scope("default", tokenizer), "old") for tokenizer in session.tokenizers]
    for key in keys:
        service.drafters["suffix"].begin_call(key, [1, 2, 3])
    assert all(service.drafters["suffix"].session_tokens(key) == [1, 2, 3] for key in keys)
    service._forget(session)
    assert all(service.drafters["suffix"].session_tokens(key) == [] for key in keys)
