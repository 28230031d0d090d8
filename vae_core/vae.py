"""The VAE object every family is wrapped in: one encode/decode API, input checks, dtype care, tiling."""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import VAEError

log = logging.getLogger("vae_core")

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


class VAE:
    """A loaded VAE of any family.

    Latents passed in and out are *raw* VAE-space latents (as diffusers' latent_dist holds them, and ComfyUI's
    LATENT for every family but FLUX.2); ``to_diffusion``/``from_diffusion`` convert to and from the space a
    diffusion model samples in (for FLUX.2 that is also a change of shape: ``[B,32,h,w] <-> [B,128,h/2,w/2]``).
    Images are ``[B,3,H,W]`` in ``[-1, 1]``.
    """

    def __init__(self, model: nn.Module, family: str, variant: str, config: Mapping[str, Any],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, upcast_reason: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.family = family
        self.variant = variant
        self.config = dict(config)
        self.latent_channels: int = model.latent_channels
        self.downscale: int = model.downscale
        # the diffusion-space latent's channels and downscale (FLUX.2 patchifies 2x2; the same as raw elsewhere)
        self.diffusion_channels: int = getattr(model, "diffusion_channels", model.latent_channels)
        self.diffusion_downscale: int = getattr(model, "diffusion_downscale", model.downscale)
        self.scaling_factor: float = float(self.config.get("scaling_factor") or 1.0)
        self.shift_factor: float = float(self.config.get("shift_factor") or 0.0)
        self.upcast_reason = upcast_reason
        # video families (wan): [B,C,T,H,W] tensors, a per-channel diffusion space
        self.video: bool = bool(getattr(model, "video", False))
        self.time_downscale: int = int(getattr(model, "time_downscale", 1))
        self.latents_mean = self.latents_std = None
        from .registry import FAMILIES
        rec = FAMILIES.get(family)
        if rec is not None and rec.channel_stats and self.config.get("latents_mean") is not None:
            self.latents_mean = torch.tensor(self.config["latents_mean"], dtype=torch.float32)
            self.latents_std = torch.tensor(self.config["latents_std"], dtype=torch.float32)
        self._fp32_model: nn.Module | None = None
        self.to(device, dtype)

    # -------------------------------------------------------------------------------- properties
    @property
    def can_encode(self) -> bool:
        return getattr(self.model, "encoder", None) is not None

    @property
    def can_decode(self) -> bool:
        return getattr(self.model, "decoder", None) is not None

    @property
    def native_space(self) -> str:
        """'raw' for full VAEs; 'diffusion' for TAESD, whose networks work on scaled latents."""
        return getattr(self.model, "native_space", "raw")

    def to(self, device=None, dtype=None) -> "VAE":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.model.to(device=self.device, dtype=self.dtype)
        self._fp32_model = None
        return self

    def __repr__(self) -> str:
        return (f"VAE(family={self.family!r}, variant={self.variant!r}, latent_channels={self.latent_channels}, "
                f"downscale={self.downscale}, dtype={self.dtype}, device={self.device})")

    # -------------------------------------------------------------------------------- latent spaces
    def _channel_stats(self, z: torch.Tensor):
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return (self.latents_mean.to(z.device, z.dtype).view(shape), self.latents_std.to(z.device, z.dtype).view(shape))

    def to_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        own = getattr(self.model, "to_diffusion", None)  # FLUX.2: patchify + BatchNorm statistics
        if own is not None:
            return own(z)
        if self.latents_mean is not None:  # per channel, as diffusers' Wan/Qwen-Image pipelines and ComfyUI's Wan21
            mean, std = self._channel_stats(z)
            return (z - mean) * self.scaling_factor / std
        return (z - self.shift_factor) * self.scaling_factor

    def from_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        own = getattr(self.model, "from_diffusion", None)
        if own is not None:
            return own(z)
        if self.latents_mean is not None:
            mean, std = self._channel_stats(z)
            return z * std / self.scaling_factor + mean
        return z / self.scaling_factor + self.shift_factor

    @property
    def comfy_latent(self) -> str:
        """'raw' or 'diffusion': the space ComfyUI's LATENT holds for this family (``Family.comfy_latent``)."""
        from . import registry

        return registry.get(self.family).comfy_latent

    def encode_diffusion(self, images: torch.Tensor, **kw) -> torch.Tensor:
        """``to_diffusion(encode(images))``; the image is padded to a multiple of ``diffusion_downscale``."""
        x = self._check_images(images)
        f = self.diffusion_downscale
        ph, pw = (-x.shape[-2]) % f, (-x.shape[-1]) % f
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        z = self.encode(x, **kw)
        return self.to_diffusion(z.to(torch.float32)).to(z.dtype)

    # -------------------------------------------------------------------------------- checks
    def _check_images(self, images: Any) -> torch.Tensor:
        if self.video and isinstance(images, torch.Tensor) and images.ndim == 5:
            return check_video(images, self.time_downscale)
        return check_images(images, "images", "encoding")

    def _check_latents(self, latents: Any, space: str = "raw") -> torch.Tensor:
        want = self.diffusion_channels if space == "diffusion" else self.latent_channels
        if not isinstance(latents, torch.Tensor):
            raise VAEError(f"latents must be a torch.Tensor [B,C,h,w], got {type(latents).__name__}")
        if latents.ndim == 3 and latents.shape[0] == want:
            latents = latents.unsqueeze(0)
        if self.video and latents.ndim == 5:
            if latents.shape[2] < 1:
                raise VAEError(f"video latents must have at least one frame, got shape {list(latents.shape)}")
            self._check_latents(latents.transpose(1, 2).flatten(0, 1))  # every frame as a [B,C,h,w] latent
            return latents
        if latents.ndim != 4:
            raise VAEError(f"latents must be 4-D [B,{want},h,w], got shape {list(latents.shape)}")
        c = latents.shape[1]
        if c != want:
            other = self.latent_channels if space == "diffusion" else self.diffusion_channels
            hint = (f" ({c} is this VAE's {'raw' if space == 'diffusion' else 'diffusion-space'} latent: "
                    f"{'decode it with decode()' if space == 'diffusion' else 'decode it with decode_diffusion()'})"
                    if c == other and other != want else "")
            raise VAEError(
                f"latents have {c} channels but this {self.family} VAE ({self.variant}) expects {want} "
                f"({space} space): {_latent_channel_hint(c)}{hint}; use the VAE that matches the model that made the latent")
        if not latents.is_floating_point():
            raise VAEError(f"latents must be floating point, got {latents.dtype}")
        if min(latents.shape[-2:]) < 1 or latents.shape[0] < 1:
            raise VAEError(f"latents must not be empty, got shape {list(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise VAEError("latents contain NaN or Inf values (the sampler diverged, or an fp16 overflow upstream); "
                           "nothing to decode")
        return latents

    # -------------------------------------------------------------------------------- running
    def _models(self):
        yield self.model
        if self.dtype == torch.float16:  # fp16 overflow fallback (the SDXL VAE overflows in fp16)
            if self._fp32_model is None:
                import copy
                self._fp32_model = copy.deepcopy(self.model).float()
            yield self._fp32_model

    def _run(self, fn_name: str, x: torch.Tensor, tile, progress, should_stop, **kw):
        from . import tiling

        for i, model in enumerate(self._models()):
            dtype = next(model.parameters()).dtype
            xin = x.to(self.device, dtype)
            kw_in = {k: (v.to(self.device, dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            with torch.inference_mode():
                out = tiling.execute(self, model, fn_name, xin, tile, progress, should_stop, **kw_in)
            tensors = out if isinstance(out, tuple) else (out,)
            if all(t is None or bool(torch.isfinite(t).all()) for t in tensors) or dtype != torch.float16:
                return out
            log.warning("vae_core: %s in fp16 produced NaN/Inf; recomputing in fp32", fn_name)
        return out

    # -------------------------------------------------------------------------------- public API
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               tile=None, progress: Progress | None = None, should_stop: ShouldStop | None = None) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] -> raw latents [B,C,ceil(H/f),ceil(W/f)] (posterior mean, or a sample)."""
        if not self.can_encode:
            raise VAEError(f"this {self.family} VAE ({self.variant}) was loaded without an encoder (a decoder file "
                           "alone?): load the encoder file too to encode")
        x = self._check_images(images)
        out_dtype = x.dtype
        f = self.downscale
        h, w = x.shape[-2:]
        ph, pw = (-h) % f, (-w) % f
        frame = self.video and x.ndim == 4  # an image batch through a video VAE: one frame each, same rank back
        if frame:
            x = x.unsqueeze(2)
        if ph or pw:  # pad to a multiple of the downscale factor; the latent covers the padded image
            x = F.pad(x, (0, pw, 0, ph, 0, 0) if x.ndim == 5 else (0, pw, 0, ph), mode="replicate")
        mean, logvar = self._run("encode", x, tile, progress, should_stop)
        if frame:
            mean, logvar = mean.squeeze(2), None if logvar is None else logvar.squeeze(2)
        if self.native_space == "diffusion":
            mean = self.from_diffusion(mean)
        z = mean
        if sample and logvar is not None:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
            z = mean + std * noise
        return z.to(out_dtype)

    def decode(self, latents: torch.Tensor, image: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               tile=None, progress: Progress | None = None, should_stop: ShouldStop | None = None) -> torch.Tensor:
        """raw latents [B,C,h,w] -> images [B,3,h*f,w*f] in [-1,1] (not clamped, as diffusers)."""
        if not self.can_decode:
            raise VAEError(f"this {self.family} VAE ({self.variant}) was loaded without a decoder (an encoder file "
                           "alone?): load the decoder file to decode")
        z = self._check_latents(latents)
        out_dtype = z.dtype
        kw: dict[str, Any] = {}
        crop = None
        if image is not None or mask is not None:
            prepare = getattr(self.model, "prepare_condition", None)
            if prepare is None:
                raise VAEError(f"image and mask are inputs of the asymmetric inpainting decoder; this VAE is "
                               f"{self.family} ({self.variant}): decode without them, or load an asymmetric VAE")
            kw, crop = prepare(z, image, mask)
        if self.native_space == "diffusion":
            z = self.to_diffusion(z)
        frame = self.video and z.ndim == 4
        out = self._run("decode", z.unsqueeze(2) if frame else z, tile, progress, should_stop, **kw)
        out = out.squeeze(2) if frame else out
        if crop is not None:
            out = out[..., : crop[0], : crop[1]]
        return out.to(out_dtype)

    def decode_diffusion(self, z: torch.Tensor, **kw) -> torch.Tensor:
        """Decode latents that are already in diffusion space (a sampler's x0, as live previews get it)."""
        z = self._check_latents(z, "diffusion")
        return self.decode(self.from_diffusion(z.to(torch.float32)).to(z.dtype), **kw)


def check_images(images: Any, what: str, purpose: str) -> torch.Tensor:
    """An image batch [B,3,H,W] (or [3,H,W]), floating point, finite -> [B,3,H,W]; else a VAEError naming ``what``."""
    if not isinstance(images, torch.Tensor):
        raise VAEError(f"{what} must be a torch.Tensor [B,3,H,W] in [-1, 1], got {type(images).__name__}")
    if images.ndim == 3 and images.shape[0] == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        hint = " (that looks like ComfyUI's [B,H,W,C] layout: permute(0, 3, 1, 2) first)" \
            if images.ndim == 4 and images.shape[-1] in (3, 4) else ""
        raise VAEError(f"{what} must be [B,3,H,W], got shape {list(images.shape)}{hint}")
    if not images.is_floating_point():
        raise VAEError(f"{what} must be floating point in [-1, 1], got {images.dtype}")
    if images.shape[-1] < 1 or images.shape[-2] < 1 or images.shape[0] < 1:
        raise VAEError(f"{what} must not be empty, got shape {list(images.shape)}")
    if not torch.isfinite(images).all():
        raise VAEError(f"there are NaN or Inf values in {what}; clean them before {purpose}")
    return images


def check_video(video: torch.Tensor, time_downscale: int = 4) -> torch.Tensor:
    """A video batch [B,3,T,H,W] with T = 1 + 4k frames, floating point, finite; else a VAEError."""
    if video.shape[1] != 3:
        hint = " (channels last? permute to [B,3,T,H,W])" if video.shape[-1] == 3 else ""
        raise VAEError(f"videos must be [B,3,T,H,W], got shape {list(video.shape)}{hint}")
    t = video.shape[2]
    if t < 1 or (t - 1) % time_downscale:
        k = (t - 1) // time_downscale
        raise VAEError(f"a video needs 1 + {time_downscale}k frames (this VAE compresses time {time_downscale}x after "
                       f"the first frame), got {t}: use {1 + k * time_downscale} or {1 + (k + 1) * time_downscale} frames")
    check_images(video[:, :, 0], "videos", "encoding")
    if not torch.isfinite(video).all():
        raise VAEError("there are NaN or Inf values in videos; clean them before encoding")
    return video


def _latent_channel_hint(c: int) -> str:
    known = {4: "4 channels is SD1.x/SD2/SDXL", 16: "16 channels is SD3, FLUX.1 or Wan 2.1 / Qwen-Image", 32: "32 channels is DC-AE f32c32 "
             "(SANA) or FLUX.2", 128: "128 channels is DC-AE f64c128 or patchified FLUX.2", 512: "512 is DC-AE f128c512"}
    return known.get(c, f"no released VAE family here uses {c} channels")
