#!/usr/bin/env bash
# A real two-node Ray cluster on this machine, for trying the cluster route without a cloud and
# for the tests: a head (dashboard + job server) and a worker, each started with `ray start` on
# its own loopback address with its own resources and temp dir. Token authentication stays on,
# as Ray starts it by default, with a token of its own in $ICM_LOCAL_CLUSTER_DIR/auth_token
# (RAY_AUTH_TOKEN_PATH): ~/.ray/auth_token is left as it was.
#
#   cluster/local.sh up        start both nodes; prints the dashboard / job-submission address
#   cluster/local.sh status    what runs (ray status + the recorded PIDs)
#   cluster/local.sh down      stop the nodes by the PIDs this script recorded (never `ray stop`,
#                              which kills every Ray process on the machine)
#
# Settings (environment): ICM_LOCAL_CLUSTER_DIR (state + temp dirs, default /tmp/icm-ray-local),
# ICM_HEAD_IP / ICM_WORKER_IP (127.0.0.2 / 127.0.0.3), ICM_GCS_PORT (6390), ICM_DASHBOARD_PORT
# (8275), ICM_HEAD_AGENT_PORT / ICM_WORKER_AGENT_PORT (dashboard agents, 52375 / 52385),
# ICM_HEAD_CPUS / ICM_WORKER_CPUS (1 / 1). Submit jobs with:
#   RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$ICM_LOCAL_CLUSTER_DIR/auth_token \
#     ray job submit --address http://$ICM_HEAD_IP:$ICM_DASHBOARD_PORT \
#       --working-dir . --runtime-env cluster/runtime_env.yaml -- python pipelines/maa_augment.py ...
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${ICM_LOCAL_CLUSTER_DIR:-/tmp/icm-ray-local}"
HEAD_IP="${ICM_HEAD_IP:-127.0.0.2}"
WORKER_IP="${ICM_WORKER_IP:-127.0.0.3}"
GCS_PORT="${ICM_GCS_PORT:-6390}"
DASHBOARD_PORT="${ICM_DASHBOARD_PORT:-8275}"
HEAD_AGENT_PORT="${ICM_HEAD_AGENT_PORT:-52375}"
WORKER_AGENT_PORT="${ICM_WORKER_AGENT_PORT:-52385}"
HEAD_CPUS="${ICM_HEAD_CPUS:-1}"
WORKER_CPUS="${ICM_WORKER_CPUS:-1}"

