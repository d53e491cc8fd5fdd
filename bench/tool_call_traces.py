"""Rewrite mini-swe-agent trajectories as a JSON tool-calling agent would have written them, to
check drafting on another output format (bench/RESULTS.md)::

    python -m quickdraft.bench.tool_call_traces ../shared/traces/swebench-dev OUT_DIR

Each assistant message keeps its prose (without mini-swe-agent's ``THOUGHT:``) and its bash blocks
become Hermes-style calls, ``<tool_call>\\n{"name": "bash", "arguments": {"command": ...}}\\n</tool_call>``:
commands and the file bodies they write are JSON-escaped while tool output stays raw, so copies
from the output no longer match byte for byte, as with agents that call tools through JSON. Every
message stays a plain ``content`` string, so the anchor's replay reads the same text.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from collections.abc import Sequence

from quickdraft.bench.traces import trajectory_files, trajectory_messages

# mini-swe-agent's own action pattern: only ```bash fences are commands (a ```python snippet in the
# prose stays prose).
_BASH_BLOCK = re.compile(r"```bash\s*\n(.*?)\n```", re.S)


def as_tool_calls(content: str) -> str:
    """One assistant message, its bash blocks as JSON tool calls after its prose."""
    commands = _BASH_BLOCK.findall(content)
    prose = _BASH_BLOCK.sub("", content).strip().removeprefix("THOUGHT:").strip()
    calls = "".join("\n<tool_call>\n" + json.dumps({"name": "bash", "arguments": {"command": c}}) + "\n</tool_call>"
                    for c in commands)
    return prose + calls


def rewrite(paths: Sequence[str | pathlib.Path], out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Write each trajectory, rewritten, under ``out_dir`` with its file name; returns the files written."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file in trajectory_files(paths):
        messages = [{"role": m["role"], "content": as_tool_calls(m["content"]) if m["role"] == "assistant"
                     else m["content"]} for m in trajectory_messages(file)]
        target = out / file.name
        target.write_text(json.dumps({"messages": messages}))
        written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m quickdraft.bench.tool_call_traces TRACES OUT_DIR")
    print(f"{len(rewrite([sys.argv[1]], sys.argv[2]))} trajectories written to {sys.argv[2]}")
