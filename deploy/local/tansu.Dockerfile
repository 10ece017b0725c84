# Stand-in for `apache/kafka` in the compose test (docker-compose.local.yml): tansu, the
# Kafka-protocol broker the integration tests use, copied from this machine
# (`cargo install tansu`), storing in memory.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY tansu /usr/local/bin/tansu
EXPOSE 9092
ENTRYPOINT ["tansu"]
