# Stand-in for the official `rust:1-bookworm` (built by scripts/docker-local-images.sh on a
# machine that cannot pull images): Debian bookworm with what the official image's base
# (buildpack-deps) brings that our build uses, plus this machine's Rust toolchain, laid out
# as the official image lays it out (rustup in /usr/local/cargo/bin, toolchains in
# /usr/local/rustup).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates curl git build-essential cmake pkg-config \
        zlib1g-dev libssl-dev libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY rustup /usr/local/rustup
COPY cargo /usr/local/cargo
