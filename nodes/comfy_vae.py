"""Our VAEs as ComfyUI's own ``VAE`` type.

``SuiteVAE`` is a real ``comfy.sd.VAE``: the base constructor runs (on a tiny placeholder state dict, so every
member this ComfyUI version defines exists), then every member the core nodes and the memory manager read is set
for the vae_core model:

- ``first_stage_model`` is ``CoreAdapter``, an ``nn.Module`` holding the vae_core network as a submodule, so the
  ``ModelPatcher`` moves its weights; its ``encode(x in [-1,1])`` returns ComfyUI's LATENT (raw latents; for
  FLUX.2 the diffusion-space latent, as core's own FLUX.2 VAE gives) and ``decode(z)`` returns
  images in [-1,1], which is what ``comfy.sd.VAE.encode/decode/*_tiled_`` call with ``process_input/output``
  around them.
- ``patcher`` is a ``ModelPatcher`` over it, so ``load_models_gpu`` loads and offloads it like a core VAE.

Imported only inside the ComfyUI host.
"""
from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd

from ..vae_core import VAE as CoreVAE
from ..vae_core import VAEError
from .common import clean_errors, comfy_progress, decode_latent, encode_latent, latent_channels, latent_downscale

log = logging.getLogger("vae_suite")

def memory_estimate(core: CoreVAE, direction: str, shape, dtype) -> float:
    """Bytes one batch item needs untiled (ComfyUI's memory manager multiplies by the batch it runs): vae_core's
    own estimate, the same the tile widget shows and auto tiling uses."""
    from ..vae_core import tiling

    f = latent_downscale(core)
    if len(shape) == 5:  # a video VAE: the frames of one item untiled
        from ..vae_core import video

        one = (1, *shape[1:])
        return float(video.estimate(core.model, direction, one, None, 0, dtype)["device_bytes"])
    hw = (shape[-2] * f, shape[-1] * f) if direction == "decode" else (shape[-2], shape[-1])
    return float(tiling.estimate_memory(core, direction, hw, None, dtype))


