#!/usr/bin/env bash
# Run an experiment file, or write a finished one's report again:
#   scripts/experiment.sh experiments/quick.toml [--engine compose] [--dry-run]
#   scripts/experiment.sh --report results/quick
# Runs `python -m fedsim.experiment` from the project's folder with .venv's Python
# (scripts/test.sh makes .venv). Results go to ./results/<name>/; Ctrl-C stops the
# current run, and the same command resumes: finished runs are kept.
# docs/experiments.md describes the file, the command and the report.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=$root/.venv/bin/python
if [ ! -x "$python" ]; then
  echo "experiment.sh: no .venv in $root: make it with scripts/test.sh -m 'not slow' (installs fedsim)" >&2
  exit 2
fi
case "${1:-}" in
  -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
esac
# Paths given relative to where the user stands stay so after the cd below.
args=()
previous=""
for arg in "$@"; do
  if [ "${arg#/}" = "$arg" ] && { [ -e "$arg" ] || [ "$previous" = "--results" ]; }; then
    arg=$PWD/$arg
  fi
  args+=("$arg")
  previous=$arg
done
for key in DATA_DIR; do
  value=${!key:-}
  if [ -n "$value" ] && [ "${value#/}" = "$value" ]; then
    export "$key=$PWD/$value"
  fi
done
cd "$root"
exec "$python" -m fedsim.experiment "${args[@]}"
