"""The README's Python examples, run as a new user would, against the test session's proxy."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_three_client_examples():
    blocks = python_blocks()
    assert any("QuickDraftClient(" in b for b in blocks)        # gRPC, sync
    assert any("AsyncQuickDraftClient(" in b for b in blocks)   # gRPC, asyncio agent loop
    assert any("from openai import OpenAI" in b for b in blocks)  # HTTP, official client


@pytest.mark.model
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, proxy_address, http_base, tmp_path):
    code = python_blocks()[index]
    code = code.replace("127.0.0.1:50051", proxy_address).replace("http://127.0.0.1:8000/v1", http_base)
    script = tmp_path / f"example_{index}.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README example {index} failed:\n{code}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), "the example printed nothing"


def commands_block() -> list[list[str]]:
    """The README's Commands block: each `quickdraft ...` command as words (continuations joined, comments cut)."""
    block = re.search(r"## Commands\n\n```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    text = re.sub(r"\\\n\s*", " ", block)
    return [line.split("#")[0].split() for line in text.splitlines() if line.startswith("quickdraft ")]


def test_every_command_and_option_in_the_readme_exists():
    from typer.testing import CliRunner

    from quickdraft.cli import app

    commands = commands_block()
    assert len(commands) >= 15
    runner = CliRunner()
    for words in commands:
        path = [w for w in words[1:3] if not w.startswith("-") and "/" not in w and "." not in w]
        if path[:1] != ["records"]:
            path = path[:1]  # `bench NAME`, `replay PATH`: one command, then arguments
        done = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert done.exit_code == 0, (words, done.output)
        for option in (w for w in words if w.startswith("--")):
            assert option in done.output, f"README: `{' '.join(words)}`: {option} is not an option of {path}"