if (( ${#STATE} > 40 )); then  # Ray's unix sockets live below it: AF_UNIX paths end at 107 bytes
  echo "local.sh: ICM_LOCAL_CLUSTER_DIR=$STATE is too long (keep it under 40 characters)" >&2; exit 2
fi

# The job entrypoint's `python` is the first on the head's PATH: the project's venv when present.
if [[ -x "$REPO/.venv/bin/ray" ]]; then export PATH="$REPO/.venv/bin:$PATH"; fi
command -v ray >/dev/null || { echo "local.sh: no 'ray' on PATH (run 'make venv' first)" >&2; exit 1; }
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
unset RAY_ADDRESS RAY_AUTH_TOKEN

# A node's processes: those whose command line names its temp dir (the head's client server names
# the head's GCS address instead), and all their descendants (agents, workers).
node_pids() {
  local pattern="$STATE/$1/"
  [[ "$1" == head ]] && pattern="$pattern|ray.util.client.server --address=$HEAD_IP:$GCS_PORT "
  local todo found=""
  todo="$(pgrep -f -- "$pattern" || true)"
  while [[ -n "${todo// }" ]]; do
    found+=" $todo"
    todo="$(for pid in $todo; do pgrep -P "$pid" || true; done)"
  done
  echo $found | tr ' ' '\n' | sort -un | tr '\n' ' '
}

# A process's start time (field 22 of /proc/PID/stat, after the parenthesised command name): a
# recorded PID is only ours while its start time is the one recorded, whatever reused the number.
start_time() { sed -E 's/^.*\) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }

# The recorded PIDs ("pid:start" lines) that still are the processes we started.
ours() {
  local entry pid
  for entry in $(cat "$STATE/$1.pids" 2>/dev/null); do
    pid="${entry%%:*}"
    if [[ -n "$pid" && "$(start_time "$pid")" == "${entry#*:}" ]]; then echo "$pid"; fi
  done
  return 0
}

alive() { ours "$1" | wc -l; }

wait_for() {  # wait_for <seconds> <command...>
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || return 1
    sleep 1
  done
}

record() {  # record <node>: all its PIDs with their start times, and its raylet's PID on its own
  local pid
  for pid in $(node_pids "$1"); do echo "$pid:$(start_time "$pid")"; done > "$STATE/$1.pids"
  pgrep -f -- "raylet.*$STATE/$1/" | head -n 1 > "$STATE/$1.raylet.pid" || true
}

up() {
  if [[ -s "$STATE/head.pids" && "$(alive head)" -gt 0 ]]; then
    echo "local.sh: a cluster from $STATE is already up (cluster/local.sh down first)" >&2; exit 1
  fi
  mkdir -p "$STATE/head" "$STATE/worker"
  if [[ ! -s "$STATE/auth_token" ]]; then   # this cluster's token; clients read it via RAY_AUTH_TOKEN_PATH
    (umask 077; python -c "import secrets; print(secrets.token_hex(32), end='')" > "$STATE/auth_token")
  fi
  ray start --head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" \
    --include-dashboard=true --dashboard-host="$HEAD_IP" --dashboard-port="$DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$HEAD_AGENT_PORT" \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 --resources='{"icm_head": 1}' \
    --temp-dir="$STATE/head" --disable-usage-stats > "$STATE/head.log" 2>&1 \
    || { cat "$STATE/head.log" >&2; record head; down; exit 1; }
  record head
  ray start --address="$HEAD_IP:$GCS_PORT" --node-ip-address="$WORKER_IP" \
    --dashboard-agent-listen-port="$WORKER_AGENT_PORT" \
    --num-cpus="$WORKER_CPUS" --num-gpus=0 --resources='{"icm_worker": 1}' \
    --temp-dir="$STATE/worker" --disable-usage-stats > "$STATE/worker.log" 2>&1 \
    || { cat "$STATE/worker.log" >&2; record worker; down; exit 1; }
  record worker
  if ! wait_for 60 two_nodes; then
    echo "local.sh: the worker did not join within 60 s" >&2; down; exit 1
  fi
  wait_for 60 curl -sf "http://$HEAD_IP:$DASHBOARD_PORT/api/version" \
    -H "Authorization: Bearer $(cat "$STATE/auth_token")" || echo "local.sh: dashboard not answering yet" >&2
  echo "head   $HEAD_IP:$GCS_PORT  ($(alive head) processes, raylet $(cat "$STATE/head.raylet.pid"))"
  echo "worker $WORKER_IP           ($(alive worker) processes, raylet $(cat "$STATE/worker.raylet.pid"))"
  echo "dashboard / jobs: http://$HEAD_IP:$DASHBOARD_PORT   (RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token)"
}

two_nodes() {
  python - "$HEAD_IP:$GCS_PORT" <<'EOF'
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
sys.exit(0 if len(alive) >= 2 else 1)
EOF
}

running() { local pids="$(node_pids head) $(node_pids worker)"; echo ${pids}; }

down() {
  local pids=""
  for node in worker head; do   # recorded PIDs only while they are still ours, plus the node's live processes
    pids+=" $(ours "$node") $(node_pids "$node")"
  done
  pids="$(echo $pids | tr ' ' '\n' | sort -un | tr '\n' ' ')"
  [[ -n "${pids// }" ]] && kill -TERM $pids 2>/dev/null || true
  local deadline=$((SECONDS + 20))
  while [[ -n "$(running)" ]] && (( SECONDS < deadline )); do sleep 1; done
  local left="$(running)"
  if [[ -n "$left" ]]; then kill -KILL $left 2>/dev/null || true; sleep 1; fi
  rm -f "$STATE"/*.pids "$STATE"/*.raylet.pid
  left="$(running)"
  if [[ -n "$left" ]]; then echo "local.sh: processes survived: $left" >&2; exit 1; fi
  echo "local.sh: cluster stopped (no process of $STATE left)"
}

status() {
  for node in head worker; do
    echo "$node: $(alive "$node") of $(wc -l < "$STATE/$node.pids" 2>/dev/null || echo 0) recorded processes alive"
  done
  ray status --address="$HEAD_IP:$GCS_PORT" || true
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
