#!/usr/bin/env bash
# Install what the tests need and run the whole suite (real model, real gRPC, real services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
exec .venv/bin/python -m pytest "$@"
