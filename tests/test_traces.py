"""Reading agent trajectories: mini-swe-agent's and SWE-agent's files, tool calls, content parts."""

import json

import pytest
from test_cli_and_replay import ORACLE_KEYS, quickdraft

from quickdraft.bench.traces import message_text, trajectory_calls, trajectory_files, trajectory_name

SYSTEM = {"role": "system", "content": "You are a coding agent."}
TASK = {"role": "user", "content": "Fix the bug in utils.py"}


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_a_mini_swe_agent_trajectory_yields_one_call_per_assistant_message(tmp_path):
    file = write(tmp_path / "repo__issue-1.traj.json", {"messages": [
        SYSTEM, TASK,
        {"role": "assistant", "content": "THOUGHT: look\n\n```bash\nls\n```", "extra": {"response": {}}},
        {"role": "user", "content": "utils.py"},
        {"role": "assistant", "content": "THOUGHT: read it\n\n```bash\ncat utils.py\n```"},
    ]})
    calls = list(trajectory_calls(file))
    assert [c.index for c in calls] == [2, 4]
    assert calls[0].trajectory == "repo__issue-1"
    assert calls[1].messages[2] == {"role": "assistant", "content": "THOUGHT: look\n\n```bash\nls\n```"}
    assert calls[1].response.endswith("cat utils.py\n```")


def test_content_parts_and_tool_calls_become_text():
    assert message_text({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) \
        == "ab"
    assert message_text({"role": "assistant", "content": None}) == ""
    call = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{\"command\": \"ls\"}"}}
    text = message_text({"role": "assistant", "content": "Listing.", "tool_calls": [call]})
    assert text.splitlines()[0] == "Listing."
    # Written as the HTTP endpoint writes an earlier call, so replayed prompts are the ones it would send.
    assert text.split("\n", 1)[1] == '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call>'


def test_a_tool_calling_trajectory_replays_its_calls(tmp_path):
    """An agent that answers with tool calls (content null) and gets `tool` messages back."""
    call = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{\"command\": \"ls -la\"}"}}
    messages = [SYSTEM, TASK]
    for i in range(3):
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "c1", "content": f"total {i}\nutils.py"}]
    file = write(tmp_path / "agent-run.traj.json", {"messages": messages})
    calls = list(trajectory_calls(file))
    assert len(calls) == 3 and all("ls -la" in c.response for c in calls)
    assert calls[2].messages[-1] == {"role": "tool", "content": "total 1\nutils.py"}
    out = tmp_path / "out.json"
    done = quickdraft("replay", str(file), "--oracle", "--json", str(out))
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert ORACLE_KEYS <= set(figures) and figures["calls"] == 3
    # The same call repeated: the later ones are drafted from the earlier ones.
    assert figures["tokens_per_step"] > 1.5


def test_swe_agent_history_files_are_found_beside_mini_swe_agent_ones(tmp_path):
    write(tmp_path / "b.traj", {"history": [SYSTEM, TASK, {"role": "assistant", "content": "ls", "agent": "main"}],
                                "trajectory": []})
    write(tmp_path / "a.traj.json", {"messages": [SYSTEM, TASK, {"role": "assistant", "content": "pwd"}]})
    (tmp_path / "notes.json").write_text("{}")
    files = trajectory_files([tmp_path])
    assert [f.name for f in files] == ["a.traj.json", "b.traj"]
    assert [trajectory_name(f) for f in files] == ["a", "b"]
    assert [c.response for f in files for c in trajectory_calls(f)] == ["pwd", "ls"]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"info": {}}), json.dumps([1, 2])])
def test_a_file_that_is_not_a_trajectory_is_named_in_a_clear_error(tmp_path, content):
    bad = tmp_path / "broken.traj.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match="broken.traj.json"):
        list(trajectory_calls(bad))
    done = quickdraft("replay", str(tmp_path), "--oracle", env={"COLUMNS": "300"})
    assert done.returncode == 2
    assert "broken.traj.json" in done.stderr and "Traceback" not in done.stderr


def test_a_folder_without_trajectories_is_a_clear_error(tmp_path):
    done = quickdraft("replay", str(tmp_path), "--oracle", env={"COLUMNS": "300"})
    assert done.returncode == 2 and "no .traj.json or .traj files" in done.stderr


def test_the_anchor_runs_on_the_prompts_quickdraft_replays():
    # bench/anchor_any_tokenizer.py hands the anchor's replay QuickDraft's own rendering, so a
    # comparison on Gemma 3's vocabulary (no chat template) sees the same prompts on both sides.
    from quickdraft.bench.anchor_any_tokenizer import _tokenizer, anchor_dir
    from quickdraft.catalog import chat_prompt_ids, load_tokenizer

    assert (anchor_dir() / "anchor_replay.py").is_file()
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "List the files."},
                {"role": "assistant", "content": "THOUGHT: I will list them.\n\n```bash\nls\n```"},
                {"role": "user", "content": "<returncode>0</returncode>"}]
    for name in ("smollm2-135m", "gemma3-270m"):
        tok = _tokenizer(name)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert ids == chat_prompt_ids(load_tokenizer(name), messages, True)
    gemma = tok.decode(ids)
    assert gemma.count("<start_of_turn>") == 4 and gemma.endswith("<start_of_turn>model\n")


def test_a_trajectory_rewritten_as_json_tool_calls_keeps_its_calls(tmp_path):
    from quickdraft.bench.tool_call_traces import as_tool_calls, rewrite

    answer = 'THOUGHT: Write the file.\n\n```bash\ncat <<\'EOF\' > a.py\nprint("hi")\nEOF\n```'
    rewritten = as_tool_calls(answer)
    prose, call = rewritten.split("\n<tool_call>\n")
    assert prose == "Write the file." and call.endswith("\n</tool_call>")
    assert json.loads(call.removesuffix("\n</tool_call>")) == {
        "name": "bash", "arguments": {"command": 'cat <<\'EOF\' > a.py\nprint("hi")\nEOF'}}
    assert '\\"hi\\"' in call  # quotes (and newlines) JSON-escaped, as a tool-calling model writes them
    # Only ```bash fences are commands (mini-swe-agent's rule): a ```python snippet stays prose.
    snippet = "THOUGHT: The fix:\n```python\nx = 1\n```\nNow apply it.\n\n```bash\nsed -i s/0/1/ a.py\n```"
    prose, call = as_tool_calls(snippet).split("\n<tool_call>\n")
    assert prose == "The fix:\n```python\nx = 1\n```\nNow apply it."
    assert json.loads(call.removesuffix("\n</tool_call>"))["arguments"] == {"command": "sed -i s/0/1/ a.py"}
    source = write(tmp_path / "r.traj.json", {"messages": [
        SYSTEM, TASK, {"role": "assistant", "content": answer},
        {"role": "user", "content": "<returncode>0</returncode>"}, {"role": "assistant", "content": answer}]})
    [out] = rewrite([source], tmp_path / "out")
    calls = list(trajectory_calls(out))
    assert [c.response for c in calls] == [rewritten, rewritten]
    assert calls[1].messages[:2] == [SYSTEM, TASK]
