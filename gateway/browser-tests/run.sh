#!/usr/bin/env bash
# Ferry's browser tests: headless Debian Chromium, driven by playwright-core, against a real
# ferry-gateway (and, for one test, a real redis-server). One command, from anywhere:
#   bash gateway/browser-tests/run.sh
# Env: CHROMIUM_BIN (default /usr/bin/chromium), FERRY_GATEWAY_BIN (default: builds and uses
# target/debug/ferry-gateway), BROWSER_TESTS_TIMEOUT (seconds for the whole node run, default 170).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
start=$(date +%s)

# 1. Debian's Chromium (never a downloaded browser build).
chromium_bin="${CHROMIUM_BIN:-/usr/bin/chromium}"
if [ ! -x "$chromium_bin" ]; then
  echo "browser-tests: installing Debian's chromium" >&2
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" -ne 0 ]; then
    echo "browser-tests: $chromium_bin is missing and this is not root: apt-get install chromium" >&2
    exit 1
  fi
  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
command -v redis-server >/dev/null || {
  echo "browser-tests: redis-server is missing (apt-get install redis-server)" >&2
  exit 1
}

# 2. playwright-core only (it never downloads a browser).
cd "$here"
if [ -f package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
else
  npm install --no-audit --no-fund --loglevel=error
fi

# 3. The gateway. The client and demo page are compiled into the binary (include_str!), so
#    always let cargo bring it up to date (a no-op when it is).
if [ -z "${FERRY_GATEWAY_BIN:-}" ]; then
  (cd "$repo" && cargo build -q -p ferry-gateway)
  export FERRY_GATEWAY_BIN="$repo/target/debug/ferry-gateway"
fi

# 4. The tests, one file at a time (each starts its own gateway and browser), bounded.
rm -rf "$here/artifacts"
mkdir -p "$here/artifacts"
status=0
timeout -k 10 "${BROWSER_TESTS_TIMEOUT:-170}" \
  node --test --test-concurrency=1 --test-reporter=spec tests/ || status=$?
echo "browser-tests: finished in $(( $(date +%s) - start ))s (exit $status); artifacts in $here/artifacts" >&2
exit $status
