"""AutoencoderKLWan / AutoencoderKLQwenImage: the causal video VAE of Wan 2.1, Wan 2.2 14B, Qwen-Image and
Qwen-Image-Edit (one network; the classes differ only in their config names).

Videos are [B,3,T,H,W] with T = 1 + 4k, images T = 1. Encoder: causal 3-D conv_in -> down_blocks (a flat list of
residual blocks and resamplers; the last two halve time too) -> mid block (residual, per-frame attention,
residual) -> RMS norm -> SiLU -> conv_out (2 x 16 channels) -> quant_conv. Decoder: post_quant_conv -> conv_in
-> mid block -> up_blocks (resnets, then an upsampler; the first two double time after the first frame) -> RMS
norm -> SiLU -> conv_out, clamped to [-1, 1] as diffusers and ComfyUI do. Every conv is causal in time, so a run
in chunks of frames (``video.py``) equals the run on all frames.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Mapping

import torch
from torch import nn

from .convert import rename_keys
from .errors import VAEError
from .family import Family
from .ops import (CausalConv3d, Chain, Conv, Described, EagerContext, FrameAttention, Fn, Module, PerFrame, Residual,
                  RMSNorm, TimeDownsample, TimeUpsample, Up, act)

LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

# The diffusers config fields that change the model, with diffusers' defaults (AutoencoderKLWan's names;
# AutoencoderKLQwenImage's ``input_channels`` is read as ``in_channels``).
DEFAULT_CONFIG: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "in_channels": 3,
    "out_channels": 3,
    "latents_mean": LATENTS_MEAN,
    "latents_std": LATENTS_STD,
    "is_residual": False,
    "patch_size": None,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "wan2.1": {"base_dim": 96, "z_dim": 16, "latents_mean": LATENTS_MEAN, "latents_std": LATENTS_STD},
    "qwen-image": {"base_dim": 96, "z_dim": 16, "latents_mean": LATENTS_MEAN, "latents_std": LATENTS_STD},
}
VARIANT_FACTORS = ("latents_mean", "latents_std")

SILU = act("silu")


def rms(dim: int, video: bool = True) -> RMSNorm:
    return RMSNorm(dim, video=video)


class ResidualBlock(Described):
    """RMS -> SiLU -> causal conv -> RMS -> SiLU -> causal conv, plus a (1x1x1 conv when channels change) shortcut."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = rms(in_dim)
        self.conv1 = nn.Conv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = rms(out_dim)
        self.conv2 = nn.Conv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def describe(self):
        main = [Module(self.norm1), SILU, CausalConv3d(self.conv1), Module(self.norm2), SILU, CausalConv3d(self.conv2)]
        return [Residual(main, [CausalConv3d(self.conv_shortcut)] if self.conv_shortcut is not None else [])]


