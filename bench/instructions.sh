#!/usr/bin/env bash
# Instructions per decision:  bench/instructions.sh [--quick] [PATH...]
#
# Runs each service alone under `valgrind --tool=callgrind`, drives it with bench-client
# (outside valgrind) for an exact number of decisions, every one allowed, over 10,000 users,
# and prints the instructions the service executed per decision. The count is the same for
# the same binary and input however busy the machine is, which req/s and CPU time are not.
#
# Per path: start under callgrind; wait until it answers; a warm-up of INSTR_WARMUP
# decisions; `callgrind_control -d` (dump 1: start-up and warm-up, thrown away); the
# INSTR_REQUESTS decisions; one second to settle (the in-process counters catch up);
# dump 2; INSTR_IDLE_SECS seconds without load; dump 3. Under valgrind a process runs ~50
# times slower, so its per-second work (sweepers, report writers) weighs 50 times more
# than at full speed: the idle rate (dump 3) times the load's duration is taken off dump 2.
# Both figures are printed: "net" (idle taken off) and "raw".
#
# Paths (all by default): http (rate-limiter POST /check, memory store, in-process
# counters), grpc (rate-limiter ShouldRateLimit, memory store), api (the all-in-one's
# POST /api, embedded), throttlecrab (throttlecrab-server POST /throttle, when the binary
# is on PATH or THROTTLECRAB_BIN), limitador (limitador-server ShouldRateLimit, memory,
# when on PATH or LIMITADOR_BIN). A missing peer is skipped with a line that says so.
#
# Knobs (environment): INSTR_REQUESTS (20000; 5000 with --quick), INSTR_WARMUP (2000;
# 1000), INSTR_IDLE_SECS (5; 3), INSTR_CONCURRENCY (8), INSTR_KEEP (a directory: the
# callgrind dumps are copied there, for callgrind_annotate), INSTR_OUT (a file: the
# markdown table is also written there). Honours CARGO_TARGET_DIR; builds nothing when
# INSTR_NO_BUILD=1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH="$ROOT/bench"
QUICK=0
WANT=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
    http | grpc | api | throttlecrab | limitador) WANT+=("$arg") ;;
    *) echo "unknown argument: $arg (usage: bench/instructions.sh [--quick] [http|grpc|api|throttlecrab|limitador]...)" >&2; exit 2 ;;
  esac
done
[ "${#WANT[@]}" -eq 0 ] && WANT=(http grpc api throttlecrab limitador)
if [ "$QUICK" = 1 ]; then
  REQUESTS=${INSTR_REQUESTS:-5000}
  WARMUP=${INSTR_WARMUP:-1000}
  IDLE=${INSTR_IDLE_SECS:-3}
else
  REQUESTS=${INSTR_REQUESTS:-20000}
  WARMUP=${INSTR_WARMUP:-2000}
  IDLE=${INSTR_IDLE_SECS:-5}
fi
CONCURRENCY=${INSTR_CONCURRENCY:-8}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN="$TARGET/release"

for tool in valgrind callgrind_control curl ss; do
  command -v "$tool" >/dev/null || { echo "instructions: $tool is not installed" >&2; exit 1; }
done
if [ "${INSTR_NO_BUILD:-0}" != 1 ]; then
  echo "== building (release): rate-limiter, distributed-rate-limiter, bench-client" >&2
  (cd "$ROOT" && cargo build --release --quiet -p rate-limiter -p all-in-one -p bench-client)
fi
for bin in rate-limiter distributed-rate-limiter bench-client; do
  [ -x "$BIN/$bin" ] || { echo "instructions: $BIN/$bin was not built" >&2; exit 1; }
done
THROTTLECRAB=${THROTTLECRAB_BIN:-$(command -v throttlecrab-server || true)}
LIMITADOR=${LIMITADOR_BIN:-$(command -v limitador-server || true)}

SCRATCH=$(mktemp -d /tmp/rl-instr.XXXXXX)
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
TABLE="$SCRATCH/table.md"
: >"$TABLE"

# Every decision allowed: a built-in policy no run reaches, and rules whose limit per user
# no run reaches (domain envoy, descriptor [user=<n>]).
write_allow_all_limits # ALLOW_ALL, $SCRATCH/rules/envoy.yaml, $SCRATCH/limitador.yaml

