#!/usr/bin/env bash
# Makes sure the benchmark's load generator (wrk) and reference proxy (nginx) are installed.
# Idempotent: does nothing when both are present. Installs Debian packages only; never starts,
# enables or reloads the nginx service (bench/run.py runs its own nginx on 127.0.0.1 with a
# private config and prefix). nginx is optional: when it cannot be installed the benchmark
# skips it with a note; wrk is required.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
have wrk || missing+=(wrk)
have nginx || missing+=(nginx-light)
have taskset || missing+=(util-linux)

if [ ${#missing[@]} -eq 0 ]; then
  echo "bench tools: wrk, nginx and taskset present"
  exit 0
fi

echo "bench tools: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
# keep the nginx package from starting its own service on port 80 (and leave any existing
# policy-rc.d alone)
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get update -qq -o DPkg::Lock::Timeout=300 || true
for pkg in "${missing[@]}"; do
  if ! $SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "$pkg" >/dev/null; then
    echo "bench tools: could not install $pkg" >&2
  fi
done

have wrk || { echo "bench tools: wrk is required and could not be installed" >&2; exit 1; }
have nginx || echo "bench tools: nginx unavailable; the benchmark will skip the nginx row"
echo "bench tools: ready"
