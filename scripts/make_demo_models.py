"""Stand-in model files for the main job, under the names the example workflows use.

The main job (scripts/start.sh) runs in its own base folder (.cache/comfy-base), never in a user's ComfyUI.
No VAE weights can be downloaded on a fresh machine here, so this writes seeded random-weight VAEs built with
vae_core under the example workflows' file names, plus the two input images, so every example runs at once.
Random weights give noisy pictures: drop real files with the same names into that folder for real ones.
Existing files are never overwritten.

    python scripts/make_demo_models.py <base>/models
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae_core import asym, kl  # noqa: E402

KL_DEMO = {**kl.DEFAULT_CONFIG, "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1}
KL_CORE_SHAPED = {**kl.DEFAULT_CONFIG, **kl.VARIANTS["sd1"]}  # the layout core VAELoader builds
ASYM_DEMO = {**asym.DEFAULT_CONFIG, "down_block_out_channels": [32, 32, 64, 64], "up_block_out_channels": [32, 64, 64, 64]}


def weights(module: torch.nn.Module, seed: int, dtype=torch.float32) -> dict:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return {k: v.to(dtype).contiguous() for k, v in module.state_dict().items()}


def main(models: Path, inputs: Path) -> None:
    vae = models / "vae"
    vae.mkdir(parents=True, exist_ok=True)
    jobs = {
        vae / "sdxl_vae.safetensors": lambda p: save_file(weights(kl.build(KL_DEMO), 21), p),
        vae / "vae-ft-mse-840000-ema-pruned.safetensors":
            lambda p: save_file(weights(kl.build(KL_CORE_SHAPED), 22, torch.float16), p),
        vae / "asymmetric-autoencoder-kl-x-1-5" / "diffusion_pytorch_model.safetensors":
            lambda p: save_file(weights(asym.build(ASYM_DEMO), 23), p),
    }
    for path, write in jobs.items():
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            print(f"wrote stand-in {path}")
    cfg = vae / "asymmetric-autoencoder-kl-x-1-5" / "config.json"
    if not cfg.exists():
        import json
        cfg.write_text(json.dumps({"_class_name": "AsymmetricAutoencoderKL", **ASYM_DEMO,
                                   "down_block_types": ["DownEncoderBlock2D"] * 4,
                                   "up_block_types": ["UpDecoderBlock2D"] * 4}, indent=1))
    inputs.mkdir(parents=True, exist_ok=True)
    photo = ROOT.parent / "shared" / "data" / "taesd_shiba_512.png"
    if not (inputs / "example.png").exists():
        img = Image.open(photo).convert("RGB") if photo.exists() else Image.fromarray(
            (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8))
        img.save(inputs / "example.png")
    if not (inputs / "example_inpaint.png").exists():
        rgba = np.asarray(Image.open(inputs / "example.png").convert("RGBA")).copy()
        h, w = rgba.shape[:2]
        rgba[h // 4: 3 * h // 4, w // 4: 3 * w // 4, 3] = 0  # transparent = inpaint here
        Image.fromarray(rgba, "RGBA").save(inputs / "example_inpaint.png")


if __name__ == "__main__":
    models = Path(sys.argv[1])
    main(models, models.parent / "input")