# Instructions (Ir) in a callgrind dump.
dump_ir() { sed -nE 's/^(summary|totals): ([0-9]+).*/\2/p' "$1" | head -1; }

# Heap allocations in a callgrind dump: calls into mimalloc's allocating entry points (our
# global allocator) or the C library's malloc, calloc and realloc, from outside them. Names are compressed in the dump
# ("fn=(12) name" once, "fn=(12)" after), hence the map.
dump_allocs() {
  awk '
    function named(s,   id) {
      if (match(s, /^\([0-9]+\)/)) {
        id = substr(s, RSTART, RLENGTH)
        if (length(s) > RLENGTH) name[id] = substr(s, RLENGTH + 2)
        return name[id]
      }
      return s
    }
    /^fn=/ { fn = named(substr($0, 4)) }
    /^cfn=/ { cfn = named(substr($0, 5)) }
    /^calls=/ {
      split(substr($0, 7), a, " ")
      if (cfn ~ /^(mi_(malloc|zalloc|calloc|realloc|new)[a-z_]*|malloc|calloc|realloc)$/ \
        && fn !~ /^(_?mi_|malloc|calloc|realloc|__libc)/) n += a[1]
    }
    END { print n + 0 }' "$1"
}

# dump PID FILE N: asks callgrind for dump N of PID and waits until FILE.N is complete.
dump() {
  local pid=$1 file=$2 n=$3
  callgrind_control -d "$pid" >/dev/null 2>&1 || true
  for _ in $(seq 1 600); do
    [ -s "$file.$n" ] && [ -n "$(dump_ir "$file.$n")" ] && return 0
    sleep 0.1
  done
  echo "instructions: callgrind dump $n of $pid did not appear" >&2
  return 1
}

client() { "$BIN/bench-client" -c "$CONCURRENCY" "$@"; }

# measure LABEL READY CLIENT_ARGS... -- COMMAND...: READY is a URL (answers 2xx) or a port.
measure() {
  local label=$1 ready=$2
  shift 2
  local args=()
  while [ "$1" != -- ]; do args+=("$1"); shift; done
  shift
  local slug=${label//[^A-Za-z0-9]/_}
  local out="$SCRATCH/$slug.cg"
  echo "== $label: valgrind --tool=callgrind $(basename "$1"), $REQUESTS decisions" >&2
  # valgrind goes right before the binary, after env and its settings (valgrind would
  # otherwise count env, and the binary env execs would run without it).
  local cmd=() placed=0 skip_next=0 a
  for a in "$@"; do
    if [ "$placed" = 0 ] && [ "$skip_next" = 0 ] && [ "$a" != env ] && [[ "$a" != -* ]] && [[ "$a" != *=* ]]; then
      cmd+=(valgrind --tool=callgrind --callgrind-out-file="$out")
      placed=1
    fi
    skip_next=0
    [ "$placed" = 0 ] && [ "$a" = -u ] && skip_next=1
    cmd+=("$a")
  done
  start "$slug" "${cmd[@]}"
  local pid=$LAST_PID
  case "$ready" in
    http*) wait_http "$ready" 180 ;;
    *) wait_port "$ready" ;;
  esac
  client -n "$WARMUP" "${args[@]}" >"$LOGS/$slug.warmup" 2>&1 || {
    cat "$LOGS/$slug.warmup" >&2
    return 1
  }
  sleep 1
  dump "$pid" "$out" 1
  local t0 t1 t2
  t0=$(now_ms)
  client -n "$REQUESTS" "${args[@]}" >"$LOGS/$slug.client" 2>&1 || {
    cat "$LOGS/$slug.client" >&2
    return 1
  }
  sleep 1
  dump "$pid" "$out" 2
  t1=$(now_ms)
  sleep "$IDLE"
  dump "$pid" "$out" 3
  t2=$(now_ms)
  stop_pid "$pid"
  local load idle allocs idle_allocs
  load=$(dump_ir "$out.2")
  idle=$(dump_ir "$out.3")
  allocs=$(dump_allocs "$out.2")
  idle_allocs=$(dump_allocs "$out.3")
  if [ -n "${INSTR_KEEP:-}" ]; then
    mkdir -p "$INSTR_KEEP"
    cp "$out.2" "$INSTR_KEEP/$slug.callgrind"
  fi
  grep -h '^CLIENT' "$LOGS/$slug.client" >&2
  awk -v l="$label" -v n="$REQUESTS" -v load="$load" -v idle="$idle" -v al="$allocs" \
    -v ial="$idle_allocs" -v tl="$((t1 - t0))" -v ti="$((t2 - t1))" 'BEGIN {
      rate = ti > 0 ? idle / ti : 0
      arate = ti > 0 ? ial / ti : 0
      net = load - rate * tl
      printf "| %s | %d | %.0f | %.0f | %.1f | %.0f | %.1f |\n", l, n, net / n, load / n,
        (al - arate * tl) / n, rate, tl / 1000
    }' | tee -a "$TABLE" >&2
}

