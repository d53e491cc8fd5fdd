"""The layout is the architecture: what each folder may import (README, "Layout").

proto/ is the API and imports nothing of ours; drafters need no torch and know no
worker; workers know nothing of drafters or of the proxy. Imports inside functions
count too: a lazy import is still a dependency.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# folder -> module prefixes it must not import
FORBIDDEN = {
    "proto": ("quickdraft.proxy", "quickdraft.suffix_cache", "quickdraft.verifiers", "quickdraft.routing",
              "quickdraft.bench", "quickdraft.records", "quickdraft.settings", "quickdraft.catalog",
              "quickdraft.cli", "torch", "transformers"),
    "suffix_cache": ("quickdraft.verifiers", "quickdraft.proxy", "quickdraft.routing", "quickdraft.bench",
                     "torch", "transformers"),
    "verifiers": ("quickdraft.suffix_cache", "quickdraft.proxy", "quickdraft.routing"),
    "proxy": ("torch", "transformers", "quickdraft.verifiers"),
    "routing": ("torch", "transformers", "quickdraft.verifiers"),
}


def imported_modules(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import; this project imports by full name"
            names.add(node.module)
            # `from quickdraft import proxy` imports quickdraft.proxy
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_each_folder_imports_only_what_its_layer_may(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, folder
    broken = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[folder])
    }
    assert not broken, sorted(broken)


def test_every_drafter_loads_without_torch():
    code = ("import sys; from quickdraft.suffix_cache.registry import DRAFTERS, make_drafter; "
            "[make_drafter(name) for name in DRAFTERS]; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
