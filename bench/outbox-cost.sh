#!/usr/bin/env bash
# What the events outbox (EVENTS_OUTBOX, issue 24) costs Redis, side by side with the
# producer path:  bench/outbox-cost.sh
#
# For EVENTS_OUTBOX=false and =true, on fresh servers each (the limiter's redis-server, the
# counters' apart so that it is not measured, tansu): one rate-limiter and one
# analytics-worker, wrk through bench/post.lua at POST /check, then
#   - Redis CPU per decision: INFO cpu (user + sys) over the run / decisions answered, and
#     cmdstat_evalsha's usec_per_call (the deciding script alone);
#   - with the broker frozen (SIGSTOP) for a run: Redis memory per event held in the outbox
#     (used_memory delta / entries);
#   - the lag from an answered decision to its counter in Redis: one fresh user at a time,
#     polled every 2 ms, 30 samples, median and max.
# Uses the binaries in $CARGO_TARGET_DIR/<BENCH_PROFILE, default debug> (Redis's own cost
# does not depend on the limiter's build; the throughput does). Stops what it started, by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PROFILE=${BENCH_PROFILE:-debug}
BIN="$TARGET/$PROFILE"
DURATION=${BENCH_DURATION:-5s}
export PATH="$HOME/.cargo/bin:$PATH"
SCRATCH=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
  rm -rf "$SCRATCH"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
info() { redis-cli -p "$REDIS_PORT" info "$1" | tr -d '\r'; }
field() { grep "^$1:" | cut -d: -f2; }
cpu() { info cpu | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {printf "%.6f", s}'; }

run() {
  local outbox=$1
  REDIS_PORT=$(free_port); KAFKA_PORT=$(free_port); LIMITER_PORT=$(free_port); WORKER_PORT=$(free_port)
  COUNTERS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & PIDS+=($!)
  redis-server --port "$COUNTERS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & PIDS+=($!)
  tansu broker --storage-engine memory://tansu/ --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1 & PIDS+=($!)
  local tansu=$!
  wait_port "$REDIS_PORT"; wait_port "$KAFKA_PORT"; wait_port "$COUNTERS_PORT"
  local env=(REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" REDIS_KEY_PREFIX=b: KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
    KAFKA_TOPIC=bench KAFKA_GROUP_ID=bench EVENTS_OUTBOX="$outbox" BIND_ADDR=127.0.0.1 GRPC_PORT="$(free_port)"
    RATE_LIMIT_CAPACITY=100 RATE_LIMIT_REFILL_PER_SEC=50 RUST_LOG=warn)
  env "${env[@]}" LIMITER_PORT="$LIMITER_PORT" "$BIN/rate-limiter" >"$SCRATCH/limiter-$outbox.log" 2>&1 & PIDS+=($!)
  env "${env[@]}" REDIS_URL="redis://127.0.0.1:$COUNTERS_PORT/" WORKER_PORT="$WORKER_PORT" "$BIN/analytics-worker" >"$SCRATCH/worker-$outbox.log" 2>&1 & PIDS+=($!)
  wait_port "$LIMITER_PORT"; wait_port "$WORKER_PORT"
  local url="http://127.0.0.1:$LIMITER_PORT/check"
  # Warm up (scripts loaded, topic made, leases taken).
  wrk -t1 -c4 -d2s -s "$ROOT/bench/post.lua" "$url" -- 10000 >/dev/null
  sleep 2
  redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
  local cpu0; cpu0=$(cpu)
  wrk -t2 -c32 -d"$DURATION" -s "$ROOT/bench/post.lua" "$url" -- 10000 >"$SCRATCH/wrk-$outbox.txt"
  sleep 1   # the relay's last batch
  local cpu1; cpu1=$(cpu)
  local requests; requests=$(grep -o 'requests=[0-9]*' "$SCRATCH/wrk-$outbox.txt" | cut -d= -f2)
  local rps; rps=$(grep -o 'rps=[0-9.]*' "$SCRATCH/wrk-$outbox.txt" | cut -d= -f2)
  local evalsha; evalsha=$(info commandstats | grep '^cmdstat_evalsha:' | sed 's/.*usec_per_call=\([0-9.]*\).*/\1/')
  local per; per=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$requests" 'BEGIN {printf "%.1f", (b - a) * 1e6 / n}')
  echo "EVENTS_OUTBOX=$outbox: $requests decisions ($rps/s, debug limiter), Redis CPU ${per} µs/decision (all commands, relay included), EVALSHA ${evalsha} µs/call"
  info commandstats | grep -E 'cmdstat_(evalsha|xrange|xlen|hmget|evalsha_ro|xtrim|hget)' | sed 's/^/    /'
  # Lag: decision answered -> counter in Redis.
  local lags=()
  for i in $(seq 1 30); do
    local user="lag-$outbox-$i-$RANDOM"
    local t0; t0=$(date +%s%N)
    curl -s -o /dev/null -H 'Content-Type: application/json' -d "{\"user_id\":\"$user\"}" "$url"
    local t1; t1=$(date +%s%N)
    while [ "$(redis-cli -p "$COUNTERS_PORT" hget "b:c{$user}" allowed)" != 1 ]; do
      sleep 0.002
      if [ $(( $(date +%s%N) - t1 )) -gt 10000000000 ]; then echo "    no count for $user in 10 s" >&2; break; fi
    done
    lags+=($(( ($(date +%s%N) - t1) / 1000000 )))
  done
  printf '%s\n' "${lags[@]}" | sort -n | awk '{a[NR]=$1} END {printf "    lag answer -> counter: median %d ms, max %d ms (30 users, 2 ms polling)\n", a[int((NR+1)/2)], a[NR]}'
  if [ "$outbox" = true ]; then
    # Memory per event held while the broker is away.
    kill -STOP "$tansu"
    sleep 1
    local m0; m0=$(info memory | field used_memory)
    wrk -t2 -c32 -d3s -s "$ROOT/bench/post.lua" "$url" -- 10000 >/dev/null
    local m1; m1=$(info memory | field used_memory)
    local held=0
    for n in $(seq 0 15); do held=$((held + $(redis-cli -p "$REDIS_PORT" xlen "b:ob:$n"))); done
    local bytes=0
    for n in $(seq 0 15); do bytes=$((bytes + $(redis-cli -p "$REDIS_PORT" hget "b:ob:$n:m" bytes))); done
    echo "    broker frozen 3 s: $held events held, Redis used_memory +$((m1 - m0)) B = $(( (m1 - m0) / (held > 0 ? held : 1) )) B/event (counted against OUTBOX_MAX_BYTES: $((bytes / (held > 0 ? held : 1))) B/event)"
    kill -CONT "$tansu"
    local deadline=$((SECONDS + 60))
    while :; do
      held=0
      for n in $(seq 0 15); do held=$((held + $(redis-cli -p "$REDIS_PORT" xlen "b:ob:$n"))); done
      [ "$held" = 0 ] && break
      [ $SECONDS -gt $deadline ] && { echo "    outbox not drained in 60 s: $held left"; break; }
      sleep 0.2
    done
    echo "    after the thaw: outbox drained ($held left)"
  fi
  for pid in "${PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}

run false
run true
