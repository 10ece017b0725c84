# Helpers shared by bench/run.sh and bench/instructions.sh (sourced, not run): processes
# started in the background from a scratch directory, remembered by PID and stopped on
# exit; free ports; waits; CPU ticks from /proc. The caller sets SCRATCH (a fresh
# directory) before sourcing.
# shellcheck shell=bash

LOGS="$SCRATCH/logs"
mkdir -p "$LOGS"
PIDS=()

stop_pid() {
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${PIDS[$i]}"
  done
  wait 2>/dev/null || true
  if [ "$status" -eq 0 ]; then
    rm -rf "$SCRATCH"
  else
    echo "bench: failed (exit $status); logs kept in $LOGS" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

USED_PORTS=" "
EPHEMERAL_LOW=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
# pick_port VAR: sets VAR to a port that no socket uses (listening, connected or in TIME_WAIT)
# and that this run has not handed out yet, below the ephemeral range so that outgoing
# connections (wrk opens hundreds) cannot take it between the check and the bind.
pick_port() {
  local p low=10000 high=$((EPHEMERAL_LOW > 20000 ? EPHEMERAL_LOW : 60000))
  while :; do
    p=$((low + RANDOM % (high - low)))
    case "$USED_PORTS" in *" $p "*) continue ;; esac
    if [ -z "$(ss -Htan "( sport = :$p )" 2>/dev/null)" ]; then
      USED_PORTS="$USED_PORTS$p "
      printf -v "$1" '%s' "$p"
      return
    fi
  done
}

# start NAME COMMAND... : runs COMMAND from the scratch dir (so no .env is found), logs to
# logs/NAME.log, and sets LAST_PID.
start() {
  local name=$1
  shift
  (cd "$SCRATCH" && exec "$@") >"$LOGS/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# wait_http URL [SECONDS]: until URL answers 2xx.
wait_http() {
  local url=$1 limit=${2:-60}
  for _ in $(seq 1 $((limit * 10))); do
    curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: $url did not come up within ${limit}s" >&2
  return 1
}

wait_port() {
  local port=$1
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: nothing listens on $port after 30s" >&2
  return 1
}

now_ms() { date +%s%3N; }

# CPU ticks (user + system, all threads) of a process so far.
ticks() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  stat=${stat##*) }
  # shellcheck disable=SC2086
  set -- $stat
  echo $((${12} + ${13}))
}

# The environment every service gets: everything explicit, nothing from .env or the caller.
# Used as a command prefix: start NAME "${SERVICE_ENV[@]}" VAR=value... BINARY
SERVICE_ENV=(env -u CLUSTER_ID
  BIND_ADDR=127.0.0.1 REDIS_URL= KAFKA_BROKERS= REDIS_KEY_PREFIX=rl:
  KAFKA_TOPIC=bench-events KAFKA_GROUP_ID=bench-worker KAFKA_PARTITIONS=6
  RATE_LIMIT_CAPACITY=10 RATE_LIMIT_REFILL_PER_SEC=1 MAX_IN_FLIGHT=4096
  SHUTDOWN_GRACE_MS=2000 RUST_LOG=info)

# Limits no load reaches, for the rows that measure a decision's cost with every request
# allowed: ALLOW_ALL, the built-in policy's settings; $SCRATCH/rules/envoy.yaml, a limit per
# user in domain envoy (descriptor [user=<n>]); $SCRATCH/limitador.yaml, limitador's same
# limit for the peer rows.
ALLOW_ALL=(RATE_LIMIT_CAPACITY=1000000000 RATE_LIMIT_REFILL_PER_SEC=1000000000)
write_allow_all_limits() {
  mkdir -p "$SCRATCH/rules"
  cat >"$SCRATCH/rules/envoy.yaml" <<'YAML'
domain: envoy
descriptors:
  - key: user
    rate_limit: {name: per_user, requests_per_unit: 1000000000, unit: second}
YAML
  cat >"$SCRATCH/limitador.yaml" <<'YAML'
- namespace: envoy
  max_value: 1000000000
  seconds: 1
  conditions: []
  variables:
    - descriptors[0]['user']
YAML
}
