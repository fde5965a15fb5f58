#!/usr/bin/env bash
# Install the system programs the test command needs on a fresh Debian/Ubuntu machine, with apt-get:
# python3-venv (Debian's python3 cannot make a venv without it), redis-server and redis-cli (Redis 7, the
# cluster tests need redis-cli), promtool (checks the Prometheus rules and dashboard queries in
# examples/) and chromium with fonts-liberation (the portal's browser tests drive Debian's Chromium through
# Playwright's executable_path: Playwright's own browser download needs its CDN, and with
# --no-install-recommends a fresh machine has no font to render text; $METERWARE_CHROMIUM names another
# Chromium), and systemd for systemd-analyze (verifies the worker's unit in deploy/; nothing is started).
# The tests start their own servers and browser from them.
set -euo pipefail
missing=()
python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
[ -n "${METERWARE_CHROMIUM:-}" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
    || missing+=(chromium fonts-liberation)
command -v systemd-analyze >/dev/null || missing+=(systemd)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
echo "installing ${missing[*]} with apt-get" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
