#!/usr/bin/env bash
# Score the newest checkpoint (or --checkpoint PATH) on MNIST's 10,000 test images.
#   scripts/evaluate.sh [--checkpoint PATH]     in Docker: the models volume; JSON report to ./reports/
#   scripts/evaluate.sh --local [--checkpoint PATH] [--json FILE]
#                                               without Docker: DATA_DIR (./data), MODEL_DIR (./models)
# Other arguments pass through to `python -m fedsim.evaluate`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

if [ "${1:-}" = "--local" ]; then
  shift
  python=python3
  [ -x "$root/.venv/bin/python" ] && python=$root/.venv/bin/python
  # Relative paths stay relative to where the user runs the script.
  export DATA_DIR=${DATA_DIR:-$root/data} MODEL_DIR=${MODEL_DIR:-$root/models}
  exec "$python" -m fedsim.evaluate "$@"
fi

# The evaluate service (profile tools) runs `python -m fedsim.evaluate` in the client
# image with ./reports at /reports; Compose reads COMPOSE_PROJECT_NAME, .env and the
# environment as usual.
cd "$root"
mkdir -p reports
for arg in "$@"; do
  if [ "$arg" = "--json" ]; then  # the caller chose the report's place
    exec docker compose --profile tools run --rm evaluate "$@"
  fi
done
name="evaluation-$(date -u +%Y%m%dT%H%M%SZ).json"
docker compose --profile tools run --rm evaluate --json "/reports/$name" "$@"
echo "evaluate.sh: report written to reports/$name"
