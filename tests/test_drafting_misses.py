"""bench/drafting_misses.py: the oracle replay's steps split by kind of text and context match."""

import json

from quickdraft.bench.drafting_misses import MATCH_BANDS, measure
from quickdraft.bench.oracle_replay import replay_oracle

ANSWER = "THOUGHT: Look at the helper first.\n\n```bash\ncat src/helpers/strings.py | head -n 40\n```"


def test_the_steps_are_split_by_text_and_match_and_the_misses_explained(tmp_path):
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "Fix the bug in src/helpers/strings.py"}]
    for i in range(4):
        messages += [{"role": "assistant", "content": ANSWER},
                     {"role": "user", "content": f"<returncode>0</returncode>\n<output>line {i}</output>"}]
    file = tmp_path / "run.traj.json"
    file.write_text(json.dumps({"messages": messages}))
    report = measure([file], "suffix", examples=3).to_dict()
    steps = report["steps"]
    assert steps > 0
    by_text, by_match = report["by_text"], report["by_context_match"]
    assert set(by_match) == set(MATCH_BANDS)
    for split in (by_text, by_match):
        assert abs(sum(t["share_of_steps"] for t in split.values()) - 1.0) < 1e-3
    # The command inside the fence is code, THOUGHT prose; the repeated answers are copies.
    assert by_text["code"]["share_of_steps"] > 0 and by_text["prose"]["share_of_steps"] > 0
    # The same steps as the oracle replay's.
    assert report["all"]["tokens_per_step"] == replay_oracle([file], "suffix", progress=False).tokens_per_step > 2.0
    # The first answer is new text: steps that accept nothing, sampled with their context.
    assert 0 < report["all"]["accepted_nothing"] < 1
    assert 0 < len(report["examples"]) <= 3
    assert all({"context", "next", "match", "offered"} <= set(e) for e in report["examples"])
