#!/usr/bin/env bash
# The whole system as local processes, without Docker:
#   scripts/simulate.sh [--clients N]
# runs prepare, the aggregator under gunicorn on 127.0.0.1 (port of AGGREGATOR_URL),
# then N worker processes (default: one per range of CLIENT_SLICES under
# PARTITION=slices, else one per core) with the same settings, each output line
# prefixed with its process's name. When the workers are done it stops the
# aggregator with SIGTERM, which writes the final checkpoint, and exits non-zero
# if any worker failed.
# Settings come from the environment and ./.env as for every fedsim command.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

clients=""
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) clients=${2:-}; shift 2 || { echo "simulate.sh: --clients needs a number" >&2; exit 2; } ;;
    --clients=*) clients=${1#--clients=}; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "simulate.sh: unknown argument '$1' (use --clients N)" >&2; exit 2 ;;
  esac
done
if [ -n "$clients" ] && ! [[ "$clients" =~ ^[1-9][0-9]*$ ]]; then
  echo "simulate.sh: --clients must be a positive integer, got '$clients'" >&2
  exit 2
fi

python=python3
[ -x "$root/.venv/bin/python" ] && python=$root/.venv/bin/python
# Paths given relative to where the user stands stay so after the cd below.
for key in DATA_DIR MODEL_DIR WORKER_STATE_DIR FEDSIM_ENV_FILE; do
  value=${!key:-}
  if [ -n "$value" ] && [ "${value#/}" = "$value" ]; then
    export "$key=$PWD/$value"
  fi
done
cd "$root"  # the project's .env and ./data, ./models defaults
export PYTHONUNBUFFERED=1

prefix() {  # prefix every line read with a padded name
  local name=$1 line
  while IFS= read -r line || [ -n "$line" ]; do
    printf '%-10s | %s\n' "$name" "$line"
  done
}

started=$(date +%s.%N)
"$python" -m fedsim.prepare 2>&1 | prefix prepare
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo "simulate.sh: prepare failed (exit $status)" >&2
  exit "$status"
fi

# The resolved address and plan, from the same settings the processes read; the
# workers' shared state (COMPRESSION=topk residuals) in the run's MODEL_DIR unless set.
read -r port workers model_dir state_dir < <("$python" -c '
import os
from urllib.parse import urlparse
from fedsim import config
s = config.load()
workers = len(s.client_slices) if s.partition == "slices" else min(os.cpu_count() or 1, s.per_round)
state = s.worker_state_dir if "WORKER_STATE_DIR" in s.explicit else s.model_dir / "worker-state"
print(urlparse(s.aggregator_url).port or 80, workers, s.model_dir, state)')
clients=${clients:-$workers}
export AGGREGATOR_URL="http://127.0.0.1:$port" BIND="127.0.0.1:$port" WORKER_STATE_DIR="$state_dir"

pids=()
cleanup() {  # on Ctrl-C or an early exit: stop what this script started
  for pid in "${pids[@]}" ${aggregator:-}; do
    kill -TERM "$pid" 2>/dev/null
  done
}
trap 'cleanup; exit 130' INT TERM

"$python" -m gunicorn -c python:fedsim.aggregator.gunicorn_conf \
  'fedsim.aggregator.app:create_app()' > >(prefix aggregator) 2>&1 &
aggregator=$!

# Wait for /healthz, but not for an aggregator that has already exited.
deadline=$((SECONDS + 60))
until "$python" -c "import urllib.request as u; u.urlopen('$AGGREGATOR_URL/healthz', timeout=1)" 2>/dev/null; do
  if ! kill -0 "$aggregator" 2>/dev/null; then
    wait "$aggregator"
    echo "simulate.sh: the aggregator exited (status $?) before it answered on $AGGREGATOR_URL" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "simulate.sh: no answer from $AGGREGATOR_URL/healthz after 60s" >&2
    cleanup
    exit 1
  fi
  sleep 0.3
done
echo "simulate.sh: aggregator up on $AGGREGATOR_URL; starting $clients workers"

for i in $(seq 1 "$clients"); do
  "$python" -m fedsim.client < /dev/null > >(prefix "worker-$i") 2>&1 &
  pids+=($!)
done

failed=()
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  code=$?
  [ "$code" -ne 0 ] && failed+=("worker-$((i + 1)) (exit $code)")
done
pids=()

# SIGTERM: gunicorn lets the worker finish its requests and checkpoint unsaved updates.
kill -TERM "$aggregator" 2>/dev/null
wait "$aggregator"
aggregator_status=$?
aggregator=""
sleep 0.2  # the prefixers print the last lines

elapsed=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $started }")
latest=$(cat "$model_dir/latest" 2>/dev/null || echo "none")
echo "simulate.sh: done in ${elapsed}s; final checkpoint $model_dir/$latest"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "simulate.sh: failed: ${failed[*]}" >&2
  exit 1
fi
if [ "$aggregator_status" -ne 0 ]; then
  echo "simulate.sh: the aggregator exited with status $aggregator_status" >&2
  exit 1
fi
