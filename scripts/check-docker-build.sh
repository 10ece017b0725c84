#!/usr/bin/env bash
# Runs the Dockerfile's build without a Docker engine, as far as that goes:
#   1. the build context, as .dockerignore leaves it;
#   2. the build stages' commands (chef, planner, builder), read from the Dockerfile and run
#      as written, each stage in a folder standing for its WORKDIR; the apt-get lines are
#      checked (the packages must be installed here, or are installed when root) rather
#      than run;
#   3. that the final `cargo build` compiled the workspace's crates only: every dependency
#      came from the cached cook layer;
#   4. the runtime stage: its apt packages exist in this Debian release, and every shared
#      library the binaries link comes from one of them (or from the base image);
#   5. every binary the service stages copy exists, is the real program (not a cargo-chef
#      stub), and the HEALTHCHECK commands pass against the limiter and the all-in-one.
# Not run (it needs an engine): pulling the base images, the runtime stage's RUN (user
# creation), running as that user, and docker-compose up. Release build: ~11 min the first
# time on 2 cores; the work folder (DOCKER_BUILD_CHECK_DIR) keeps target/ between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
work=${DOCKER_BUILD_CHECK_DIR:-$root/target/docker-build-check}
mkdir -p "$work"
work=$(cd "$work" && pwd)
log=$work/log
mkdir -p "$log"
# As in the image: target/ inside the workspace, whatever this shell had.
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET_DIR

die() { echo "check-docker-build: $*" >&2; exit 1; }
step() { echo "==> $*"; }

# The Dockerfile as "<stage>\t<INSTRUCTION>\t<arguments>" lines: continuations joined,
# comments dropped.
instructions() {
  awk '
    /^[[:space:]]*#/ { next }
    {
      line = $0
      if (buf != "") sub(/^[[:space:]]+/, "", line)
      if (line ~ /\\[[:space:]]*$/) { sub(/\\[[:space:]]*$/, "", line); buf = buf line " "; next }
      full = buf line; buf = ""
      if (full ~ /^[[:space:]]*$/) next
      split(full, w, /[[:space:]]+/)
      ins = toupper(w[1]); rest = full; sub(/^[[:space:]]*[^[:space:]]+[[:space:]]*/, "", rest)
      if (ins == "FROM") { n = split(rest, f, /[[:space:]]+/); stage = (n >= 3 && toupper(f[2]) == "AS") ? f[3] : "" }
      printf "%s\t%s\t%s\n", stage, ins, rest
    }' Dockerfile
}

# The packages an `apt-get install` command line names.
apt_packages() {
  sed -E 's/.*apt-get install//; s/&&.*//' <<<"$1" | tr ' ' '\n' | grep -Ev '^(-.*)?$' || true
}

