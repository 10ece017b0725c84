# Sourced by the Docker scripts: ensure_docker_engine makes sure a Docker engine answers,
# starting dockerd in the background when none runs (as root; its log in
# /var/log/dockerd.log), or fails saying how to start one.
ensure_docker_engine() {
  docker info >/dev/null 2>&1 && return 0
  if ! pgrep -x dockerd >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v dockerd >/dev/null; then
      echo "no Docker engine answers (docker info); start one: as root, apt-get install docker.io && dockerd &" >&2
      return 1
    fi
    echo "==> starting dockerd (log: /var/log/dockerd.log)"
    nohup dockerd >> /var/log/dockerd.log 2>&1 &
  fi
  local i
  for i in $(seq 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "the Docker engine did not answer within 60 s (docker info; log: /var/log/dockerd.log)" >&2
  return 1
}
