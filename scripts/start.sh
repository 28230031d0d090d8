#!/usr/bin/env bash
# Starts the main job: a real ComfyUI (0.3.75, from PyPI) on the CPU with this pack loaded and its example
# workflows listed as templates (Workflow -> Browse Templates -> comfyui-vae-suite).
#   scripts/start.sh [port]   (default 8188)
# Everything lives in one base folder, .cache/comfy-base (VAE_SUITE_BASE): models, inputs, outputs, user
# settings and ComfyUI's database. Online it fetches the real TAESD family and the SD VAE through
# huggingface_hub (with progress) into that base's model folders; offline it says so in one line and uses
# random-weight stand-ins (scripts/make_demo_models.py). VAE_SUITE_NO_SERVER=1 prepares the base and stops.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${1:-${PORT:-8188}}"
cd "$ROOT"
bash scripts/setup_env.sh
BASE="${VAE_SUITE_BASE:-$ROOT/.cache/comfy-base}"
mkdir -p "$BASE"/{custom_nodes,models/vae,models/vae_approx,models/checkpoints,models/diffusion_models,input,output,temp,user}
BASE="$(cd "$BASE" && pwd)"
ln -sfn "$ROOT" "$BASE/custom_nodes/comfyui-vae-suite"
# Real TAESD-family weights, where ../shared holds them (they are never part of this repo).
SHARED="${VAE_SUITE_SHARED:-$ROOT/../shared}"
for f in taef2_encoder.pth taef2_decoder.pth taesana_encoder.pth; do
  [ -f "$SHARED/weights/taesd/$f" ] && ln -sfn "$(cd "$SHARED/weights/taesd" && pwd)/$f" "$BASE/models/vae_approx/$f"
done
# Real weights from the Hub when it answers, stand-ins for the rest (one line says which).
export HF_HUB_ETAG_TIMEOUT="${HF_HUB_ETAG_TIMEOUT:-5}"
.venv/bin/python scripts/make_demo_models.py "$BASE/models"
[ "${VAE_SUITE_NO_SERVER:-}" = "1" ] && exit 0
echo "VAE Suite: starting ComfyUI at http://127.0.0.1:$PORT  (base: $BASE, Ctrl+C stops it)"
cd .host/ComfyUI
exec ../../.venv/bin/python main.py --cpu --listen 127.0.0.1 --port "$PORT" --disable-auto-launch \
  --base-directory "$BASE" --database-url "sqlite:///$BASE/user/comfyui.db" --preview-method none
