#!/usr/bin/env bash
# Installs what the browser test (tests/test_widget_browser.py) needs: Debian's chromium (+ chromium-driver),
# the npm package playwright-core (tests/browser, from its package-lock.json) and the newest ComfyUI frontend
# on PyPI (comfyui-frontend-package, into .cache/, served by the test host with --front-end-root; the host's own
# 1.32.9 comes with its requirements). No browser download step: playwright drives /usr/bin/chromium.
# Idempotent and quiet when everything is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BROWSER_DIR="$ROOT/tests/browser"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
log() { printf '[setup_browser] %s\n' "$*" >&2; }

if [ ! -x "$CHROMIUM" ]; then
  command -v apt-get >/dev/null || { log "no $CHROMIUM and no apt-get: install chromium yourself (set CHROMIUM=...)"; exit 1; }
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "installing Debian chromium + chromium-driver (about 350 MB)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi

command -v npm >/dev/null || { log "npm is missing: install Node.js >= 20"; exit 1; }
LOCK="$BROWSER_DIR/package-lock.json"
STAMP="$BROWSER_DIR/node_modules/.vae-suite-stamp"
WANT="$(sha256sum "$LOCK" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  log "npm ci in tests/browser (playwright-core, no browser download)"
  (cd "$BROWSER_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$WANT" > "$STAMP"
fi

FRONTEND_VERSION=1.58.1
FRONTEND_DIR="$ROOT/.cache/frontend-$FRONTEND_VERSION"
if [ ! -f "$FRONTEND_DIR/comfyui_frontend_package/static/index.html" ]; then
  log "installing comfyui-frontend-package==$FRONTEND_VERSION into $FRONTEND_DIR"
  PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
  "$PY" -m pip install --disable-pip-version-check -q --no-deps --target "$FRONTEND_DIR" \
    "comfyui-frontend-package==$FRONTEND_VERSION"
fi
