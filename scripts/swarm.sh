#!/usr/bin/env bash
# fedsim on Docker Swarm: the services of compose.yaml as a stack.
#   scripts/swarm.sh up [--no-build]   build the images (push them when REGISTRY is set), run
#                                      prepare on this node, deploy the stack, wait until the
#                                      aggregator is healthy
#   scripts/swarm.sh status            services, tasks and the aggregator's progress
#   scripts/swarm.sh evaluate [ARGS]   score the newest checkpoint, like scripts/evaluate.sh
#   scripts/swarm.sh down [--volumes]  remove the stack, wait until all of it is gone (--volumes: and its checkpoints)
#   scripts/swarm.sh config            print the stack file that `up` deploys
# Settings come from `.env` and the shell as for Compose, plus STACK (fedsim), WORKERS
# (compose.yaml's replicas) and REGISTRY (none). Run it on a swarm manager: `up` pins the
# aggregator and its checkpoints to the node it runs on. See deploy/swarm/README.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

UP_TIMEOUT=${SWARM_UP_TIMEOUT:-180}   # seconds `up` waits for a healthy aggregator
DOWN_TIMEOUT=120                      # seconds `down` waits for the containers to go

die() {
  echo "swarm.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

command -v docker > /dev/null || die "docker is not installed (https://docs.docker.com/engine/install/)"
command -v python3 > /dev/null || die "python3 is needed (it turns the Compose config into a stack file)"

# This engine's place in the swarm: "state manager node-id".
swarm_node() {
  local info
  info=$(docker info --format '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}} {{.Swarm.NodeID}}' 2>&1) \
    || die "no Docker engine answers: $(tail -n 1 <<< "$info")"
  read -r state manager node <<< "$info"
  if [ "$state" != "active" ]; then
    die "this Docker engine is not in a swarm (state: $state): run \`docker swarm init --advertise-addr <this machine's IP>\` first, or join one"
  fi
  if [ "$manager" != "true" ]; then
    die "this node is a swarm worker: run swarm.sh on a manager (\`docker node ls\` there lists them)"
  fi
  export SWARM_NODE_ID=$node
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The merged Compose config (compose.yaml + deploy/swarm/stack.yaml, `.env` resolved).
load_config() {
  if ! docker compose -f compose.yaml -f deploy/swarm/stack.yaml --profile tools \
      config --format json > "$work/config.json" 2> "$work/config.err"; then
    die "docker compose config failed: $(grep -v '^\s*$' "$work/config.err" | tail -n 1)"
  fi
  stackfile() { python3 deploy/swarm/stackfile.py "$work/config.json" "$@"; }
  stack=$(stackfile get stack) || exit 2
  registry=$(stackfile get registry)
  url=$(stackfile get url)        # the proxy's port on this node; https with TLS=true
  ca=$(stackfile get ca)          # with TLS=true, the CA that checks it (./certs/ca.pem)
  tokens=$(stackfile get tokens)  # ./secrets/tokens.json, for AUTH_READS=true
  volume=$(stackfile get volume)
}

api() {  # GET one path of the API on this node: the body on stdout, non-zero on failure
  python3 - "$url$1" "$ca" "$tokens" << 'PY'
import json, ssl, sys, urllib.request
url, ca, tokens = sys.argv[1:4]
request = urllib.request.Request(url)
try:  # the workers' token: reads need one with AUTH_READS=true
    with open(tokens) as f:
        token = next(e["token"] for e in json.load(f)["tokens"] if "*" in e["clients"])
    request.add_header("Authorization", f"Bearer {token}")
except (OSError, ValueError, KeyError, TypeError, StopIteration):
    pass
context = ssl.create_default_context(cafile=ca) if ca else None
with urllib.request.urlopen(request, timeout=5, context=context) as response:
    sys.stdout.write(response.read().decode())
PY
}

healthz() {  # 0 when the aggregator answers /healthz with 200, through the proxy
  api /healthz > /dev/null 2>&1
}

update_state() {  # a service's rolling update: updating, completed, ... (empty: none)
  docker service inspect -f '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}' "${stack}_$1" 2> /dev/null || true
}

last_task_error() {  # the newest error Swarm gives for one of the stack's services
  local errors
  errors=$(docker service ps --no-trunc --format '{{.Error}}' "${stack}_$1" 2> /dev/null) || true
  sed -n '/./{p;q}' <<< "$errors"
}

# Whether the stack has services. (Not `docker ... | grep -q`: with pipefail, grep
# quitting at the first line can fail the pipeline.)
stack_exists() {
  [ -n "$(docker stack services -q "$stack" 2> /dev/null)" ]
}

cmd_up() {
  local build=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --no-build) build=0 ;;
      *) die "up: unknown argument '$1' (use --no-build)" ;;
    esac
    shift
  done
  swarm_node
  load_config
  # A Compose project of the same name has the same checkpoint volume: one aggregator at a time.
  if [ -n "$(docker ps -q --filter "label=com.docker.compose.project=$stack" \
      --filter label=com.docker.compose.service=aggregator)" ]; then
    die "the Docker Compose project '$stack' runs an aggregator on volume $volume: stop it (docker compose stop aggregator) or set STACK to another name"
  fi

  if [ "$build" = 1 ]; then
    echo "swarm.sh: building the images (docker compose build)"
    docker compose build --quiet || die "docker compose build failed (see above)"
  fi
  if [ -n "$registry" ] && [ "$build" = 1 ]; then
    while read -r local remote; do
      echo "swarm.sh: pushing $remote"
      docker tag "$local" "$remote"
      docker push --quiet "$remote" > /dev/null || die "cannot push $remote: is the registry $registry running and reachable from here?"
    done < <(stackfile get images)
  fi

  # prepare, once per stack, on this node: MNIST in ./data, then the plan and
  # checkpoint 0 in the stack's volume (the aggregator's node is this one).
  mkdir -p data
  docker volume create --label "com.docker.stack.namespace=$stack" "$volume" > /dev/null
  local -a args
  mapfile -d '' args < <(stackfile run prepare)
  echo "swarm.sh: prepare (MNIST in ./data, the plan and checkpoint 0 in volume $volume)"
  docker run "${args[@]}" || die "prepare failed (its message is above); nothing was deployed"

  # A stack of this name that is being removed (`down` in another shell): its
  # network would be taken over half gone.
  if ! stack_exists; then
    network_gone 60
  fi
  stackfile stack > "$work/stack.json"
  local resolve=never
  [ -n "$registry" ] && resolve=always
  echo "swarm.sh: deploying stack $stack"
  docker stack deploy --detach=true --resolve-image "$resolve" ${registry:+--with-registry-auth} \
    -c "$work/stack.json" "$stack" || die "docker stack deploy failed (see above)"

  # Healthy, and not still the old aggregator of a stack being updated.
  local deadline=$((SECONDS + UP_TIMEOUT)) error=""
  until [ "$(update_state aggregator)" != updating ] && healthz; do
    error=$(last_task_error aggregator)
    [ -n "$error" ] || error=$(last_task_error proxy)
    if [ "$SECONDS" -ge "$deadline" ]; then
      die "the aggregator did not answer $url/healthz within ${UP_TIMEOUT}s${error:+ (task error: $error)}; see docker service logs ${stack}_aggregator and ${stack}_proxy"
    fi
    sleep 1
  done
  local workers
  workers=$(docker service inspect -f '{{.Spec.Mode.Replicated.Replicas}}' "${stack}_client")
  echo "swarm.sh: stack $stack up: aggregator healthy at $url/ (dashboard), $workers workers"
  echo "swarm.sh: follow it with scripts/swarm.sh status; add workers with docker service scale ${stack}_client=N"
}

