#!/usr/bin/env bash
# Runs every test: creates or reuses .venv (torch pinned, diffusers as the test oracle, the real ComfyUI host),
# installs the browser test tools, runs ruff and the dead-code check, then pytest (which also runs the JS unit tests and the browser test).
# Extra arguments go to pytest, e.g. scripts/test.sh -k tiny
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
bash scripts/setup_browser.sh
export PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
echo "[test] ruff check and the dead-code check (vulture)" >&2
.venv/bin/ruff check .
.venv/bin/vulture vae_core nodes __init__.py tests/dead_code_whitelist.py --min-confidence 60
exec .venv/bin/python -m pytest -p no:cacheprovider -q -rfEs --durations=20 "$@"