class Resample(Described):
    """downsample2d/3d: zero pad right and bottom, 3x3 stride-2 conv per frame (3d: then halve time);
    upsample2d/3d: (3d: double time after the first frame, then) nearest x2 and a 3x3 conv per frame to half the
    channels. ``resample.1`` is the conv, as in the weights (``resample.0`` is the pad or the upsampling)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = nn.Conv3d(dim, dim * 2, (3, 1, 1))
        else:
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def describe(self):
        conv = self.resample[1]
        if self.mode.startswith("up"):
            # nearest-exact and nearest pick the same pixels for a factor of 2
            return [TimeUpsample(self.time_conv) if self.mode == "upsample3d" else None, PerFrame(Up(2)),
                    PerFrame(Conv(conv))]
        return [PerFrame(Conv(conv, pad=(0, 1, 0, 1))),
                TimeDownsample(self.time_conv) if self.mode == "downsample3d" else None]


class AttentionBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = rms(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)


class MidBlock(Described):
    def __init__(self, dim: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])

    def describe(self):
        return [self.resnets[0], FrameAttention(self.attentions[0]), self.resnets[1]]


class Encoder(Described):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        dim, mult, n_res = cfg["base_dim"], list(cfg["dim_mult"]), cfg["num_res_blocks"]
        dims = [dim * u for u in [1] + mult]
        self.conv_in = nn.Conv3d(cfg["in_channels"], dims[0], 3, padding=1)
        blocks = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(n_res):
                blocks.append(ResidualBlock(a, b))
                a = b
            if i != len(mult) - 1:
                blocks.append(Resample(b, "downsample3d" if cfg["temperal_downsample"][i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = rms(dims[-1])
        self.conv_out = nn.Conv3d(dims[-1], 2 * cfg["z_dim"], 3, padding=1)

    def describe(self):
        return [CausalConv3d(self.conv_in), *self.down_blocks, self.mid_block, Module(self.norm_out), SILU,
                CausalConv3d(self.conv_out)]


class UpBlock(Described):
    def __init__(self, in_dim: int, out_dim: int, n: int, mode: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(n)])
        self.upsamplers = nn.ModuleList([Resample(out_dim, mode)]) if mode else None

    def describe(self):
        return [*self.resnets, *(self.upsamplers or [])]


class Decoder(Described):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        dim, mult, n_res = cfg["base_dim"], list(cfg["dim_mult"]), cfg["num_res_blocks"]
        up_time = list(cfg["temperal_downsample"])[::-1]
        dims = [dim * u for u in [mult[-1]] + mult[::-1]]
        self.conv_in = nn.Conv3d(cfg["z_dim"], dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                a //= 2  # the previous upsampler halved the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if up_time[i] else "upsample2d"
            blocks.append(UpBlock(a, b, n_res + 1, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = rms(dims[-1])
        self.conv_out = nn.Conv3d(dims[-1], cfg["out_channels"], 3, padding=1)

    def describe(self):
        return [CausalConv3d(self.conv_in), self.mid_block, *self.up_blocks, Module(self.norm_out), SILU,
                CausalConv3d(self.conv_out)]


def _clamp(x: torch.Tensor, own: bool) -> torch.Tensor:
    return x.clamp_(-1.0, 1.0) if own else x.clamp(-1.0, 1.0)


class AutoencoderKLWan(nn.Module):
    """encode(x [B,3,T,H,W]) -> (mean, logvar) [B,16,1+(T-1)/4,H/8,W/8]; decode(z) -> video in [-1, 1]."""

    video = True

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **config}
        if cfg.get("is_residual") or cfg.get("patch_size") or cfg["z_dim"] == 48:
            raise VAEError("this is the Wan 2.2 VAE of TI2V-5B (48 latent channels, residual blocks, patchified), "
                           "a different network from the Wan 2.1 / Qwen-Image VAE: it is not supported. Use "
                           "ComfyUI's own VAE loader for it, or the Wan 2.1 VAE for Wan 2.1 / 2.2-14B models")
        if cfg["attn_scales"]:
            raise VAEError(f"attn_scales={cfg['attn_scales']} (attention inside the down/up blocks) is not supported; "
                           "every released Wan VAE has attn_scales=[]")
        self.config = cfg
        z = cfg["z_dim"]
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv3d(z, z, 1)
        self.decoder = Decoder(cfg)
        self.latent_channels = z
        self.downscale = 2 ** (len(cfg["dim_mult"]) - 1)
        self.time_downscale = 2 ** sum(bool(t) for t in cfg["temperal_downsample"])

    def describe(self, direction: str):
        if direction == "encode":
            return [self.encoder, CausalConv3d(self.quant_conv)]
        return [CausalConv3d(self.post_quant_conv), self.decoder, Fn(_clamp)]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = Chain(self.describe("encode")).eager(x, False, EagerContext()).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return Chain(self.describe("decode")).eager(z, False, EagerContext())


# --------------------------------------------------------------------------------------------------
# Formats. The original Wan layout (Wan2.1_VAE.pth, ComfyUI's wan_2.1_vae.safetensors and
# qwen_image_vae.safetensors) -> diffusers names, as diffusers' single-file converter maps it.
_RES = [(r"\.residual\.0\.gamma$", ".norm1.gamma"), (r"\.residual\.2\.", ".conv1."),
        (r"\.residual\.3\.gamma$", ".norm2.gamma"), (r"\.residual\.6\.", ".conv2."), (r"\.shortcut\.", ".conv_shortcut.")]


def original_renames(n_res: int = 2, levels: int = 4) -> list[tuple[str, str]]:
    """The rename table for a config: the original decoder numbers its blocks in one flat list (per level
    ``n_res + 1`` residual blocks, then the resampler)."""
    table = [
        (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
        (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
        (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
        (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
        (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
        (r"^conv1\.", "quant_conv."),
        (r"^conv2\.", "post_quant_conv."),
        (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    ]
    group = n_res + 2
    for i in range(levels * group):
        level, j = divmod(i, group)
        dst = f"decoder.up_blocks.{level}.upsamplers.0." if j == n_res + 1 else f"decoder.up_blocks.{level}.resnets.{j}."
        table.append((rf"^decoder\.upsamples\.{i}\.", dst))
    return table + _RES


def is_original(sd: Mapping[str, torch.Tensor]) -> bool:
    return "decoder.middle.0.residual.0.gamma" in sd or "encoder.middle.0.residual.0.gamma" in sd


def matches(sd: Mapping[str, torch.Tensor]) -> bool:
    return is_original(sd) or "decoder.mid_block.resnets.0.norm1.gamma" in sd or \
        "encoder.mid_block.resnets.0.norm1.gamma" in sd


def _refuse_wan22(sd: Mapping[str, torch.Tensor]) -> None:
    wan22 = "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd or any(".avg_shortcut" in k for k in sd)
    z = sd.get("decoder.conv1.weight", sd.get("decoder.conv_in.weight"))
    if wan22 or (z is not None and z.shape[1] == 48):
        raise VAEError("this is the Wan 2.2 VAE of TI2V-5B (48 latent channels, residual up/down blocks), a "
                       "different network from the Wan 2.1 / Qwen-Image VAE: it is not supported. Use ComfyUI's own "
                       "VAE loader for it, or the Wan 2.1 VAE (wan_2.1_vae.safetensors) for Wan 2.1 / 2.2-14B models")


def convert(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    _refuse_wan22(sd)
    if not is_original(sd):
        return dict(sd)
    n_up = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"decoder\.upsamples\.(\d+)\.", k))), default=-1)
    heads = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.upsamples\.(\d+)\.(resample|time_conv)\.", k))}
    group = (min(heads) + 1) if heads else 4
    levels = -(-n_up // group) if n_up else 4
    return rename_keys(sd, original_renames(group - 2, levels))


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    base = sd["encoder.conv_in.weight"].shape[0] if "encoder.conv_in.weight" in sd else \
        sd["decoder.conv_out.weight"].shape[1]
    z = sd["decoder.conv_in.weight"].shape[1] if "decoder.conv_in.weight" in sd else \
        sd["encoder.conv_out.weight"].shape[0] // 2
    if "decoder.up_blocks.0.resnets.0.norm1.gamma" in sd:
        n_up = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
        n_res = max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k)))
        mult = [sd[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0] // base for i in range(n_up)][::-1]
        time = [f"decoder.up_blocks.{i}.upsamplers.0.time_conv.weight" in sd for i in range(n_up - 1)][::-1]
        out = sd["decoder.conv_out.weight"].shape[0]
    else:  # an encoder alone
        blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
        resamplers = [i for i in blocks if f"encoder.down_blocks.{i}.resample.1.weight" in sd]
        n_res = resamplers[0] if resamplers else len(blocks)
        mult = [sd[f"encoder.down_blocks.{i}.conv1.weight"].shape[0] // base
                for i in range(0, len(blocks), n_res + 1)]
        time = [f"encoder.down_blocks.{i}.time_conv.weight" in sd for i in resamplers]
        out = 3
    cfg = {"base_dim": base, "z_dim": z, "dim_mult": mult, "num_res_blocks": n_res, "temperal_downsample": time,
           "out_channels": out}
    if "encoder.conv_in.weight" in sd:
        cfg["in_channels"] = sd["encoder.conv_in.weight"].shape[1]
    return cfg


def guess_variant(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], hints: Mapping[str, Any]) -> str:
    text = " ".join(str(v) for v in hints.values()).lower()
    if "qwen" in text or config.get("_class_name") == "AutoencoderKLQwenImage":
        return "qwen-image"
    return "wan2.1"


def build(config: Mapping[str, Any]) -> AutoencoderKLWan:
    cfg = dict(config)
    if "input_channels" in cfg:  # AutoencoderKLQwenImage's name
        cfg["in_channels"] = cfg.pop("input_channels")
    return AutoencoderKLWan(cfg)


FAMILY = Family(
    name="wan", module=sys.modules[__name__], diffusers_classes=("AutoencoderKLWan", "AutoencoderKLQwenImage"),
    default_variant="wan2.1", downscale=8, latent_channels=16,
    latent_formats={"Wan21": "wan2.1"}, video=True, channel_stats=True,
    preview_decoders={"wan2.1": "taew2_1 (TAEHV, madebyollin/taehv)", "qwen-image": "taew2_1 (TAEHV, madebyollin/taehv)"},
)