skip() { echo "| $1 | skipped: $2 | | | | | |" | tee -a "$TABLE" >&2; }

for path in "${WANT[@]}"; do
  case "$path" in
    http)
      pick_port P
      pick_port G
      measure "rate-limiter POST /check (memory)" "http://127.0.0.1:$P/readyz" \
        http "http://127.0.0.1:$P/check" --body user -- \
        "${SERVICE_ENV[@]}" "${ALLOW_ALL[@]}" LIMITER_PORT="$P" GRPC_PORT="$G" "$BIN/rate-limiter"
      ;;
    grpc)
      pick_port P
      pick_port G
      measure "rate-limiter ShouldRateLimit (memory)" "http://127.0.0.1:$P/readyz" \
        grpc "127.0.0.1:$G" --domain envoy --key user -- \
        "${SERVICE_ENV[@]}" "${ALLOW_ALL[@]}" LIMITER_PORT="$P" GRPC_PORT="$G" \
        RULES_PATH="$SCRATCH/rules" "$BIN/rate-limiter"
      ;;
    api)
      pick_port P
      pick_port L
      pick_port G
      measure "all-in-one POST /api (embedded)" "http://127.0.0.1:$P/healthz" \
        http "http://127.0.0.1:$P/api" --body user -- \
        "${SERVICE_ENV[@]}" "${ALLOW_ALL[@]}" GATEWAY_PORT="$P" LIMITER_PORT="$L" \
        GRPC_PORT="$G" "$BIN/distributed-rate-limiter"
      ;;
    throttlecrab)
      if [ -z "$THROTTLECRAB" ]; then
        skip "throttlecrab-server POST /throttle" "throttlecrab-server not found (cargo install throttlecrab-server --version 0.4.40 --locked, or THROTTLECRAB_BIN)"
        continue
      fi
      pick_port P
      measure "throttlecrab-server POST /throttle" "http://127.0.0.1:$P/health" \
        http "http://127.0.0.1:$P/throttle" --body throttle -- \
        "$THROTTLECRAB" --http --http-host 127.0.0.1 --http-port "$P" --log-level warn
      ;;
    limitador)
      if [ -z "$LIMITADOR" ]; then
        skip "limitador-server ShouldRateLimit (memory)" "limitador-server not found (built from Kuadrant/limitador's source; LIMITADOR_BIN)"
        continue
      fi
      pick_port G
      pick_port H
      measure "limitador-server ShouldRateLimit (memory)" "$G" \
        grpc "127.0.0.1:$G" --domain envoy --key user -- \
        "$LIMITADOR" --rls-ip 127.0.0.1 --rls-port "$G" --http-ip 127.0.0.1 --http-port "$H" \
        "$SCRATCH/limitador.yaml" memory
      ;;
  esac
done

{
  echo "## Instructions per decision (valgrind --tool=callgrind, bench/instructions.sh)"
  echo
  echo "Each service alone under callgrind, driven by bench-client (outside valgrind, $CONCURRENCY in flight) with"
  echo "$REQUESTS decisions over 10,000 users, every one allowed; net = the load's dump less the idle rate times its duration."
  echo
  echo "| Path | Decisions | Instructions per decision (net) | (raw) | heap allocations per decision (mimalloc calls, net) | idle instructions per ms | load s under valgrind |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  cat "$TABLE"
} >"$SCRATCH/report.md"
[ -n "${INSTR_OUT:-}" ] && cp "$SCRATCH/report.md" "$INSTR_OUT"
cat "$SCRATCH/report.md"
