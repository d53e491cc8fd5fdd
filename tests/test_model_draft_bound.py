"""bench/model_draft_bound.py: the oracle replay with a model's greedy chain beside the drafter."""

import json

import pytest

from quickdraft.bench.model_draft_bound import Guesses, greedy_guesses, load_calls, replay_with_chain
from quickdraft.bench.oracle_replay import replay_oracle

ANSWERS = ["THOUGHT: Look at the helper first.\n\n```bash\ncat src/helpers/strings.py | head -n 40\n```",
           "THOUGHT: The helper trims the wrong end of the string; I will fix it with sed.\n\n```bash\n"
           "sed -i 's/rstrip/lstrip/' src/helpers/strings.py\n```"]


@pytest.fixture
def trajectory(tmp_path):
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "Fix the bug in src/helpers/strings.py"}]
    for i in range(4):
        messages += [{"role": "assistant", "content": ANSWERS[i % 2]},
                     {"role": "user", "content": f"<returncode>0</returncode>\n<output>line {i}</output>"}]
    file = tmp_path / "run.traj.json"
    file.write_text(json.dumps({"messages": messages}))
    return file


def test_without_a_chain_the_loop_is_the_oracle_replay(trajectory):
    calls = load_calls([trajectory], "smollm2-135m")
    wrong = [Guesses([-1] * len(c.response), [0.0] * len(c.response)) for c in calls]
    plain = replay_oracle([trajectory], "suffix", progress=False).tokens_per_step
    row = replay_with_chain(calls, wrong, chain=0)
    assert row.tokens_per_step == plain
    assert row.chain_longer == 0 and row.drafter_budget == 8
    # Joined by chance, guesses the model gives no chance are cut: the drafter's steps alone.
    joint = replay_with_chain(calls, wrong, chain=8, joint=True)
    assert joint.tokens_per_step == plain and joint.drafted_per_step == row.drafted_per_step


def test_a_chain_that_always_guesses_right_accepts_its_whole_depth(trajectory):
    calls = load_calls([trajectory], "smollm2-135m")
    perfect = [Guesses(list(c.response), [1.0] * len(c.response)) for c in calls]
    wrong = [Guesses([-1] * len(c.response), [1.0] * len(c.response)) for c in calls]
    right, useless = replay_with_chain(calls, perfect, chain=4), replay_with_chain(calls, wrong, chain=4)
    assert right.tokens_per_step >= 4.5 > useless.tokens_per_step  # 5 a step, less at each response's end
    assert useless.chain_longer == 0 and right.chain_longer > 0
    with pytest.raises(ValueError, match="no room"):
        replay_with_chain(calls, perfect, chain=8)
    # Joined by chance, a sure and right chain is sent whole (a run this short cannot steer the
    # budget's threshold to its mean, so the nodes sent are not checked here).
    joint = replay_with_chain(calls, perfect, chain=6, joint=True)
    assert joint.tokens_per_step > 6.0 > right.tokens_per_step


def test_the_real_models_greedy_guesses_cover_every_response_token_and_copy_what_it_has_read(trajectory):
    calls = load_calls([trajectory], "smollm2-135m")
    guesses = greedy_guesses(calls, "smollm2-135m", window=512, progress=False)
    assert [len(g.tokens) for g in guesses] == [len(g.probs) for g in guesses] == [len(c.response) for c in calls]
    assert all(0.0 < p <= 1.0 for g in guesses for p in g.probs)
    # The third and fourth answers repeat the first two, which the window holds: the model copies.
    late = [(g, c.response) for g, c in zip(guesses[2:], calls[2:], strict=True)]
    hits = sum(a == b for g, r in late for a, b in zip(g.tokens, r, strict=True)) / sum(len(r) for _, r in late)
    assert hits > 0.5
    row = replay_with_chain(calls, guesses, chain=4)
    assert row.drafted_per_step <= 8.5 and row.tokens_per_step > 1.0
