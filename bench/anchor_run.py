"""The SuffixDecoding anchor run beside QuickDraft's own oracle replays, so that a comparison is one
command (``quickdraft bench drafters --anchor``) and its ratio is measured in the same run.

The anchor is ArcticInference 0.3.0's native SuffixDecodingCache, built by
``shared/anchor/build_anchor.sh`` (about a minute, once) into ``$ANCHOR_HOME/lib``
(``~/.cache/quickdraft-anchor/lib`` by default; ``ANCHOR_DIR`` names the folder itself). It runs in
a child process, through ``quickdraft.bench.anchor_any_tokenizer`` (the anchor's own replay with
the catalog's tokenizer), at the best setting MISSION.md names: a tree, factor 2, min p 0.05.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from quickdraft.bench.anchor_any_tokenizer import anchor_dir
from quickdraft.bench.traces import trajectory_files

SETTING = ("--tree", "--spec-factor", "2", "--min-prob", "0.05")


class AnchorError(RuntimeError):
    """The anchor is not built, or its run failed (the message says which, and what to do)."""


def anchor_lib() -> pathlib.Path:
    """The folder holding the anchor's built ``arctic_inference`` package."""
    if os.environ.get("ANCHOR_DIR"):
        lib = pathlib.Path(os.environ["ANCHOR_DIR"])
    else:
        cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
        lib = pathlib.Path(os.environ.get("ANCHOR_HOME") or cache / "quickdraft-anchor") / "lib"
    if not (lib / "arctic_inference" / "suffix_decoding").is_dir():
        try:
            script = f"bash {anchor_dir() / 'build_anchor.sh'}"
        except FileNotFoundError:
            script = "shared/anchor/build_anchor.sh"
        raise AnchorError(f"the SuffixDecoding anchor is not built in {lib}: run `{script}` once "
                          "(about a minute; ANCHOR_HOME moves it)")
    return lib


@dataclass(frozen=True, slots=True)
class AnchorFigures:
    tokens_per_step: float
    drafted_per_step: float
    draft_us_per_step: float  # to speculate plus to update, as QuickDraft's figure counts both
    prepare_ms_per_call: float
    raw: dict[str, Any]


class AnchorRun:
    """The anchor's replay of the same trajectories, started at once in a child process (it takes a
    core of its own); ``figures()`` waits for it."""

    def __init__(self, paths: Sequence[str | pathlib.Path], tokenizer: str = "smollm2-135m") -> None:
        lib = anchor_lib()
        # The anchor's replay reads one folder: the trajectories, named by links in a folder of their own.
        self._folder = tempfile.TemporaryDirectory(prefix="quickdraft-anchor-")
        for file in trajectory_files(paths):
            (pathlib.Path(self._folder.name) / file.name).symlink_to(file.resolve())
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(lib), env.get("PYTHONPATH", "")) if p)
        command = [sys.executable, "-m", "quickdraft.bench.anchor_any_tokenizer", self._folder.name,
                   "--tokenizer", tokenizer, *SETTING]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=env)

    def figures(self) -> AnchorFigures:
        try:
            out, err = self._process.communicate()
        finally:
            self._folder.cleanup()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if self._process.returncode != 0 or not lines:
            tail = "\n".join(err.strip().splitlines()[-8:])
            raise AnchorError(f"the anchor's replay failed (exit status {self._process.returncode}):\n{tail}")
        raw = json.loads(lines[-1])
        return AnchorFigures(
            tokens_per_step=raw["tokens_per_step"],
            drafted_per_step=raw["drafted_per_step"],
            draft_us_per_step=round(raw["speculate_us_per_step"] + raw["update_us_per_step"], 2),
            prepare_ms_per_call=raw["start_request_ms_per_call"],
            raw=raw,
        )

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.communicate()
        self._folder.cleanup()
