#!/usr/bin/env bash
# What the browser test (tests/test_browser.py) needs, idempotent: Debian's Chromium, and
# playwright-core from npm (it drives the system Chromium and downloads no browser of its
# own) in .dev/browser/node_modules. Skips whatever is already there.
#   scripts/browser_setup.sh
# Environment: LINFUSION_DEV (default <repo>/.dev), CHROMIUM (default /usr/bin/chromium).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dev=${LINFUSION_DEV:-$repo/.dev}
chromium=${CHROMIUM:-/usr/bin/chromium}
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)

if [ ! -x "$chromium" ]; then
  if command -v apt-get >/dev/null; then
    echo "[browser] installing chromium (Debian packages chromium, chromium-driver)"
    "${sudo[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q chromium chromium-driver
  else
    echo "[browser] no $chromium and no apt-get: install Chromium yourself (the browser test will skip)" >&2
  fi
fi

if ! command -v npm >/dev/null; then
  if command -v apt-get >/dev/null; then
    echo "[browser] installing nodejs and npm"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q nodejs npm
  else
    echo "[browser] no npm: install Node.js yourself (the browser test will skip)" >&2
    exit 0
  fi
fi

mkdir -p "$dev/browser"
if [ ! -f "$dev/browser/node_modules/playwright-core/package.json" ]; then
  echo "[browser] npm i playwright-core in $dev/browser"
  [ -f "$dev/browser/package.json" ] || echo '{"name": "linfusion-browser-test", "private": true}' > "$dev/browser/package.json"
  (cd "$dev/browser" && npm i --no-audit --no-fund --loglevel=error playwright-core)
fi
echo "[browser] ready: $("$chromium" --version 2>/dev/null || echo "no chromium"), playwright-core $(node -p "require('$dev/browser/node_modules/playwright-core/package.json').version" 2>/dev/null || echo missing)"
