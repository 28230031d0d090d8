"""Live-preview engine: which TAESD previews a sampler's latents, how a sampler's latent maps to it, a decode
capped in size, the picture, a rate limit, and a cache of loaded decoders. No ComfyUI imports: the node
(``nodes/preview.py``) only hooks this into the sampler.

A sampler's x0 is in its model's space (after ComfyUI's ``latent_format.process_in``). It is mapped back with
``process_out`` to the raw latents of the full VAE, and the TAESD VAE applies its variant's own scaling: right for
every format, including SDXL-Playground-2.5 whose ``process_in`` is not the SDXL scale. ComfyUI's FLUX.2 latents
are 2x2-patchified (128 channels) and already normalised by the FLUX.2 VAE's BatchNorm statistics: they are only
unpacked to the 32 channels TAEF2 decodes, because TAEF2 works in that normalised space (not on the FLUX.2 VAE's
raw pre-BatchNorm latent; README "FLUX.2", measured in tests/test_flux2.py).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from . import registry
from .errors import VAEError
from .loading import load_vae

log = logging.getLogger("vae_core")

# Hub repositories (diffusers AutoencoderTiny folders) tried when nothing is in vae_approx and we are online.
HUB_REPO = {v: f"hf:madebyollin/{v}" for v in ("taesd", "taesdxl", "taesd3", "taef1", "taef2")}


def variant_for_format(latent_format: Any) -> str | None:
    """The TAESD variant for a ComfyUI latent format object (or class), None when there is none.

    Looked up by class name along the MRO, so subclasses follow their base (Flux is an SD3 subclass: it is
    listed first in its own MRO), in the families' records (``Family.latent_formats`` and ``Family.preview``)."""
    cls = latent_format if isinstance(latent_format, type) else type(latent_format)
    for klass in cls.__mro__:
        for rec in registry.FAMILIES.values():
            variant = rec.latent_formats.get(klass.__name__)
            if variant is not None and variant in rec.preview:
                return rec.preview[variant]
    return None


def decoder_needed_for_format(latent_format: Any) -> str | None:
    """For a latent format of a family the pack has no preview decoder for (Wan 2.1 / Qwen-Image): the name of
    the decoder a preview would need (``Family.preview_decoders``), else None."""
    cls = latent_format if isinstance(latent_format, type) else type(latent_format)
    for klass in cls.__mro__:
        for rec in registry.FAMILIES.values():
            variant = rec.latent_formats.get(klass.__name__)
            if variant is not None and variant in rec.preview_decoders:
                return f"{rec.name} ({variant}): {rec.preview_decoders[variant]}"
    return None


def decoder_file_names(variant: str) -> tuple[str, ...]:
    """The file names looked for in vae_approx (the same prefix rule as ComfyUI's own previewer)."""
    return (f"{variant}_decoder.safetensors", f"{variant}_decoder.pth")


def find_decoder_file(variant: str, filenames: Iterable[str]) -> str | None:
    """First name in a vae_approx listing that starts with ``<variant>_decoder`` (safetensors preferred)."""
    prefix = f"{variant}_decoder"
    hits = sorted((f for f in filenames if os.path.basename(f).startswith(prefix)),
                  key=lambda f: (not f.endswith(".safetensors"), f))
    return hits[0] if hits else None


def unpack_2x2(z: torch.Tensor) -> torch.Tensor:
    """[B, 4C, h, w] -> [B, C, 2h, 2w]: undo ComfyUI's FLUX.2 2x2 patchify (channel = c*4 + 2*row + col)."""
    b, c4, h, w = z.shape
    c = c4 // 4
    return z.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * 2, w * 2)


def pack_2x2(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]: ComfyUI's FLUX.2 latent layout (inverse of ``unpack_2x2``)."""
    b, c, hh, ww = z.shape
    return z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, hh // 2, ww // 2)


def x0_to_raw(x0: torch.Tensor, latent_format: Any, latent_channels: int) -> torch.Tensor:
    """The sampler's x0 (model space) of the first batch item -> raw VAE latents with ``latent_channels``."""
    z = x0[:1]
    if latent_format is not None:
        z = latent_format.process_out(z)
    if z.ndim == 4 and z.shape[1] == 4 * latent_channels:  # patchified (FLUX.2)
        z = unpack_2x2(z)
    return z


def cap_latent(z: torch.Tensor, downscale: int, max_size: int) -> torch.Tensor:
    """Area-downscale a latent so the decoded picture's longest side is at most ``max_size`` pixels.

    For VAEs that cannot skip upsamplings (any VAE input). Cheap but soft: averaging latents lowers their
    contrast (TAEF2 on the test photo at half size: 20.6 dB, against 31.7 dB for skipped upsamplings).
    """
    h, w = z.shape[-2:]
    longest = max(h, w) * downscale
    if not max_size or longest <= max_size:
        return z
    s = max_size / longest
    return F.adaptive_avg_pool2d(z, (max(1, int(h * s + 1e-6)), max(1, int(w * s + 1e-6))))


