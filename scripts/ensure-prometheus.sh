#!/usr/bin/env bash
# Make `promtool` and `prometheus` available (tests/test_alert_rules.py, tests/test_deploy.py).
#
# Idempotent: exits 0 at once when both are on PATH. Otherwise installs Debian's `prometheus`
# package (apt-get update first when the install fails on missing or stale package lists)
# without starting its service: RUNLEVEL=1 and a temporary policy-rc.d that answers 101 keep
# the maintainer scripts from starting it; the policy file is removed again afterwards unless
# it was there before. Needs root (or sudo) and apt-get.
#
# Env: POLICY_RC_D overrides the policy file's path (default /usr/sbin/policy-rc.d).
set -euo pipefail

have_all() {
  command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1
}

if have_all; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-prometheus: promtool/prometheus not found and no apt-get to install them;" \
    "install Prometheus (it ships promtool) and put both on PATH" >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "ensure-prometheus: need root (or sudo) to install the prometheus package" >&2
    exit 1
  fi
fi

POLICY="${POLICY_RC_D:-/usr/sbin/policy-rc.d}"
LOG="$(mktemp "${TMPDIR:-/tmp}/ensure-prometheus.XXXXXX.log")"
policy_created=0
cleanup() {
  if [ "$policy_created" -eq 1 ]; then
    "${SUDO[@]}" rm -f "$POLICY"
  fi
}
trap cleanup EXIT

if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# written by ensure-prometheus.sh for the install only\nexit 101\n' \
    | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 0755 "$POLICY"
  policy_created=1
fi

install_pkg() {
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get install -y --no-install-recommends prometheus
}

if ! install_pkg >>"$LOG" 2>&1; then
  echo "ensure-prometheus: refreshing package lists (apt-get update)" >&2
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update >>"$LOG" 2>&1 || true
  if ! install_pkg >>"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    echo "ensure-prometheus: apt-get install prometheus failed (log: $LOG)" >&2
    exit 1
  fi
fi

# The service must stay down, whatever the maintainer scripts did.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  "${SUDO[@]}" systemctl stop prometheus || true
fi

if ! have_all; then
  echo "ensure-prometheus: the prometheus package is installed but promtool/prometheus" \
    "are not on PATH (log: $LOG)" >&2
  exit 1
fi
rm -f "$LOG"
echo "ensure-prometheus: $(promtool --version 2>&1 | head -n 1)"
