#!/usr/bin/env bash
# Set the machine up (scripts/setup.sh), then lint and run the test suite.
# Arguments go to pytest, e.g. scripts/test.sh -k ledger -x
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash scripts/setup.sh

echo "==> ruff check"
.venv/bin/ruff check .

if command -v docker-compose >/dev/null; then
  echo "==> compose.yaml"
  docker-compose -f compose.yaml config -q
elif docker compose version >/dev/null 2>&1; then
  echo "==> compose.yaml"
  docker compose -f compose.yaml config -q
fi

echo "==> pytest"
# Tests that need the engine fail (instead of skipping) when it is missing.
export RATCHET_REQUIRE_ENGINE=1
exec .venv/bin/python -m pytest -q -ra "$@"
