#!/usr/bin/env bash
# Installs the system packages Squall's setup and tests need, on Debian-like
# machines. Safe to run again: it only installs what is missing.
set -euo pipefail

need=()
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need+=(python3-venv)
fi
# Real services for the integration tests (started on free loopback ports by
# tests/services.py, never as system services).
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
# Node.js runs the browser client's unit tests and a protocol client (ws).
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
# A real browser for the end-to-end tests (Playwright drives this one; it
# never downloads a browser of its own).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# `install-system-deps.sh bench`: the HTTP load generator for the benchmarks.
if [ "${1:-}" = "bench" ]; then
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: please install: ${need[*]}" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-system-deps: installing ${need[*]}"
$SUDO apt-get update -qq
# Debian starts services on install where it can; we only want the programs.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
