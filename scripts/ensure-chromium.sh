#!/usr/bin/env bash
# The browser tests drive Debian's Chromium through Playwright (no browser download).
# Install it when it is missing and we are allowed to (root, as in CI).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ]; then
  echo "installing Debian's chromium for the browser tests..."
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "chromium is not installed and we are not root: the browser tests will be skipped." >&2
  echo "Install it with: sudo apt-get install chromium" >&2
fi
