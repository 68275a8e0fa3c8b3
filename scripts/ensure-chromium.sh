#!/usr/bin/env bash
# Makes sure a headless-capable Chromium is on PATH for the HTML report test: installs the Debian
# `chromium` package when neither `chromium` nor `chromium-browser` is found. Idempotent.
set -euo pipefail

for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "chromium: found $(command -v "$name")"
    exit 0
  fi
done

if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium: not found and apt-get is unavailable; the HTML render test will be skipped" >&2
  exit 0
fi

echo "chromium: not found, installing the Debian package"
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq || true
if $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
  echo "chromium: installed $(command -v chromium)"
else
  echo "chromium: installation failed; the HTML render test will be skipped" >&2
fi
exit 0
