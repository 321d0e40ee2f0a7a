#!/usr/bin/env bash
# The test command: create or reuse .venv, install fedsim with what the tests need, run pytest.
#   scripts/test.sh                 every test (the Docker ones skip without an engine, outside CI)
#   scripts/test.sh -m "not docker" any pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "test.sh: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fedsim-requirements
want=$(cat services/aggregator/requirements.txt services/client/requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "test.sh: installing requirements into .venv"
  .venv/bin/pip install -q --disable-pip-version-check \
    -r services/aggregator/requirements.txt -r services/client/requirements.txt -r requirements-dev.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