class CoreAdapter(nn.Module):
    """What ``comfy.sd.VAE`` calls ``first_stage_model``: ComfyUI's LATENT in and out (raw latents; FLUX.2's
    diffusion-space latent), images in [-1, 1]."""

    def __init__(self, core: CoreVAE):
        super().__init__()
        self.net = core.model  # a submodule: the ModelPatcher moves these weights
        self.core = core  # not an nn.Module: not registered twice

    def _sync(self) -> CoreVAE:
        # The ModelPatcher moves the weights behind vae_core's back: follow them.
        p = next(self.net.parameters())
        self.core.device, self.core.dtype = p.device, p.dtype
        return self.core

    # Untiled, as core asks (it tiles with its own nodes); vae_core still retries in exact tiles when memory runs
    # out, with the host's progress bar and Cancel, before core's own (inexact) tiled fallback would.
    @clean_errors
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        progress, should_stop = comfy_progress()
        core = self._sync()
        if x.ndim == 5:  # core VAE Encode's video: the frames past 1 + 4k are dropped, as core's Wan VAE does
            k = core.time_downscale
            x = x[:, :, : 1 + (x.shape[2] - 1) // k * k]
        return encode_latent(core, x, tile=False, progress=progress, should_stop=should_stop)

    @clean_errors
    def decode(self, z: torch.Tensor, **kw) -> torch.Tensor:
        progress, should_stop = comfy_progress()
        return decode_latent(self._sync(), z, tile=False, progress=progress, should_stop=should_stop, **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - ComfyUI never calls forward
        return self.decode(z)


class SuiteVAE(comfy.sd.VAE):
    """A ``comfy.sd.VAE`` whose network is a vae_core model (any family)."""

    def __init__(self, core: CoreVAE, name: str = "", device: torch.device | None = None):
        try:  # run the base constructor so members this ComfyUI version adds get their defaults
            super().__init__(sd={"pixel_space_vae": torch.tensor(1.0)})
        except Exception as e:  # an older host without the pixel-space VAE: we set everything below anyway
            log.debug("vae_suite: base VAE constructor skipped (%s)", e)
        self.suite_core = core
        self.suite_name = name
        f = latent_downscale(core)  # of ComfyUI's LATENT (FLUX.2: 16, 128 channels)
        self.downscale_ratio = f
        self.upscale_ratio = f
        self.latent_channels = latent_channels(core)
        self.latent_dim = 2
        if core.video:  # core's video VAE members, as comfy.sd.VAE sets them for its Wan 2.1 VAE
            import math

            k = int(core.time_downscale)
            self.latent_dim = 3
            self.upscale_ratio = (lambda a: max(0, a * k - (k - 1)), f, f)
            self.downscale_ratio = (lambda a: max(0, math.floor((a + k - 1) / k)), f, f)
        self.output_channels = 3
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.disable_offload = False
        self.not_video = False
        self.downscale_index_formula = (int(core.time_downscale), f, f) if core.video else None
        self.upscale_index_formula = (int(core.time_downscale), f, f) if core.video else None
        self.extra_1d_channel = None
        self.crop_input = True
        self.working_dtypes = working_dtypes(core)

        adapter = CoreAdapter(core).eval()
        self.first_stage_model = adapter
        self.memory_used_decode = lambda shape, dtype: memory_estimate(core, "decode", shape, dtype)
        self.memory_used_encode = lambda shape, dtype: memory_estimate(core, "encode", shape, dtype)

        self.device = device if device is not None else mm.vae_device()
        self.vae_dtype = core.dtype
        self.output_device = mm.intermediate_device()
        offload = mm.vae_offload_device()
        core.to(offload)
        self.patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=self.device, offload_device=offload)
        self.size = None
        self.model_size()

    def get_sd(self):
        """vae_core's names are diffusers' names: a KL VAE saved from here loads in ComfyUI and diffusers."""
        return self.suite_core.model.state_dict()

    def __repr__(self) -> str:
        return f"SuiteVAE({self.suite_name!r}, {self.suite_core!r})"


def working_dtypes(core: CoreVAE) -> list[torch.dtype]:
    """The dtypes ComfyUI may pick for this VAE: fp16 only where the VAE does not need the upcast."""
    if core.config.get("force_upcast", False):
        return [torch.bfloat16, torch.float32]
    return [torch.float16, torch.bfloat16, torch.float32]


# ------------------------------------------------------------------------------------------------ any VAE -> core
_FROM_COMFY: "weakref.WeakKeyDictionary[object, CoreVAE]" = weakref.WeakKeyDictionary()


def core_of(vae) -> CoreVAE:
    """The vae_core VAE behind a ComfyUI VAE: ours directly, a core one rebuilt from its state dict (cached)."""
    core = getattr(vae, "suite_core", None)
    if core is not None:
        return core
    if not isinstance(vae, comfy.sd.VAE):
        raise VAEError(f"expected a VAE, got {type(vae).__name__}")
    vae.throw_exception_if_invalid()
    try:
        return _FROM_COMFY[vae]
    except (KeyError, TypeError):
        pass
    from ..vae_core import load_vae

    sd = {k: v for k, v in vae.get_sd().items()}
    if getattr(vae.first_stage_model, "vae_scale", None) is not None and "vae_scale" not in sd:
        sd["vae_scale"] = vae.first_stage_model.vae_scale
    try:
        core = load_vae(sd, dtype=vae.vae_dtype if vae.vae_dtype in (torch.float32, torch.float16, torch.bfloat16)
                        else torch.float32)
    except VAEError as e:
        raise VAEError(f"this VAE from a core loader is not one vae_core can tile ({e}); use the core "
                       "'VAE Decode (Tiled)' node for it") from None
    try:
        _FROM_COMFY[vae] = core
    except TypeError:
        pass
    return core


def load_core_on(vae, core: CoreVAE) -> None:
    """Let ComfyUI's memory manager make room and load the weights to the VAE's device, as core nodes do."""
    patcher = getattr(vae, "patcher", None)
    if getattr(vae, "suite_core", None) is core and patcher is not None:
        mm.load_models_gpu([patcher])
        p = next(core.model.parameters())
        core.device, core.dtype = p.device, p.dtype
    else:
        device = getattr(vae, "device", None) or mm.vae_device()
        if core.device != torch.device(device):
            core.to(device)
