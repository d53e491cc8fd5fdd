#!/usr/bin/env bash
# Fresh machine to figures: install, start the stack (proxy + SmolLM2 and Gemma 3 workers, in-process
# cache, SQLite), replay a few real agent calls live, print the figures, stop the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/quickdraft demo "$@"
