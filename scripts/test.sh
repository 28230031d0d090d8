#!/usr/bin/env bash
# Runs every test: creates or reuses .venv (torch pinned, diffusers as the test oracle, the real ComfyUI host),
# installs the browser test tools, then runs pytest (which also runs the JS unit tests and the browser test).
# Extra arguments go to pytest, e.g. scripts/test.sh -k tiny
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
bash scripts/setup_browser.sh
export PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -p no:cacheprovider -q -rfEs --durations=20 "$@"
