#!/usr/bin/env bash
# System packages the test suite drives for real: Debian's nginx (the scale-out test), Chromium
# (the status page test) and Node.js with npm (the Node clients of tests/test_clients.py).
# Idempotent; does nothing when all are already there.
set -euo pipefail
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "system-deps: please install: ${missing[*]} (needed by the test suite)" >&2
  exit 1
fi
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
$sudo apt-get update -q
$sudo apt-get install -y -q "${missing[@]}"