# 1. The build context.
step "build context (.dockerignore applied)"
context=$work/context
rm -rf "$context"
mkdir -p "$context"
mapfile -t ignore < <(grep -Ev '^[[:space:]]*(#|$)' .dockerignore | sed -E 's#^/##; s#/$##')
ignored() {
  local path=$1 p q
  for p in "${ignore[@]}"; do
    q=${p#\*\*/}
    # shellcheck disable=SC2053 # the patterns are globs
    if [[ $path == $p || $path == $p/* || ( $q != "$p" && ( $path == */$q || $path == */$q/* ) ) ]]; then
      return 0
    fi
  done
  return 1
}
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
  [ -e "$f" ] && ! ignored "$f" && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xpf - -C "$context"
echo "$(find "$context" -type f | wc -l) files"

# 2. The build stages.
declare -A args=()
stage=""
stage_dir() { echo "$work/stage-$1"; }
run_in_stage() {
  local dir=$1 cmd=$2 name
  for name in "${!args[@]}"; do export "$name=${args[$name]}"; done
  (cd "$dir" && bash -euo pipefail -c "$cmd")
}
build_stages=" chef planner builder "
while IFS=$'\t' read -r st ins rest; do
  case $ins in
    ARG)
      name=${rest%%=*}
      value=${rest#*=}
      value=${value#\"}; value=${value%\"}
      args[$name]=$value ;;
  esac
  [[ $build_stages == *" $st "* ]] || continue
  dir=$(stage_dir "$st")
  case $ins in
    FROM)
      parent=${rest%% *}
      # Keep the stage's target/ from the last run, as Docker keeps its cached layers.
      [ -d "$dir/target" ] && mv "$dir/target" "$work/target-$st"
      rm -rf "$dir"
      if [[ $build_stages == *" $parent "* ]]; then cp -a "$(stage_dir "$parent")" "$dir"; else mkdir -p "$dir"; fi
      [ -d "$work/target-$st" ] && mv "$work/target-$st" "$dir/target"
      stage=$st
      step "stage $stage (FROM $parent)" ;;
    WORKDIR)
      [ "$rest" = /src ] || die "only WORKDIR /src is emulated, not $rest" ;;
    COPY)
      if [ "$rest" = ". ." ]; then
        cp -a "$context/." "$dir/"
      elif [[ $rest =~ ^--from=([^ ]+)\ /src/([^ ]+)\ ([^ ]+)$ ]]; then
        cp -a "$(stage_dir "${BASH_REMATCH[1]}")/${BASH_REMATCH[2]}" "$dir/${BASH_REMATCH[3]}"
      else
        die "COPY not emulated: $rest"
      fi ;;
    RUN)
      if [[ $rest == *"apt-get install"* ]]; then
        missing=()
        for p in $(apt_packages "$rest"); do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
        if [ ${#missing[@]} -gt 0 ]; then
          [ "$(id -u)" = 0 ] || die "build packages missing here: ${missing[*]}"
          echo "installing ${missing[*]}"
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
        fi
        echo "apt packages present: $(apt_packages "$rest" | xargs)"
      elif [[ $rest =~ ^cargo\ install\ cargo-chef\ .*--version\ ([^ ]+) ]] \
        && cargo chef --version 2>/dev/null | grep -qw -- "${BASH_REMATCH[1]}"; then
        echo "cargo-chef ${BASH_REMATCH[1]} already installed"
      else
        echo "RUN $rest"
        n=$(ls "$log" | wc -l)
        run_in_stage "$dir" "$rest" > "$log/$n-$stage.log" 2>&1 \
          || { tail -40 "$log/$n-$stage.log"; die "RUN failed in stage $stage: $rest"; }
        tail -2 "$log/$n-$stage.log"
        last_build_log=$log/$n-$stage.log
      fi ;;
  esac
done < <(instructions)

# 3. The final build compiled only the workspace's crates (path crates show their folder).
step "dependency cache: the final build recompiled no dependency"
[[ $(tail -1 < <(instructions | awk -F'\t' '$1 == "builder" && $2 == "RUN"')) == *"cargo build"* ]] \
  || die "the builder stage's last RUN is not the cargo build"
rebuilt=$(grep -E '^ *Compiling ' "$last_build_log" | grep -v ' (/' || true)
[ -z "$rebuilt" ] || die "the final build recompiled dependencies: the cook layer does not match it:
$rebuilt"
grep -E '^ *Compiling ' "$last_build_log" | sed 's/^ */  /'

# 4. The runtime stage's packages and the libraries the binaries link.
step "runtime stage: packages and shared libraries"
runtime_run=$(instructions | awk -F'\t' '$1 == "runtime" && $2 == "RUN" { print $3 }')
runtime_from=$(instructions | awk -F'\t' '$1 == "runtime" && $2 == "FROM" { print $3 }')
mapfile -t runtime_pkgs < <(apt_packages "$runtime_run")
echo "runtime image: $runtime_from + ${runtime_pkgs[*]}"
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ $runtime_from == *"$codename"* ]] \
  || die "this machine runs Debian $codename, the runtime stage $runtime_from: the library check needs the same release"
for p in "${runtime_pkgs[@]}"; do
  apt-cache show "$p" >/dev/null 2>&1 || { apt-get update -qq 2>/dev/null || true; apt-cache show "$p" >/dev/null 2>&1; } \
    || die "runtime package $p does not exist in Debian $codename"
done
# What the runtime image has: the slim base (the Priority: required packages) and the
# closure of the installed packages' dependencies.
mapfile -t have < <(
  {
    dpkg-query -W -f '${Package} ${Priority}\n' | awk '$2 == "required" { print $1 }'
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances "${runtime_pkgs[@]}" | grep -Ev '^ |<' || true
  } | sed 's/:.*//' | sort -u
)
bin_dir=$(stage_dir builder)/bin
for bin in "$bin_dir"/*; do
  while read -r lib; do
    real=$(readlink -f "$lib")
    pkg=$(dpkg -S "$real" 2>/dev/null || dpkg -S "$lib" 2>/dev/null || true)
    pkg=${pkg%%:*}
    [ -n "$pkg" ] || die "$(basename "$bin") links $lib, which no Debian package provides"
    printf '%s\n' "${have[@]}" | grep -qx "$pkg" \
      || die "$(basename "$bin") links $lib from $pkg, which the runtime stage does not install"
    echo "  $(basename "$bin"): $(basename "$lib") <- $pkg"
  done < <(ldd "$bin" | awk '/=>/ { if ($3 == "not") { print "NOT-FOUND:" $1 } else print $3 }')
done
if ldd "$bin_dir"/* | grep -q 'not found'; then die "a library is not found"; fi

# 5. The service stages: their binaries, and the healthchecks.
step "service stages: binaries and healthchecks"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
while IFS=$'\t' read -r st rest; do
  [[ $rest =~ ^--from=builder\ /src/([^ ]+)\ ([^ ]+)$ ]] || die "unexpected COPY in $st: $rest"
  bin=$(stage_dir builder)/${BASH_REMATCH[1]}
  [ -x "$bin" ] || die "stage $st copies ${BASH_REMATCH[1]}, which the build did not make"
  "$bin" --help | grep -q '^Usage:' || die "$bin is not the real program (a cargo-chef stub?)"
  echo "  $st: /src/${BASH_REMATCH[1]} ($(du -h "$bin" | cut -f1))"
done < <(instructions | awk -F'\t' '$2 == "COPY" && $3 ~ /^--from=builder/ { print $1 "\t" $3 }')

healthcheck() { # stage -> the shell command of its HEALTHCHECK
  instructions | awk -F'\t' -v s="$1" '$1 == s && $2 == "HEALTHCHECK" { sub(/.*CMD[[:space:]]+/, "", $3); print $3 }'
}
check_health() { # stage, binary, port variable, then the service's environment
  local st=$1 bin=$2 var=$3 port pid ok=""
  shift 3
  port=$(free_port)
  env "$@" BIND_ADDR=127.0.0.1 "$var=$port" REDIS_URL= KAFKA_BROKERS= \
    "$(stage_dir builder)/bin/$bin" > "$log/health-$st.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    if env "$var=$port" sh -c "$(healthcheck "$st")"; then ok=1; break; fi
    sleep 0.1
  done
  kill "$pid" && wait "$pid" || true
  [ -n "$ok" ] || { cat "$log/health-$st.log"; die "the HEALTHCHECK of $st never passed"; }
  echo "  $st: HEALTHCHECK passed ($var=$port)"
}
check_health rate-limiter rate-limiter LIMITER_PORT
check_health all-in-one distributed-rate-limiter GATEWAY_PORT LIMITER_PORT="$(free_port)"
echo "docker build check: ok (the gateway's and worker's healthchecks need Redis/Kafka and were not run)"
