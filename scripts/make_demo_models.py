"""The model files the example workflows use, for the main job's base folder (scripts/start.sh).

    python scripts/make_demo_models.py <base>/models

1. Real weights through huggingface_hub (with its progress bars): the TAESD family (taesd, taesdxl, taesd3, taef1
   as diffusers folders in models/vae/) and the SD VAE (vae-ft-mse-840000-ema-pruned.safetensors). Files come
   from the Hub, or from huggingface_hub's local cache when HF_HUB_OFFLINE=1, and are linked into the model
   folders. When the Hub cannot be reached this says so in one line and goes on with step 2.
2. Seeded random-weight stand-ins under the examples' names for whatever is still missing (they draw noise:
   each stand-in example says so in a Note), the demo UNet the TAESD Preview example samples on the CPU, and
   the two input images. A stand-in is recorded in models/.vae_suite_standins and replaced by the real file
   as soon as one can be fetched; files put there by hand are never touched.

Never writes outside the given folder.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from preview_models import sd15_unet_state_dict  # noqa: E402
from vae_core import asym, flux2, kl, tiny, wan  # noqa: E402
from wan_layout import to_original  # noqa: E402

SD_VAE = "vae-ft-mse-840000-ema-pruned.safetensors"
TAESD_FAMILY = ("taesd", "taesdxl", "taesd3", "taef1")
# (Hub repo, file in it, destination under models/)
FETCH = [("stabilityai/sd-vae-ft-mse-original", SD_VAE, f"vae/{SD_VAE}")] + [
    (f"madebyollin/{name}", f, f"vae/{name}/{f}") for name in TAESD_FAMILY
    for f in ("config.json", "diffusion_pytorch_model.safetensors")]
DEMO_UNET = "diffusion_models/vae_suite_demo_unet.safetensors"
# the FLUX.2 VAE under ComfyUI's usual name (its repos are gated or large: never fetched, a stand-in when missing)
FLUX2_VAE = "flux2-vae.safetensors"
# the Wan 2.1 / Qwen-Image VAE under the names ComfyUI users download (the original layout, bf16 as released)
QWEN_VAE, WAN_VAE = "qwen_image_vae.safetensors", "wan_2.1_vae.safetensors"

KL_CORE_SHAPED = {**kl.DEFAULT_CONFIG, **kl.VARIANTS["sd1"]}  # the layout core VAELoader builds
ASYM_DEMO = {**asym.DEFAULT_CONFIG, "down_block_out_channels": [32, 32, 64, 64], "up_block_out_channels": [32, 64, 64, 64]}
DIFFUSERS_TINY_FIELDS = ("in_channels", "out_channels", "encoder_block_out_channels", "decoder_block_out_channels",
                         "num_encoder_blocks", "num_decoder_blocks", "latent_channels", "upsampling_scaling_factor",
                         "act_fn", "upsample_fn", "latent_magnitude", "latent_shift", "force_upcast", "scaling_factor",
                         "shift_factor")


def weights(module: torch.nn.Module, seed: int, dtype=torch.float32) -> dict:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return {k: v.to(dtype).contiguous() for k, v in module.state_dict().items()}


class Standins:
    """models/.vae_suite_standins: the files this script wrote with random weights."""

    def __init__(self, models: Path):
        self.path = models / ".vae_suite_standins"
        self.items = set(self.path.read_text().split()) if self.path.exists() else set()

    def add(self, rel: str) -> None:
        self.items.add(rel)

    def discard(self, rel: str) -> None:
        self.items.discard(rel)

    def save(self) -> None:
        self.path.write_text("".join(f"{r}\n" for r in sorted(self.items)))


def offline_line(models: Path, why: str) -> None:
    print(f"VAE Suite: offline ({why}): the examples use random-weight stand-ins, which draw noise; put real "
          f"files into {models}", file=sys.stderr)


def hub_answers() -> bool:
    """One quick request to the Hub's endpoint (huggingface_hub itself retries for half a minute)."""
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=5)
        return True
    except OSError as e:  # URLError and HTTPError are OSErrors; an HTTP error still means it answered
        return getattr(e, "code", None) is not None


