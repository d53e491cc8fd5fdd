"""bench/model_draft_bound.py: the oracle replay with a model's greedy chain beside the drafter."""

import json

import pytest

from quickdraft.bench.model_draft_bound import (
    Guesses,
    load_calls,
    load_or_compute_guesses,
    replay_with_chain,
)
from quickdraft.bench.oracle_replay import replay_oracle

ANSWERS = ["THOUGHT: Look at the helper first.\n\n```bash\ncat src/helpers/strings.py | head -n 40\n```",
           "THOUGHT: The helper trims the wrong end of the string; I will fix it with sed.\n\n```bash\n"
           "sed -i 's/rstrip/lstrip/' src/helpers/strings.py\n```"]


def _write(path, task):
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": f"Fix the bug in src/helpers/strings.py ({task})"}]
    for i in range(4):
        messages += [{"role": "assistant", "content": ANSWERS[i % 2]},
                     {"role": "user", "content": f"<returncode>0</returncode>\n<output>line {i}</output>"}]
    path.write_text(json.dumps({"messages": messages}))
    return path


@pytest.fixture
def trajectory(tmp_path):
    return _write(tmp_path / "run.traj.json", "first")


def _none(calls, chance=0.0):
    return [Guesses([-1] * len(c.response), [chance] * len(c.response)) for c in calls]


def _perfect(calls, chance=1.0):
    return [Guesses(list(c.response), [chance] * len(c.response)) for c in calls]


@pytest.mark.parametrize("drafter", ["suffix", "hybrid"])
def test_without_a_chain_the_loop_is_the_oracle_replay_session_ends_included(tmp_path, drafter):
    files = [_write(tmp_path / "a.traj.json", "first"), _write(tmp_path / "b.traj.json", "second")]
    calls = load_calls(files, "smollm2-135m")
    plain = replay_oracle(files, drafter, progress=False)
    row = replay_with_chain(calls, _none(calls), chain=0, drafter_name=drafter)
    assert (row.tokens_per_step, row.drafted_per_step) == (plain.tokens_per_step, plain.drafted_per_step)
    assert row.chain_longer == 0 and row.drafter_budget == 8
    # Joined by chance, guesses the model gives no chance are cut: the drafter's steps alone.
    joint = replay_with_chain(calls, _none(calls), chain=8, drafter_name=drafter, joint=True)
    assert (joint.tokens_per_step, joint.drafted_per_step) == (plain.tokens_per_step, plain.drafted_per_step)


def test_a_chain_that_always_guesses_right_accepts_its_whole_depth(trajectory):
    calls = load_calls([trajectory], "smollm2-135m")
    right, useless = replay_with_chain(calls, _perfect(calls), chain=4), replay_with_chain(calls, _none(calls), chain=4)
    assert right.tokens_per_step >= 4.5 > useless.tokens_per_step  # 5 a step, less at each response's end
    assert useless.chain_longer == 0 and right.chain_longer > 0
    assert right.drafter_budget == 4 and right.drafted_per_step >= 4  # the chain's 4 nodes count every step
    with pytest.raises(ValueError, match="no room"):
        replay_with_chain(calls, _perfect(calls), chain=8)
    # Joined by chance, a sure and right chain is sent whole (a run this short cannot steer the
    # budget's threshold to its mean, so the nodes sent are not checked here).
    joint = replay_with_chain(calls, _perfect(calls), chain=6, joint=True)
    assert joint.tokens_per_step > 6.0 > right.tokens_per_step


def test_joined_by_chance_a_sure_but_wrong_chain_crowds_out_the_copy(trajectory):
    # The ranking is by chance: a model sure of wrong guesses takes the budget from the copy.
    calls = load_calls([trajectory], "smollm2-135m")
    plain = replay_with_chain(calls, _none(calls), chain=0)
    sure_wrong = replay_with_chain(calls, _none(calls, chance=0.99), chain=8, joint=True)
    assert sure_wrong.tokens_per_step < plain.tokens_per_step


def test_kept_guesses_are_refused_for_other_calls_or_options(trajectory, tmp_path):
    calls = load_calls([trajectory], "smollm2-135m")
    kept = tmp_path / "guesses.json"
    kept.write_text(json.dumps({"fingerprint": "from another run", "guesses": []}))
    with pytest.raises(ValueError, match="other calls, another model or another window"):
        load_or_compute_guesses(calls, "smollm2-135m", 512, kept, progress=False)


@pytest.mark.model
def test_the_real_models_greedy_guesses_cover_every_response_token_and_copy_what_it_has_read(trajectory, tmp_path):
    calls = load_calls([trajectory], "smollm2-135m")
    kept = tmp_path / "guesses.json"
    guesses = load_or_compute_guesses(calls, "smollm2-135m", 512, kept, progress=False)
    assert [len(g.tokens) for g in guesses] == [len(g.probs) for g in guesses] == [len(c.response) for c in calls]
    assert all(0.0 < p <= 1.0 for g in guesses for p in g.probs)
    # The third and fourth answers repeat the first two, which the window holds: the model copies.
    late = [(g, c.response) for g, c in zip(guesses[2:], calls[2:], strict=True)]
    hits = sum(a == b for g, r in late for a, b in zip(g.tokens, r, strict=True)) / sum(len(r) for _, r in late)
    assert hits > 0.5
    # Kept: a second run reads the same guesses instead of running the model; another window's are refused.
    assert load_or_compute_guesses(calls, "smollm2-135m", 512, kept, progress=False) == guesses
    with pytest.raises(ValueError):
        load_or_compute_guesses(calls, "smollm2-135m", 256, kept, progress=False)
    plain = replay_with_chain(calls, guesses, chain=0)
    joint = replay_with_chain(calls, guesses, chain=8, joint=True)
    assert joint.tokens_per_step > plain.tokens_per_step  # the copying model adds to the copy
