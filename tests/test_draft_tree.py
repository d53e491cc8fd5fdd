import pytest
from hypothesis import given
from hypothesis import strategies as st

from quickdraft.suffix_cache.draft import DraftTree


def test_path_is_a_chain():
    tree = DraftTree.path([5, 6, 7])
    assert tree.parents == [-1, 0, 1]
    tree.validate()
    assert tree.depth() == 3


def test_longest_accepted_follows_the_matching_branch():
    # root -> 1 -> 2 -> 3 ; root -> 1 -> 4 ; root -> 9
    tree = DraftTree([1, 2, 3, 4, 9], [-1, 0, 1, 0, -1], [1.0] * 5)
    assert tree.longest_accepted([1, 4, 8]) == [0, 3]
    assert tree.longest_accepted([1, 2, 3, 7]) == [0, 1, 2]
    assert tree.longest_accepted([9]) == [4]
    assert tree.longest_accepted([8]) == []


@pytest.mark.parametrize(
    "tokens,parents,msg",
    [
        ([1, 2], [-1], "differ in length"),
        ([1, 2], [-1, 1], "parents must precede"),
        ([1, 1], [-1, -1], "duplicates a sibling"),
        ([-3], [-1], "outside the vocabulary"),
    ],
)
def test_validate_rejects_malformed_trees(tokens, parents, msg):
    with pytest.raises(ValueError, match=msg):
        DraftTree(tokens, parents).validate()


def test_pruned_to_depth_reindexes_parents():
    tree = DraftTree([1, 2, 3, 4, 5], [-1, 0, 1, -1, 3], [0.9, 0.8, 0.7, 0.2, 0.1])
    pruned = tree.pruned_to_depth(1)
    assert pruned.token_ids == [1, 4] and pruned.parents == [-1, -1]
    pruned2 = tree.pruned_to_depth(2)
    assert pruned2.token_ids == [1, 2, 4, 5] and pruned2.parents == [-1, 0, -1, 2]
    pruned2.validate()


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(-1, 30)), max_size=40), st.integers(0, 5))
def test_pruning_and_truncation_keep_trees_valid(nodes, depth):
    tokens, parents, seen = [], [], set()
    for tok, parent in nodes:
        parent = min(parent, len(tokens) - 1)
        if (parent, tok) in seen:
            continue
        seen.add((parent, tok))
        tokens.append(tok)
        parents.append(parent)
    tree = DraftTree(tokens, parents, [1.0] * len(tokens))
    tree.validate()
    tree.pruned_to_depth(depth).validate()
    assert tree.pruned_to_depth(depth).depth() <= depth
    tree.truncated(depth).validate()


def test_judged_settles_sent_and_unsent_nodes_alike():
    # 5 (0.5) -> 7 (0.4) -> 8 (0.3), and 6 (0.3) beside 5.
    tree = DraftTree([5, 6, 7, 8], [-1, -1, 0, 2], [0.5, 0.3, 0.4, 0.3])
    assert tree.judged([5, 7, 9]) == (pytest.approx(1.5), 2)   # 8 departs at depth 3
    assert tree.judged([5]) == (pytest.approx(0.8), 1)         # 7 and 8 follow 5 deeper: undecided
    assert tree.judged([6]) == (pytest.approx(1.5), 1)         # under a rejected 5, 7 and 8 are rejected
    assert DraftTree().judged([1, 2]) == (0.0, 0)


def test_what_a_drafter_left_out_stays_counted_through_truncation_pruning_and_the_budget_cut():
    from quickdraft.suffix_cache.budget import MeanBudget

    # The count of nodes a drafter did not hand over (their chance under the caller's threshold)
    # stays with the tree whatever cut it goes through, so the field never understates them.
    tree = DraftTree([1, 2, 3, 4], [-1, 0, 1, -1], [0.9, 0.8, 0.7, 0.6], match_len=3, left_out=5)
    assert tree.truncated(2).left_out == 5
    assert tree.pruned_to_depth(2).left_out == 5
    assert tree.pruned_to_depth(2).token_ids == [1, 2, 4]
    budget = MeanBudget(mean=8, threshold=0.65)
    assert budget.cut(tree).left_out == 5  # a prefix above the threshold
    mixed = DraftTree([1, 2, 3], [-1, -1, 0], [0.9, 0.1, 0.8], left_out=2)
    assert budget.cut(mixed).token_ids == [1, 3] and budget.cut(mixed).left_out == 2  # re-indexed
