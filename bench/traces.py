"""Agent trajectories (mini-swe-agent ``.traj.json``; SWE-agent ``.traj``) as a stream of model calls."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quickdraft.catalog import cache_root, chat_prompt_ids
from quickdraft.proto.messages import tool_call_text


@dataclass(frozen=True, slots=True)
class TraceCall:
    trajectory: str            # file stem, used as the session id
    index: int                 # position of the assistant message in the trajectory
    messages: list[dict[str, str]]  # the prompt: every message before it
    response: str              # what the agent's model answered


def find_shared(relative: str, directory: bool = False) -> pathlib.Path | None:
    """The file (or, with ``directory``, the folder) ``shared/RELATIVE`` beside the checkout (or
    beside the current folder), else in the workspace's shared folder; None if there is none."""
    here = pathlib.Path(__file__).resolve()
    for parent in (*here.parents, *pathlib.Path.cwd().parents, pathlib.Path("/work")):
        candidate = parent / "shared" / relative
        if candidate.is_dir() if directory else candidate.is_file():
            return candidate
    return None


def default_traces_dir() -> pathlib.Path:
    """The development traces: $QUICKDRAFT_TRACES, else ``shared/traces/swebench-dev`` (``find_shared``)."""
    if os.environ.get("QUICKDRAFT_TRACES"):
        return pathlib.Path(os.environ["QUICKDRAFT_TRACES"])
    found = find_shared("traces/swebench-dev", directory=True)
    if found is None:
        raise FileNotFoundError("no trace folder found: set QUICKDRAFT_TRACES to a folder of .traj.json files")
    return found


SUFFIXES = (".traj.json", ".traj")  # mini-swe-agent; SWE-agent


def trajectory_files(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
    """Trajectory files (``.traj.json``, ``.traj``) named directly or found in folders, in sorted
    file-name order."""
    files: list[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw)
        if path.is_dir():
            for suffix in SUFFIXES:
                files.extend(path.glob(f"*{suffix}"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no trajectory file or folder at {path}")
    return sorted(set(files), key=lambda p: (p.name, str(p)))


# Bumped whenever ``message_text`` writes a message differently: cached tokens are keyed by it.
RENDERING = 2


def message_text(message: dict[str, Any]) -> str:
    """What a message says, as text: its content (a string, or OpenAI-style parts whose text parts
    are joined), followed by the tool calls an assistant made, written as the proxy's HTTP endpoint writes them."""
    content = message.get("content")
    if isinstance(content, list):
        text = "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    else:
        text = "" if content is None else str(content)
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function", call) if isinstance(call, dict) else {}
        calls.append(tool_call_text(function.get("name"), function.get("arguments")))
    return "\n".join(part for part in (text, *calls) if part)


def trajectory_messages(file: pathlib.Path) -> list[dict[str, str]]:
    """The conversation of one trajectory: mini-swe-agent's ``messages``, SWE-agent's ``history``,
    or a bare list of messages; each reduced to its role and text."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a readable JSON trajectory ({exc})") from exc
    raw = data if isinstance(data, list) else data.get("messages", data.get("history")) \
        if isinstance(data, dict) else None
    if not isinstance(raw, list) or not all(isinstance(m, dict) and "role" in m for m in raw):
        raise ValueError(f"{file}: no conversation found (expected a list of messages with a 'role' under "
                         "'messages', as mini-swe-agent writes, or 'history', as SWE-agent does)")
    return [{"role": str(m["role"]), "content": message_text(m)} for m in raw]


def trajectory_name(file: pathlib.Path) -> str:
    """The file's name without its trajectory suffix: the session id its calls are replayed under."""
    return next((file.name.removesuffix(s) for s in SUFFIXES if file.name.endswith(s)), file.stem)


def trajectory_calls(file: pathlib.Path) -> Iterator[TraceCall]:
    messages = trajectory_messages(file)
    stem = trajectory_name(file)
    for i, msg in enumerate(messages):
        if i == 0 or msg["role"] != "assistant" or not msg["content"]:
            continue
        yield TraceCall(stem, i, messages[:i], msg["content"])


def all_calls(paths: Sequence[str | pathlib.Path]) -> Iterator[TraceCall]:
    for file in trajectory_files(paths):
        yield from trajectory_calls(file)


def tokenized_calls(file: pathlib.Path, tok, tok_id: str) -> list[tuple[str, list[int], list[int]]]:
    """(session id, prompt ids, response ids) of each call, cached on disk by file content.

    Rendering the chat template over whole conversations dominates a replay's wall
    time, and replays are repeated often; prompts are stored as (tokens kept from
    the previous prompt, new tail) since each call's prompt extends the last.
    """
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:24]
    cached = cache_root() / "replay" / tok_id / f"{digest}-r{RENDERING}.npz"
    if cached.exists():
        data = np.load(cached)
        keeps, tails, t_off = data["keeps"], data["tails"], data["tail_offsets"]
        resps, r_off, sessions = data["responses"], data["response_offsets"], data["sessions"]
        out, prompt = [], []
        for i, keep in enumerate(keeps.tolist()):
            prompt = prompt[:keep] + tails[t_off[i]:t_off[i + 1]].tolist()
            out.append((str(sessions[i]), prompt, resps[r_off[i]:r_off[i + 1]].tolist()))
        return out
    out = []
    for call in trajectory_calls(file):
        response = tok.encode(call.response, add_special_tokens=False)
        if response:
            out.append((call.trajectory, chat_prompt_ids(tok, call.messages), response))
    keeps, tails, resps, prev = [], [], [], []
    for _, prompt, response in out:
        keep = 0
        while keep < min(len(prev), len(prompt)) and prev[keep] == prompt[keep]:
            keep += 1
        keeps.append(keep)
        tails.append(prompt[keep:])
        resps.append(response)
        prev = prompt
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp, keeps=np.array(keeps, np.int64), sessions=np.array([c[0] for c in out]),
        tails=np.array([t for tail in tails for t in tail], np.int32),
        tail_offsets=np.cumsum([0] + [len(t) for t in tails]),
        responses=np.array([t for r in resps for t in r], np.int32),
        response_offsets=np.cumsum([0] + [len(r) for r in resps]),
    )
    tmp.replace(cached)
    return out
