"""Tree acceptance: greedy equals argmax decoding; sampling keeps the target's distribution."""

import torch

from quickdraft.verifiers.tree_verify import Sampling, accept_walk, processed_probs, tree_inputs

# Root row 0, then one row per draft node: node j's distribution is logits[1 + j].
LOGITS = torch.tensor([
    [2.0, 0.5, 1.5, -1.0, 1.0, 0.0],   # root
    [0.1, 0.2, 2.5, 0.0, -0.5, 1.0],   # after node 0 (token 0)
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],    # after node 1 (token 2)
    [0.0, 3.0, 0.0, 0.0, 0.0, 0.0],    # after node 2 (token 4)
])
TOKENS = [0, 2, 4]
PARENTS = [-1, -1, 0]  # root -> 0, root -> 2, 0 -> 4


def chi_square(counts, probs, n):
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True) if p > 0)


def test_greedy_walk_follows_argmax():
    emitted, accepted, rows = accept_walk(LOGITS, TOKENS, PARENTS, Sampling())
    assert emitted == [0, 2] and accepted == [0] and rows == [0, 1]


def test_a_temperature_too_small_to_divide_by_is_greedy():
    # Logits / 1e-40 overflow fp32 to inf, and the probabilities to NaN; below 1e-5 the worker decodes greedily.
    assert torch.isnan(torch.softmax(LOGITS[0] / 1e-40, -1)).any()
    for temperature in (1e-40, 1e-6):
        assert Sampling(temperature=temperature).greedy
        emitted, accepted, rows = accept_walk(LOGITS, TOKENS, PARENTS, Sampling(temperature=temperature))
        assert emitted == [0, 2] and accepted == [0] and rows == [0, 1]
    assert not Sampling(temperature=1e-4).greedy


def test_sampling_through_a_tree_keeps_the_target_distribution():
    sampling = Sampling(temperature=0.8, top_p=0.95)
    n = 20000
    first = [0] * 6
    second_after_0 = [0] * 6
    for seed in range(n):
        emitted, _, _ = accept_walk(LOGITS, TOKENS, PARENTS, sampling, seed=seed, position=100)
        first[emitted[0]] += 1
        if emitted[0] == 0:
            second_after_0[emitted[1]] += 1
    p_first = processed_probs(LOGITS[0], sampling).tolist()
    p_second = processed_probs(LOGITS[1], sampling).tolist()
    # Critical chi-square values at p = 0.001: 5 degrees of freedom 20.5.
    assert chi_square(first, p_first, n) < 20.5
    assert chi_square(second_after_0, p_second, sum(second_after_0)) < 20.5


def test_a_seeded_position_draws_the_same_token_with_or_without_a_draft():
    sampling = Sampling(temperature=1.0)
    for seed in range(200):
        with_draft, _, _ = accept_walk(LOGITS, TOKENS, PARENTS, sampling, seed=seed, position=7)
        without, _, _ = accept_walk(LOGITS[:1], [], [], sampling, seed=seed, position=7)
        assert with_draft[0] == without[0]


def test_tree_mask_lets_nodes_see_only_their_ancestors():
    pos, mask = tree_inputs(past=3, n_new=2, parents=PARENTS, device=torch.device("cpu"))
    assert pos.tolist() == [[3, 4, 5, 5, 6]]
    m = mask[0, 0].int().tolist()
    assert m[0] == [1, 1, 1, 1, 0, 0, 0, 0]        # new token 0: past + itself
    assert m[2] == [1, 1, 1, 1, 1, 1, 0, 0]        # node 0: past, new tokens, itself
    assert m[3] == [1, 1, 1, 1, 1, 0, 1, 0]        # node 1: not node 0 (a sibling)
    assert m[4] == [1, 1, 1, 1, 1, 1, 0, 1]        # node 2: its parent node 0 and itself
