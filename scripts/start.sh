#!/usr/bin/env bash
# Starts the main job: a real ComfyUI (0.3.75, from PyPI) on the CPU with this pack loaded and its example
# workflows listed as templates. Usage: scripts/start.sh [port]   (default 8188)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${1:-${PORT:-8188}}"
cd "$ROOT"
bash scripts/setup_env.sh
BASE="${VAE_SUITE_BASE:-$ROOT/.cache/comfy-base}"
mkdir -p "$BASE"/{custom_nodes,models/vae,models/vae_approx,models/checkpoints,input,output,temp,user}
ln -sfn "$ROOT" "$BASE/custom_nodes/comfyui-vae-suite"
# Real TAESD-family weights, where ../shared holds them (they are never part of this repo).
SHARED="${VAE_SUITE_SHARED:-$ROOT/../shared}"
for f in taef2_encoder.pth taef2_decoder.pth taesana_encoder.pth; do
  [ -f "$SHARED/weights/taesd/$f" ] && ln -sfn "$(cd "$SHARED/weights/taesd" && pwd)/$f" "$BASE/models/vae_approx/$f"
done
# A demo VAE for the example workflows (seeded random weights: shows the pipeline, not a pretty picture).
.venv/bin/python scripts/make_demo_models.py "$BASE/models" >/dev/null
echo "VAE Suite: starting ComfyUI at http://127.0.0.1:$PORT  (models: $BASE/models, Ctrl+C stops it)"
cd .host/ComfyUI
exec ../../.venv/bin/python main.py --cpu --listen 127.0.0.1 --port "$PORT" --disable-auto-launch \
  --base-directory "$BASE" --preview-method none