def halvings(longest: int, max_size: int, limit: int) -> int:
    """How many of the decoder's last 2x upsamplings to skip so the picture stays at least ``max_size`` wide."""
    j = 0
    while j < limit and max_size and longest // 2 ** (j + 1) >= max_size:
        j += 1
    return j


def decode_capped(vae, raw: torch.Tensor, max_size: int) -> torch.Tensor:
    """Raw latents -> [1,3,h,w] in [-1,1] from a TAESD, at least ``max_size`` on the longest side where possible.

    The tiny family decodes a large picture with its last upsamplings left out (``AutoencoderTiny.decode``'s
    ``skip_upsamples``): at half or quarter size a preview costs about 59 % or 23 % of a full decode and looks like
    the full decode scaled down (TAEF2 on the test photo: 31.7 dB at 256 px, 29.4 dB at 128 px)."""
    z = raw[:1]
    if vae.family != "tiny":
        return vae.decode(cap_latent(z, vae.downscale, max_size), tile=False)
    skip = halvings(max(z.shape[-2:]) * vae.downscale, max_size, vae.model.decoder.upsamples)
    with torch.inference_mode():
        return vae.model.decode(vae.to_diffusion(z.to(vae.device, vae.dtype)), skip_upsamples=skip)


def to_pil(images: torch.Tensor):
    """[1,3,H,W] in [-1,1] -> PIL RGB image."""
    from PIL import Image

    img = images[0].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return Image.fromarray(img.permute(1, 2, 0).cpu().numpy())


def fit(image, max_size: int):
    """Scale a PIL image down (never up) so its longest side is at most ``max_size``."""
    from PIL import Image, ImageOps

    if max_size and max(image.size) > max_size:
        image = ImageOps.contain(image, (max_size, max_size), Image.BILINEAR)
    return image


def render_preview(vae, raw: torch.Tensor, max_size: int):
    """Raw latents -> PIL preview, longest side at most ``max_size`` (decoded near that size, then scaled down)."""
    return fit(to_pil(decode_capped(vae, raw, max_size)), max_size)


class RateLimit:
    """At most ``max_rate`` previews per second (0 = every step); the last step always gets one."""

    def __init__(self, max_rate: float, clock: Callable[[], float] = time.monotonic):
        self.interval = 1.0 / max_rate if max_rate and max_rate > 0 else 0.0
        self.clock = clock
        self.last: float | None = None

    def due(self, step: int, total_steps: int) -> bool:
        now = self.clock()
        if self.last is None or step + 1 >= total_steps or now - self.last >= self.interval:
            self.last = now
            return True
        return False


# ================================================================================================ decoders
_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()
_WARNED: set = set()


def warn_once(key: Any, message: str) -> bool:
    if key in _WARNED:
        return False
    _WARNED.add(key)
    log.warning("%s", message)
    return True


def preview_dtype(device: torch.device) -> torch.dtype:
    # TAESD is fine in fp16 on accelerators; CPUs are faster (and exact) in fp32.
    return torch.float16 if torch.device(device).type in ("cuda", "xpu", "mps") else torch.float32


def load_decoder(variant: str, device: torch.device | str, vae_approx_files: Iterable[str],
                 full_path: Callable[[str], str | None], allow_hub: bool = True):
    """-> (vae_core VAE or None, what was loaded). Loaded once per (file, device, dtype) and cached; a file that
    fails is reported once and never raises (a preview must not stop sampling)."""
    device = torch.device(device)
    dtype = preview_dtype(device)
    name = find_decoder_file(variant, vae_approx_files)
    sources: list[str] = []
    path = full_path(name) if name else None
    if path:
        sources.append(path)
    if allow_hub and variant in HUB_REPO:
        sources.append(HUB_REPO[variant])
    for src in sources:
        stamp = os.path.getmtime(src) if os.path.exists(src) else 0.0
        key = (src, stamp, variant, str(device), dtype)
        with _CACHE_LOCK:
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key], src
            if ("failed", key) in _WARNED:
                continue
        try:
            vae = load_vae(src, family="tiny", variant=variant, device=device, dtype=dtype)
            if not vae.can_decode:
                raise VAEError(f"{os.path.basename(src)} holds no TAESD decoder (an encoder file?)")
        except Exception as e:  # a bad file or an offline Hub must never stop sampling
            warn_once(("failed", key), f"TAESD Preview: could not load {src}: {e}")
            continue
        with _CACHE_LOCK:
            _CACHE[key] = vae
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        log.info("TAESD Preview: %s previews from %s", variant, src)
        return vae, src
    return None, None


def missing_message(variant: str, folders: Iterable[str]) -> str:
    names = " or ".join(decoder_file_names(variant))
    where = ", ".join(folders) or "models/vae_approx"
    return (f"TAESD Preview: no {variant} decoder found. Looked for {names} in {where}"
            f"{' and ' + HUB_REPO[variant] + ' on the Hugging Face Hub' if variant in HUB_REPO else ''}. "
            f"Download {variant}_decoder.pth from https://github.com/madebyollin/taesd and put it in one of those "
            "folders; meanwhile previews fall back to latent2rgb where the model has factors, else none.")