def fetch_real(models: Path, standins: Standins) -> bool:
    """Link the real files into `models`; False (after one line on stderr) when neither the Hub nor the local
    huggingface_hub cache (HF_HUB_OFFLINE=1) has them."""
    from huggingface_hub import constants, hf_hub_download

    if not constants.HF_HUB_OFFLINE and not hub_answers():
        offline_line(models, "the Hugging Face Hub is not reachable")
        return False
    for repo, filename, rel in FETCH:
        dst = models / rel
        top = rel.split("/")[0] + "/" + rel.split("/")[1]  # vae/<file> or vae/<folder>
        if dst.exists() and top not in standins.items:
            continue  # already real (fetched before, or put there by hand)
        try:
            src = Path(hf_hub_download(repo, filename)).resolve()
        except Exception as e:  # noqa: BLE001  lost network, no cache entry with HF_HUB_OFFLINE=1, ...
            offline_line(models, f"{repo}/{filename}: {type(e).__name__}")
            return False
        if top in standins.items:  # a stand-in made earlier: replace it (the whole folder for diffusers ones)
            old = models / top
            for p in sorted(old.rglob("*"), reverse=True) if old.is_dir() else []:
                p.unlink() if not p.is_dir() else p.rmdir()
            if old.is_dir():
                old.rmdir()
            elif old.exists() or old.is_symlink():
                old.unlink()
            standins.discard(top)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
        print(f"VAE Suite: {repo}/{filename} -> {dst}", file=sys.stderr)
    return True


def write_standins(models: Path, standins: Standins) -> None:
    def tiny_folder(p: Path) -> None:
        cfg = {**tiny.DEFAULT_CONFIG}
        save_file(weights(tiny.build(cfg), 24), p)
        (p.parent / "config.json").write_text(json.dumps(
            {"_class_name": "AutoencoderTiny", **{k: cfg[k] for k in DIFFUSERS_TINY_FIELDS}}, indent=1))

    def asym_folder(p: Path) -> None:
        save_file(weights(asym.build(ASYM_DEMO), 23), p)
        (p.parent / "config.json").write_text(json.dumps(
            {"_class_name": "AsymmetricAutoencoderKL", **ASYM_DEMO, "down_block_types": ["DownEncoderBlock2D"] * 4,
             "up_block_types": ["UpDecoderBlock2D"] * 4}, indent=1))

    def wan_file(p: Path, seed: int) -> None:  # the released shape (base_dim 96), RMS gains away from 1
        model = wan.build({})
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, q in model.named_parameters():
                if name.endswith("gamma"):
                    q.mul_(1 + 0.2 * torch.randn_like(q))
        save_file(to_original(weights(model, seed, torch.bfloat16)), p)

    jobs = {
        f"vae/{SD_VAE}": lambda p: save_file(weights(kl.build(KL_CORE_SHAPED), 22, torch.float16), p),
        f"vae/{QWEN_VAE}": lambda p: wan_file(p, 25),
        f"vae/{WAN_VAE}": lambda p: wan_file(p, 26),
        "vae/taesd/diffusion_pytorch_model.safetensors": tiny_folder,
        "vae/asymmetric-autoencoder-kl-x-1-5/diffusion_pytorch_model.safetensors": asym_folder,
        # the released FLUX.2 shapes (diffusers names, BatchNorm statistics 0/1), fp16
        f"vae/{FLUX2_VAE}": lambda p: save_file(weights(flux2.build(flux2.VARIANTS["flux2"]), 25, torch.float16), p),
        # the TAESD Preview example's model: SD2-shaped (it samples with LotusConditioning's 1024-wide
        # conditioning, the one core node that makes a conditioning without a text encoder)
        DEMO_UNET: lambda p: save_file(sd15_unet_state_dict(seed=0, context_dim=1024, linear_proj=True), p),
    }
    for rel, write in jobs.items():
        path = models / rel
        if path.exists() or path.is_symlink():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        standins.add("/".join(rel.split("/")[:2]))
        print(f"VAE Suite: wrote stand-in {path}", file=sys.stderr)


def write_inputs(inputs: Path) -> None:
    inputs.mkdir(parents=True, exist_ok=True)
    photo = Path(os.environ.get("VAE_SUITE_SHARED", ROOT.parent / "shared")) / "data" / "taesd_shiba_512.png"
    if not (inputs / "example.png").exists():
        img = Image.open(photo).convert("RGB") if photo.exists() else Image.fromarray(
            (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8))
        img.save(inputs / "example.png")
    if not (inputs / "example_inpaint.png").exists():
        rgba = np.asarray(Image.open(inputs / "example.png").convert("RGBA")).copy()
        h, w = rgba.shape[:2]
        rgba[h // 4: 3 * h // 4, w // 4: 3 * w // 4, 3] = 0  # transparent = inpaint here
        Image.fromarray(rgba, "RGBA").save(inputs / "example_inpaint.png")


def main(models: Path, inputs: Path, fetch: bool = True) -> bool:
    """-> whether the real files were fetched."""
    models.mkdir(parents=True, exist_ok=True)
    standins = Standins(models)
    online = fetch and fetch_real(models, standins)
    write_standins(models, standins)
    standins.save()
    write_inputs(inputs)
    return online


if __name__ == "__main__":
    models = Path(sys.argv[1])
    main(models, models.parent / "input", fetch="--no-fetch" not in sys.argv[2:])
