"""AutoencoderKLFlux2: the VAE of FLUX.2 (dev and klein).

The network is AutoencoderKL's (``kl.py``: 128/256/512/512, GroupNorm 32, mid-block attention, both 1x1 quant
convs) with 32 latent channels; ``encode``/``decode`` work on those raw latents, as diffusers' do. What FLUX.2 adds
is the stage its pipeline (and ComfyUI, inside its VAE) runs around the network: a 2x2 patchify of the raw latent
``[B,32,h,w] -> [B,128,h/2,w/2]`` (channel = c*4 + 2*row + col) and a normalisation by the BatchNorm's running
statistics ``bn`` (128 channels, no affine, eps 1e-4). ``to_diffusion``/``from_diffusion`` are that stage and its
exact inverse; the diffusion-space latent is what a FLUX.2 transformer samples and what ComfyUI's LATENT holds.
Both are pointwise per 2x2 patch, so the exact tiling of the raw network carries over unchanged.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Mapping

import torch
from torch import nn

from . import kl
from .errors import VAEError
from .family import Family

DEFAULT_CONFIG: dict[str, Any] = {
    **kl.DEFAULT_CONFIG,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 32,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "sample_size": 1024,
    "decoder_block_out_channels": None,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": [2, 2],
}

VARIANTS: dict[str, dict[str, Any]] = {
    "flux2": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
              "latent_channels": 32, "scaling_factor": 1.0, "shift_factor": 0.0, "use_quant_conv": True,
              "use_post_quant_conv": True, "batch_norm_eps": 1e-4, "patch_size": [2, 2], "sample_size": 1024,
              "force_upcast": True},
}
VARIANT_FACTORS = ("force_upcast", "sample_size", "batch_norm_eps")


def patchify(z: torch.Tensor, p: int = 2, q: int = 2) -> torch.Tensor:
    """[B,C,h,w] -> [B,C*p*q,h/p,w/q], channel index c*p*q + row*q + col (the FLUX.2 pipeline's order)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // p, p, w // q, q).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * q, h // p, w // q)


def unpatchify(z: torch.Tensor, p: int = 2, q: int = 2) -> torch.Tensor:
    """The exact inverse of ``patchify``."""
    b, cpq, h, w = z.shape
    c = cpq // (p * q)
    return z.reshape(b, c, p, q, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * q)


class AutoencoderKLFlux2(kl.AutoencoderKL):
    """kl.AutoencoderKL plus the patchify + BatchNorm stage (running statistics only, always in eval mode)."""

    def __init__(self, config: Mapping[str, Any]):
        cfg = {**DEFAULT_CONFIG, **config}
        dec_ch = cfg.get("decoder_block_out_channels")
        if dec_ch is not None and list(dec_ch) != list(cfg["block_out_channels"]):
            raise VAEError(f"flux2: decoder_block_out_channels {list(dec_ch)} differ from block_out_channels "
                           f"{list(cfg['block_out_channels'])}; no released FLUX.2 VAE does that and it is not supported")
        super().__init__(cfg)
        self.patch = tuple(int(v) for v in cfg["patch_size"])
        self.bn_eps = float(cfg["batch_norm_eps"])
        self.bn = nn.BatchNorm2d(math.prod(self.patch) * self.latent_channels, eps=self.bn_eps,
                                 momentum=cfg["batch_norm_momentum"], affine=False, track_running_stats=True)
        self.bn.eval()
        self.diffusion_channels = math.prod(self.patch) * self.latent_channels
        self.diffusion_downscale = self.downscale * self.patch[0]

    def train(self, mode: bool = True):  # the statistics are weights here: never update them
        super().train(mode)
        self.bn.eval()
        return self

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.bn.running_mean.to(z.device, z.dtype).view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1).to(z.device, torch.float32) + self.bn_eps)
        return mean, std.to(z.dtype)

    def to_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """raw [B,32,h,w] (h, w even) -> diffusion space [B,128,h/2,w/2]: patchify, then (z - mean) / sqrt(var + eps)."""
        p, q = self.patch
        if z.shape[-2] % p or z.shape[-1] % q:
            raise VAEError(f"a FLUX.2 raw latent must have an even size to be patchified, got {list(z.shape)}: "
                           f"encode an image whose sides are a multiple of {self.diffusion_downscale}")
        x = patchify(z, p, q)
        mean, std = self._stats(x)
        return (x - mean) / std

    def from_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """diffusion space [B,128,h,w] -> raw [B,32,2h,2w]: z * sqrt(var + eps) + mean, then unpatchify."""
        mean, std = self._stats(z)
        return unpatchify(z * std + mean, *self.patch)


# --------------------------------------------------------------------------------------------------
# Formats: diffusers names (ours), or the original BFL ldm layout (FLUX.1's names plus ``bn.*``).

def _kl_like(sd: Mapping[str, torch.Tensor]) -> bool:
    return "decoder.conv_in.weight" in sd or "decoder.up_blocks.0.resnets.0.norm1.weight" in sd or kl.is_ldm(sd)


def matches(sd: Mapping[str, torch.Tensor]) -> bool:
    """A KL encoder/decoder with a BatchNorm of 4x the latent channels over the patchified latent."""
    if "bn.running_mean" not in sd or not _kl_like(sd):
        return False
    conv_in = sd.get("decoder.conv_in.weight")
    return conv_in is None or sd["bn.running_mean"].shape[0] == 4 * conv_in.shape[1]


def convert(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = kl.convert(sd)
    out.setdefault("bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))  # a counter, absent in some files
    return out


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    config = kl.infer_config(sd)
    lat = config["latent_channels"]
    n = sd["bn.running_mean"].shape[0]
    if n != 4 * lat or "bn.running_var" not in sd:
        raise VAEError(f"flux2: the BatchNorm has {n} channels for {lat} latent channels (expected {4 * lat}, "
                       "with running_mean and running_var): the file is not a FLUX.2 VAE or is damaged")
    return config


def guess_variant(sd, config, hints) -> str:
    return "flux2" if config.get("latent_channels") == 32 and list(config.get("block_out_channels", [])) == \
        [128, 256, 512, 512] else "custom"


def build(config: Mapping[str, Any]) -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(config)


FAMILY = Family(
    name="flux2", module=sys.modules[__name__], diffusers_classes=("AutoencoderKLFlux2",), default_variant="flux2",
    downscale=8, latent_channels=32, comfy_latent="diffusion",
    preview={"flux2": "taef2"}, latent_formats={"Flux2": "flux2"},
)
