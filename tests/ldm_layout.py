"""Test helpers for the FLUX.2 VAE's formats: a diffusers state dict in the original BFL ``ae.safetensors`` layout,
and ComfyUI core's own loader (``comfy.sd.VAE``) run in a child process as the oracle for that layout.

diffusers has no converter for the FLUX.2 ldm layout, so the layout is produced here by the inverse of kl's
rename tables (``test_kl.to_ldm``: FLUX.1's names; ``bn.*`` and the quant convs keep their names) and checked
against ComfyUI core, which reads the real files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HOST = Path(os.environ.get("VAE_SUITE_COMFY", ROOT / ".host" / "ComfyUI"))


def to_ldm_flux2(sd: dict) -> dict:
    from test_kl import to_ldm

    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    out = to_ldm(sd, n_up)
    out.pop("bn.num_batches_tracked", None)  # BFL's file has only the statistics
    return out


_CHILD = r"""
import json, sys, torch
sys.argv = sys.argv[:1]
from comfy.cli_args import args
args.cpu = True
import comfy.sd, comfy.utils
job = json.loads(sys.stdin.read())
sd = comfy.utils.load_torch_file(job["weights"])
vae = comfy.sd.VAE(sd=sd)
vae.first_stage_model.float()
out = {"latent_channels": vae.latent_channels, "downscale": vae.downscale_ratio}
with torch.inference_mode():
    fsm = vae.first_stage_model
    x = torch.load(job["image"])
    out_t = {"latent": fsm.encode(x).float()}
    z = torch.load(job["latent"])
    out_t["image"] = fsm.decode(z).float()
torch.save(out_t, job["out"])
print(json.dumps(out))
"""


def core_oracle(weights: Path, image: torch.Tensor, latent: torch.Tensor, work: Path) -> dict:
    """ComfyUI core's VAE from ``weights``: its first_stage_model's encode(image in [-1,1]) (a diffusion-space
    LATENT) and decode(latent) (an image in [-1,1]), fp32 on the CPU."""
    if not (HOST / "comfy" / "sd.py").is_file():
        raise AssertionError(f"ComfyUI core is missing at {HOST} (scripts/setup_env.sh installs it)")
    torch.save(image, work / "image.pt")
    torch.save(latent, work / "latent.pt")
    job = {"weights": str(weights), "image": str(work / "image.pt"), "latent": str(work / "latent.pt"),
           "out": str(work / "out.pt")}
    env = {**os.environ, "PYTHONPATH": str(HOST)}
    r = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(job), capture_output=True, text=True,
                       cwd=str(HOST), env=env, timeout=600)
    if r.returncode:
        raise AssertionError(f"ComfyUI core failed:\n{r.stderr[-3000:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    info.update(torch.load(work / "out.pt"))
    return info
