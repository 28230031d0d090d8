"""Helpers shared by the nodes: tensor layouts, tiling options, progress/interrupt, clean errors.

ComfyUI modules are imported inside functions so this file imports without a host.
"""
from __future__ import annotations

import functools

import torch

from ..vae_core import VAEError, VAEInterrupted

CATEGORY = "VAE Suite"
TILE_MODES = ["auto", "always", "never"]


def tile_inputs(default_mode: str = "auto") -> dict:
    """The tiling widgets, declared in Python so they are validated and saved in both workflow formats."""
    return {
        "tiling": (TILE_MODES, {"default": default_mode, "tooltip":
                   "auto: tile only when the untiled run would not fit in free memory; always: tile with the "
                   "sizes below; never: one pass. In every mode a run that runs out of memory is retried in exact tiles."}),
        "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32, "tooltip":
                      "Tile edge in image pixels (used when tiling is 'always', and as the upper bound in 'auto')."}),
        "overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 16, "tooltip":
                    "Overlap between neighbouring tiles in image pixels. VAE Suite's tiling is exact (whole-image "
                    "GroupNorm statistics, per-layer halos), so the result does not depend on it; it is kept so one "
                    "setting serves every tiler and old workflows load."}),
    }


def tile_option(tiling: str, tile_size: int, overlap: int, downscale: int):
    """Node widgets -> vae_core's ``tile=`` argument (None: auto, False: never, Tiling: always).

    Sizes that do not fit the VAE are corrected as the widget shows them (vae_core.tiling.correct_tiling).
    """
    if tiling == "never":
        return False
    if tiling == "auto":
        return None
    if tiling != "always":
        raise VAEError(f"tiling must be one of {', '.join(TILE_MODES)}, got {tiling!r}")
    from ..vae_core.tiling import NODE_TILE_MAX, NODE_TILE_MIN, Tiling, correct_tiling

    size, lap, _ = correct_tiling(int(tile_size), int(overlap), downscale, NODE_TILE_MIN, NODE_TILE_MAX, min_latent=8)
    return Tiling(size, lap)


# ------------------------------------------------------------------------------------------------ LATENT space
# ComfyUI's LATENT holds raw VAE latents for every family but FLUX.2, whose LATENT is the diffusion-space latent
# [B,128,H/16,W/16] (core folds the patchify + BatchNorm into its VAE). The nodes convert at this border.
def latent_in_diffusion_space(core) -> bool:
    return getattr(core, "comfy_latent", "raw") == "diffusion"


def latent_downscale(core) -> int:
    """Image pixels per LATENT pixel."""
    return int(core.diffusion_downscale if latent_in_diffusion_space(core) else core.downscale)


def latent_channels(core) -> int:
    """Channels of this VAE's LATENT."""
    return int(core.diffusion_channels if latent_in_diffusion_space(core) else core.latent_channels)


def encode_latent(core, x: torch.Tensor, **kw) -> torch.Tensor:
    """vae_core image [B,3,H,W] -> what ComfyUI's LATENT holds for this VAE."""
    return core.encode_diffusion(x, **kw) if latent_in_diffusion_space(core) else core.encode(x, **kw)


def decode_latent(core, z: torch.Tensor, **kw) -> torch.Tensor:
    """ComfyUI's LATENT for this VAE -> vae_core image [B,3,H,W]."""
    return core.decode_diffusion(z, **kw) if latent_in_diffusion_space(core) else core.decode(z, **kw)


def run_info(core, height: int, width: int) -> dict:
    """The ``ui`` part of a node's result: what the tile widget shows as the last run's size."""
    return {"vae_suite_tiles": [{"width": int(width), "height": int(height), "downscale": latent_downscale(core),
                                 "family": core.family, "variant": core.variant,
                                 "dtype_bytes": torch.empty((), dtype=core.dtype).element_size()}]}


def comfy_progress():
    """-> (progress(done, total), should_stop()) bound to ComfyUI's progress bar and its Cancel button."""
    import comfy.model_management as mm
    import comfy.utils

    bar = {"bar": None}

    def progress(done: int, total: int) -> None:
        if bar["bar"] is None:
            bar["bar"] = comfy.utils.ProgressBar(total)
        bar["bar"].update_absolute(done, total)  # the host's hook also raises if Cancel was pressed

    return progress, mm.processing_interrupted