cmd_status() {
  [ $# -eq 0 ] || die "status: takes no arguments"
  swarm_node
  load_config
  stack_exists || die "no stack named $stack (scripts/swarm.sh up starts it)"
  docker stack services "$stack"
  echo
  docker stack ps "$stack" --format 'table {{.Name}}\t{{.Node}}\t{{.CurrentState}}\t{{.Error}}'
  echo
  local body
  if ! body=$(api /v1/status 2> /dev/null); then
    echo "aggregator: no answer on $url/v1/status"
    return
  fi
  python3 - "$body" << 'PY'
import json, sys
s = json.loads(sys.argv[1])
line = f"aggregator: version {s['version']}, updates {s['updates']}, finished {str(s['finished']).lower()}"
line += f", {s.get('strategy')}"
if isinstance(s.get("round"), dict) and s["round"].get("number") is not None:
    line += f", round {s['round']['number']}"
workers = s.get("workers")
if isinstance(workers, (list, dict)):
    workers = len(workers)
if workers is not None:
    line += f", live workers {workers}"
print(line)
PY
}

cmd_evaluate() {
  swarm_node
  load_config
  docker volume inspect "$volume" > /dev/null 2>&1 \
    || die "no volume $volume on this node: run evaluate on the node where \`scripts/swarm.sh up\` ran"
  mkdir -p reports
  local -a args
  mapfile -d '' args < <(stackfile run evaluate)
  for arg in "$@"; do
    if [ "$arg" = "--json" ]; then  # the caller chose the report's place
      docker run "${args[@]}" "$@"
      return
    fi
  done
  local name
  name="evaluation-$(date -u +%Y%m%dT%H%M%SZ).json"
  docker run "${args[@]}" --json "/reports/$name" "$@"
  echo "swarm.sh: report written to reports/$name"
}

cmd_down() {
  local volumes=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --volumes | -v) volumes=1 ;;
      *) die "down: unknown argument '$1' (use --volumes)" ;;
    esac
    shift
  done
  swarm_node
  load_config
  if stack_exists; then
    docker stack rm "$stack"
  fi
  # `docker stack rm` returns at once; the containers go afterwards (the
  # aggregator writes its final checkpoint on SIGTERM), then the networks.
  # Everything of the stack carries its namespace label: prepare's and evaluate's
  # containers, the volume made here and what Swarm makes.
  local label="label=com.docker.stack.namespace=$stack"
  local deadline=$((SECONDS + DOWN_TIMEOUT)) left
  while left=$(docker ps -a --filter "$label" --format '{{.Names}}') && [ -n "$left" ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "stack $stack still has containers after ${DOWN_TIMEOUT}s:" $left
    sleep 1
  done
  local removed="" name
  if [ "$volumes" = 1 ]; then
    local -a names
    mapfile -t names < <({ docker volume ls -q --filter "$label"
      docker volume inspect -f '{{.Name}}' "$volume" 2> /dev/null || true; } | sort -u)
    for name in "${names[@]}"; do
      until docker volume rm "$name" > /dev/null 2>&1; do  # in use for a moment after its container
        [ "$SECONDS" -lt "$deadline" ] || die "cannot remove volume $name (docker volume inspect $name)"
        sleep 1
      done
      if [ "$name" = "$volume" ]; then removed=", with its volume $volume"; fi
    done
  fi
  network_gone $((deadline - SECONDS > 30 ? deadline - SECONDS : 30))
  if [ -n "$removed" ] || [ "$volumes" = 1 ]; then
    echo "swarm.sh: stack $stack removed${removed:-; no volume $volume}"
  else
    echo "swarm.sh: stack $stack removed; checkpoints kept in volume $volume (down --volumes deletes them)"
  fi
}

# Wait up to $1 seconds for the stack's networks to go: Swarm removes them once no
# task uses them any more.
network_gone() {
  local deadline=$((SECONDS + $1)) left
  while left=$(docker network ls -q --filter "label=com.docker.stack.namespace=$stack") \
      && { [ -n "$left" ] || docker network inspect "${stack}_overlay" > /dev/null 2>&1; }; do
    [ "$SECONDS" -lt "$deadline" ] || die "network ${stack}_overlay is still there after $1 s (docker network ls --filter label=com.docker.stack.namespace=$stack)"
    sleep 1
  done
}

cmd_config() {
  [ $# -eq 0 ] || die "config: takes no arguments"
  swarm_node
  load_config
  stackfile stack
}

case "${1:-}" in
  up | status | evaluate | down | config)
    what=$1
    shift
    "cmd_$what" "$@"
    ;;
  -h | --help | help) usage ;;
  "") usage >&2; exit 2 ;;
  *) echo "swarm.sh: unknown command '$1' (up, status, evaluate, down, config)" >&2; exit 2 ;;
esac
