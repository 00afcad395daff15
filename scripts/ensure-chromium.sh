#!/usr/bin/env bash
# The browser tests drive Debian's Chromium through Playwright (no browser download).
# Install it when it is missing and we are allowed to (root, as in CI). If the install fails
# (a mirror hiccup), say so loudly: the browser tests then skip with that reason.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != "0" ]; then
  echo "chromium is not installed and we are not root: the browser tests will be skipped." >&2
  echo "Install it with: sudo apt-get install chromium" >&2
  exit 0
fi
for attempt in 1 2; do
  echo "installing Debian's chromium for the browser tests (attempt $attempt)..."
  if DEBIAN_FRONTEND=noninteractive apt-get update -qq \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
    exit 0
  fi
  sleep 5
done
echo "WARNING: could not install chromium; the browser tests will be skipped." >&2
