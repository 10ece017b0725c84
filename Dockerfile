# The service images, built from the workspace in two steps: a Rust build stage (with what
# librdkafka needs, since rdkafka builds it from source), then one small Debian image per
# service, running as a non-root user, with a healthcheck.
#
#   docker build --target rate-limiter     -t drl/rate-limiter .
#   docker build --target analytics-worker -t drl/analytics-worker .
#   docker build --target gateway          -t drl/gateway .
#   docker build                           -t drl/all-in-one .   # the last stage: all in one process
#
# docker-compose.yml builds the three service targets. Dependencies are compiled in a layer
# of their own (cargo-chef): a change to the code rebuilds the workspace's crates only.
# Only what the classic builder understands is used (no BuildKit mounts), so Compose v1
# (`docker-compose`) builds it as well as Compose v2 with BuildKit.
# scripts/test-compose.sh builds it with a Docker engine and runs the compose stack on it.

ARG RUST_VERSION=1

# ---- build ------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS chef
# librdkafka (rdkafka's cmake-build): cmake, a C/C++ toolchain, and the headers of what it
# may link (zlib always; libcurl and OpenSSL when rdkafka's `curl`/`ssl` features are on).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        cmake g++ make pkg-config zlib1g-dev libcurl4-openssl-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The recipe: the workspace's manifests and lock file, without its code. It only changes
# when dependencies do, which keeps the cook layer below cached.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# The packages whose binaries the images ship. The dependency layer builds exactly these
# (same packages, same profile, so the same features): the final build then finds every
# dependency compiled.
ARG PACKAGES="-p rate-limiter -p analytics-worker -p gateway -p all-in-one"
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked $PACKAGES --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked $PACKAGES \
    && mkdir -p bin \
    && cp target/release/rate-limiter target/release/analytics-worker \
        target/release/gateway target/release/distributed-rate-limiter bin/

# ---- run --------------------------------------------------------------------------------
# The same Debian release as the build stage, so the binaries find the libraries they
# were linked against: glibc, libgcc, zlib (and libssl/libcurl if rdkafka links them).
# curl is also the healthcheck's client. Redis TLS (rustls, compiled in) links nothing; it
# trusts ca-certificates' roots for a rediss:// REDIS_URL unless REDIS_CA_FILE is set.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates curl libcurl4 libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
# No .env in the image: configuration comes from the environment (compose's env_file).
WORKDIR /app
ENV BIND_ADDR=0.0.0.0 \
    RUST_LOG=info
USER 10001:10001

FROM runtime AS rate-limiter
COPY --from=builder /src/bin/rate-limiter /usr/local/bin/rate-limiter
EXPOSE 8080 8081
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null "http://127.0.0.1:${LIMITER_PORT:-8080}/healthz" || exit 1
ENTRYPOINT ["rate-limiter"]

FROM runtime AS analytics-worker
COPY --from=builder /src/bin/analytics-worker /usr/local/bin/analytics-worker
EXPOSE 8090
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null "http://127.0.0.1:${WORKER_PORT:-8090}/healthz" || exit 1
ENTRYPOINT ["analytics-worker"]

FROM runtime AS gateway
COPY --from=builder /src/bin/gateway /usr/local/bin/gateway
EXPOSE 3000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null "http://127.0.0.1:${GATEWAY_PORT:-3000}/healthz" || exit 1
ENTRYPOINT ["gateway"]

# The default target: the whole system in one process (embedded unless REDIS_URL /
# KAFKA_BROKERS are set), gateway on 3000; the limiter's own API (8080) is internal and
# listens on loopback only (LIMITER_BIND_ADDR=0.0.0.0 to publish it).
FROM runtime AS all-in-one
COPY --from=builder /src/bin/distributed-rate-limiter /usr/local/bin/distributed-rate-limiter
EXPOSE 3000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null "http://127.0.0.1:${GATEWAY_PORT:-3000}/healthz" || exit 1
ENTRYPOINT ["distributed-rate-limiter"]
