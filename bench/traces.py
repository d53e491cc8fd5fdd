"""Agent trajectories (mini-swe-agent ``.traj.json``) as a stream of model calls."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TraceCall:
    trajectory: str            # file stem, used as the session id
    index: int                 # position of the assistant message in the trajectory
    messages: list[dict[str, str]]  # the prompt: every message before it
    response: str              # what the agent's model answered


def default_traces_dir() -> pathlib.Path:
    """The development traces: $QUICKDRAFT_TRACES, else ``shared/traces/swebench-dev`` beside
    the checkout (or beside the current folder), else the workspace's shared folder."""
    if os.environ.get("QUICKDRAFT_TRACES"):
        return pathlib.Path(os.environ["QUICKDRAFT_TRACES"])
    here = pathlib.Path(__file__).resolve()
    candidates = [p / "shared" / "traces" / "swebench-dev" for p in (*here.parents, *pathlib.Path.cwd().parents)]
    candidates.append(pathlib.Path("/work/shared/traces/swebench-dev"))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("no trace folder found: set QUICKDRAFT_TRACES to a folder of .traj.json files")


def trajectory_files(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
    """``.traj.json`` files named directly or found in folders, in sorted file-name order."""
    files: list[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw)
        if path.is_dir():
            files.extend(path.glob("*.traj.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no trajectory file or folder at {path}")
    return sorted(set(files), key=lambda p: (p.name, str(p)))


def trajectory_calls(file: pathlib.Path) -> Iterator[TraceCall]:
    data = json.loads(file.read_text())
    messages = [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
    stem = file.name.removesuffix(".traj.json")
    for i, msg in enumerate(messages):
        if i == 0 or msg["role"] != "assistant" or not msg["content"]:
            continue
        yield TraceCall(stem, i, messages[:i], msg["content"])


def all_calls(paths: Sequence[str | pathlib.Path]) -> Iterator[TraceCall]:
    for file in trajectory_files(paths):
        yield from trajectory_calls(file)