def clean_errors(fn):
    """Run a node function so that problems reach the user as one clear execution_error message.

    vae_core's VAEError carries a message that names the problem and the fix: re-raise it without the chain.
    VAEInterrupted (our tiling loop saw Cancel) becomes ComfyUI's own InterruptProcessingException, which the
    server reports as ``execution_interrupted``.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VAEInterrupted:
            import comfy.model_management as mm

            mm.throw_exception_if_processing_interrupted()  # clears the flag and raises
            raise mm.InterruptProcessingException() from None
        except VAEError as e:
            raise VAEError(str(e)) from None

    return run


# ------------------------------------------------------------------------------------------------ layouts
def image_to_core(pixels: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in [0,1] -> vae_core [B,3,H,W] in [-1,1]."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
        raise VAEError(f"expected an IMAGE [B,H,W,C], got {getattr(pixels, 'shape', type(pixels).__name__)}")
    if pixels.shape[-1] < 3:
        raise VAEError(f"the IMAGE has {pixels.shape[-1]} channel(s); a VAE needs RGB (3 channels)")
    return pixels[..., :3].movedim(-1, 1).float() * 2.0 - 1.0


def image_from_core(images: torch.Tensor) -> torch.Tensor:
    """vae_core [B,3,H,W] in [-1,1] -> ComfyUI IMAGE [B,H,W,3] in [0,1] on ComfyUI's intermediate device
    (videos [B,3,T,H,W]: every frame of every item, in order, as core VAE Decode gives them)."""
    import comfy.model_management as mm

    out = ((images.float() + 1.0) / 2.0).clamp_(0.0, 1.0).movedim(1, -1)
    if out.ndim == 5:
        out = out.reshape(-1, *out.shape[-3:])
    return out.to(mm.intermediate_device()).contiguous()


def latent_samples(samples: dict, video: bool = False) -> torch.Tensor:
    """The [B,C,h,w] tensor of a LATENT (nested tensors and 1-frame video latents accepted); ``video``: a 5-D
    latent [B,C,T,h,w] stays as it is (for video VAEs)."""
    if not isinstance(samples, dict) or "samples" not in samples:
        raise VAEError("expected a LATENT (a dict with 'samples')")
    z = samples["samples"]
    if getattr(z, "is_nested", False):
        z = z.unbind()[0]
    if z.ndim == 5 and not video:
        if z.shape[2] != 1:
            raise VAEError(f"this is a video latent with {z.shape[2]} frames {list(z.shape)}; the VAE Suite "
                           "decodes image latents [B,C,h,w]")
        z = z[:, :, 0]
    return z


def mask_to_core(mask: torch.Tensor, height: int, width: int, batch: int, what: str) -> torch.Tensor:
    """ComfyUI MASK [B,H,W] or [H,W] (1 = inpaint) -> [B,1,H,W] float; its size must equal the image's."""
    if not isinstance(mask, torch.Tensor):
        raise VAEError(f"expected a MASK, got {type(mask).__name__}")
    m = mask
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise VAEError(f"the MASK must be [B,H,W], got shape {list(mask.shape)}")
    if tuple(m.shape[-2:]) != (height, width) and not bool((m > 0).any()):
        # an empty mask means the same at any size (LoadImage gives a 64x64 one for images without alpha)
        return torch.zeros(batch, 1, height, width)
    if tuple(m.shape[-2:]) != (height, width):
        raise VAEError(f"the MASK is {m.shape[-1]}x{m.shape[-2]} (WxH) but {what} is {width}x{height}: give a "
                       "mask of the same size (e.g. resize it, or make it from the same image)")
    if m.shape[0] not in (1, batch):
        raise VAEError(f"the MASK has a batch of {m.shape[0]} but {what} has {batch}: use 1 mask or one per image")
    return m.float().clamp(0.0, 1.0).expand(batch, -1, -1).unsqueeze(1)
