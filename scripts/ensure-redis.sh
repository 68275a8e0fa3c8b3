#!/usr/bin/env bash
# Makes sure a Redis server answers on 127.0.0.1:6379 for the tests: start one if none does,
# installing the Debian package first if redis-server is missing. Never stops a running one.
set -euo pipefail
HOST=127.0.0.1
PORT=6379

ping() {
  # PING over bash's /dev/tcp, so redis-cli is not needed
  { exec 3<>"/dev/tcp/$HOST/$PORT"; } 2>/dev/null || return 1
  printf 'PING\r\n' >&3
  local line=""
  read -r -t 2 line <&3 || true
  exec 3<&- 3>&-
  [[ "$line" == +PONG* ]]
}

if ping; then
  echo "redis: answering on $HOST:$PORT"
  exit 0
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis: redis-server not found, installing the Debian package"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  # keep the package from starting its own service
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  $SUDO rm -f /usr/sbin/policy-rc.d
fi

dir=$(mktemp -d /tmp/wattproxy-redis.XXXXXX)
redis-server --daemonize yes --bind "$HOST" --port "$PORT" --save "" --appendonly no \
  --dir "$dir" --logfile "$dir/redis.log"
for _ in $(seq 1 50); do
  if ping; then
    echo "redis: started on $HOST:$PORT"
    exit 0
  fi
  sleep 0.1
done
echo "redis: could not start redis-server on $HOST:$PORT (log: $dir/redis.log)" >&2
exit 1
