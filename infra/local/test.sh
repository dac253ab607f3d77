#!/usr/bin/env bash
# Set-up, lint, then the whole test suite (unit, data, model and integration tests).
# Extra arguments go to pytest, e.g. `bash infra/local/test.sh tests/code -x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$root/infra/local/setup.sh"
cd "$root"
export PATH="$root/.venv/bin:$PATH"

ruff check .
ruff format --check .
lint-imports  # the layers and no-cycle contracts in pyproject.toml
python -m pytest "$@"
