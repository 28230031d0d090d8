"""AutoencoderDC (DC-AE, the VAE of SANA): deep compression autoencoders, 32x to 128x, as diffusers defines them.

Encoder: conv_in -> down_blocks (ResBlocks / EfficientViT blocks, then a downsampler) -> conv_out (+ channel-mean shortcut)
Decoder: conv_in (+ channel-repeat shortcut) -> up_blocks in reverse stage order (upsampler, then blocks)
         -> RMSNorm -> ReLU -> conv_out

The encoder is deterministic (no posterior: ``encode`` returns ``(latent, None)``). Scaling is applied by the
caller (``vae.VAE``), as in the SANA pipelines: ``z = latent * scaling_factor``, no shift.

Released variants (``VARIANTS``): dc-ae-f32c32-sana-1.0 / -sana-1.1 (SANA), dc-ae-f32c32-in-1.0 / -mix-1.0,
dc-ae-f64c128-in-1.0 / -mix-1.0, dc-ae-f128c512-in-1.0 / -mix-1.0.

What the weights cannot say (``guess_variant``):
- ``in`` and ``mix`` checkpoints have the same keys and shapes but different scaling factors. We pick, in order:
  ``variant=``; a diffusers folder's ``scaling_factor``; an ``in``/``mix`` token in the file or folder name
  (e.g. ``dc-ae-f32c32-in-1.0``); else ``mix``, as diffusers' single-file loader does.
- ``sana-1.0`` and ``sana-1.1`` share architecture and scaling (0.41407): ``sana-1.1`` only by name or ``variant=``.
- Activations are not stored: BatchNorm stages use ReLU and RMSNorm stages SiLU, as in every release.
- fp16 is not supported by SANA's DC-AE (its docs say bf16 or fp32): the presets set ``force_upcast`` so a
  float16 request loads in float32; bfloat16 works as is (attention and RMS statistics run in float32).

Formats: diffusers (folder or single file; our names are diffusers' names) and the original mit-han-lab
``model.safetensors`` (efficientvit names), converted by the ordered substring table below.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .convert import rename_keys, replace_substrings, squeeze_linear
from .errors import VAEError
from .family import Family
from .ops import (TO_CHANNELS_LAST, TO_CONTIGUOUS, Described, Fn, LinearAttention, Module, PixelShuffle,
                  PixelUnshuffle, Residual, UpConv, act, channels_last, mean_channel_groups)

# The diffusers config fields that change the model, with diffusers' defaults.
DEFAULT_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}

_RES, _VIT = "ResBlock", "EfficientViTBlock"


def _sana() -> dict[str, Any]:
    ch = [128, 256, 512, 512, 1024, 1024]
    ms = [[], [], [], [5], [5], [5]]
    return {
        "latent_channels": 32, "encoder_block_types": [_RES] * 3 + [_VIT] * 3, "decoder_block_types": [_RES] * 3 + [_VIT] * 3,
        "encoder_block_out_channels": ch, "decoder_block_out_channels": ch,
        "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
        "encoder_qkv_multiscales": ms, "decoder_qkv_multiscales": ms,
        # The Hub config says "Conv": anything but "pixel_unshuffle" / "interpolate" means the other block type.
        "downsample_block_type": "Conv", "upsample_block_type": "interpolate",
        "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407, "force_upcast": True,
    }


def _in_mix(latent: int, stages: int, scaling: float) -> dict[str, Any]:
    ch = [128, 256, 512, 512, 1024, 1024, 2048, 2048][:stages]
    extra = stages - 6
    return {
        "latent_channels": latent, "encoder_block_types": [_RES] * 3 + [_VIT] * (stages - 3),
        "decoder_block_types": [_RES] * 3 + [_VIT] * (stages - 3),
        "encoder_block_out_channels": ch, "decoder_block_out_channels": ch,
        "encoder_layers_per_block": [0, 4, 8, 2, 2, 2] + [2] * extra,
        "decoder_layers_per_block": [0, 5, 10, 2, 2, 2] + [2] * extra,
        "encoder_qkv_multiscales": [[]] * stages, "decoder_qkv_multiscales": [[]] * stages,
        "downsample_block_type": "pixel_unshuffle", "upsample_block_type": "pixel_shuffle",
        "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * (stages - 3),
        "decoder_act_fns": ["relu"] * 3 + ["silu"] * (stages - 3), "scaling_factor": scaling, "force_upcast": True,
    }


# Released configurations (scaling factors from each repository's config.json).
VARIANTS: dict[str, dict[str, Any]] = {
    "dc-ae-f32c32-sana-1.0": _sana(),
    "dc-ae-f32c32-sana-1.1": _sana(),
    "dc-ae-f32c32-in-1.0": _in_mix(32, 6, 0.3189),
    "dc-ae-f32c32-mix-1.0": _in_mix(32, 6, 0.4552),
    "dc-ae-f64c128-in-1.0": _in_mix(128, 7, 0.2889),
    "dc-ae-f64c128-mix-1.0": _in_mix(128, 7, 0.4538),
    "dc-ae-f128c512-in-1.0": _in_mix(512, 8, 0.4883),
    "dc-ae-f128c512-mix-1.0": _in_mix(512, 8, 0.3620),
}
# A variant decides these (a diffusers folder's own config.json wins over a guessed variant); the architecture
# comes from the weights, and an explicit variant= whose shapes do not fit them is refused by load_vae.
VARIANT_FACTORS = ("scaling_factor", "force_upcast")


# --------------------------------------------------------------------------------------------------
# Building blocks, each described in ``ops`` layers (the untiled forward and the tiled executor run that).

class RMSNorm2d(nn.Module):
    """RMS norm over the channels of a map, with weight and bias; the mean square is taken in float32.

    Normalises its input in place when that is float32 (``ops.Module(..., overwrites=True)`` hands it a tensor it
    owns)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.view(1, -1, 1, 1), self.bias.view(1, -1, 1, 1)
        if x.dtype == torch.float32:
            return x.mul_(self._scale(x)).mul_(w).add_(b)
        x32 = x.float()
        x32 = x32 * self._scale(x32)
        return torch.addcmul(b, x32.to(w.dtype), w)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """1 / RMS over the channels of a float32 map. On a channels_last map from the norm of each pixel's
        channel row (15x faster than the mean of the squares there, which is faster on NCHW)."""
        if channels_last(x):
            ms = torch.linalg.vector_norm(x, 2, 1, keepdim=True).square_().div_(x.shape[1])
        else:
            ms = x.square().mean(1, keepdim=True)
        return ms.add_(self.eps).rsqrt_()


def make_norm(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "rms_norm":
        return RMSNorm2d(channels)
    if norm_type == "batch_norm":
        return nn.BatchNorm2d(channels, eps=1e-5)  # running statistics: the model is always in eval mode
    raise VAEError(f"DC-AE norm type {norm_type!r} is not supported; use 'rms_norm' or 'batch_norm'")


def norm_op(norm: nn.Module) -> Module:
    return Module(norm, overwrites=isinstance(norm, RMSNorm2d))


class ResBlock(Described):
    """conv3x3 -> act -> conv3x3 (no bias) -> norm, plus the input."""

    def __init__(self, channels: int, norm_type: str, act_fn: str | None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = make_norm(norm_type, channels)
        self.act_fn = act_fn
        act(act_fn)  # an unknown name is refused at build time

    def describe(self):
        return [Residual([self.conv1, act(self.act_fn), self.conv2, norm_op(self.norm)])]


class MultiscaleProjection(nn.Module):
    """Aggregates q/k/v over a k x k neighbourhood: depthwise k x k conv, then a per-head-group 1x1 conv."""

    def __init__(self, channels: int, heads: int, kernel_size: int):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)


class MultiscaleLinearAttention(Described):
    """SANA's multi-scale ReLU linear attention ("LiteMLA") with its norm and residual: ``ops.LinearAttention``."""

    eps = 1e-15

    def __init__(self, channels: int, head_dim: int, kernel_sizes, norm_type: str):
        super().__init__()
        heads = channels // head_dim
        self.head_dim = head_dim
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(3 * channels, heads, k) for k in kernel_sizes)
        self.to_out = nn.Linear(channels * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = make_norm(norm_type, channels)

    def describe(self):
        return [LinearAttention(self)]


def _glu(x: torch.Tensor, own: bool) -> torch.Tensor:
    h, gate = x.chunk(2, dim=1)
    return h.mul_(F.silu(gate, inplace=True)) if own else h * F.silu(gate)


class GLUMBConv(Described):
    """Gated inverted bottleneck: 1x1 C->8C, SiLU, depthwise 3x3, x * SiLU(gate) (4C each), 1x1 4C->C, RMSNorm, + input."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = channels * expand
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def describe(self):
        return [Residual([self.conv_inverted, act("silu"), self.conv_depth, Fn(_glu, lambda c: c // 2),
                          self.conv_point, norm_op(self.norm)])]


class EfficientViTBlock(Described):
    def __init__(self, channels: int, head_dim: int, kernel_sizes, norm_type: str):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, norm_type)
        self.conv_out = GLUMBConv(channels)

    def describe(self):
        return [self.attn, self.conv_out]


def make_block(block_type: str, channels: int, head_dim: int, norm_type: str, act_fn: str | None, kernel_sizes):
    if block_type == _RES:
        return ResBlock(channels, norm_type, act_fn)
    if block_type == _VIT:
        return EfficientViTBlock(channels, head_dim, kernel_sizes, norm_type)
    raise VAEError(f"DC-AE block type {block_type!r} is not supported; use {_RES!r} or {_VIT!r}")


def group_mean(group: int) -> Fn:
    """Average every ``group`` consecutive channels."""
    return Fn(lambda x, own: mean_channel_groups(x, group), lambda c: c // group)


def repeat_channels(n: int) -> Fn:
    return Fn(lambda x, own: x.repeat_interleave(n, dim=1), lambda c: c * n)


class DCDownBlock2d(Described):
    """Halves the resolution: a 3x3 conv to out/4 channels + pixel-unshuffle ("pixel_unshuffle"), or a stride-2 3x3
    conv (any other type name). The shortcut is pixel-unshuffle followed by averaging groups of channels."""

    def __init__(self, in_channels: int, out_channels: int, pixel_unshuffle: bool, shortcut: bool = True):
        super().__init__()
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        self.group = in_channels * 4 // out_channels
        conv_out = out_channels // 4 if pixel_unshuffle else out_channels
        self.conv = nn.Conv2d(in_channels, conv_out, 3, 1 if pixel_unshuffle else 2, 1)

    def describe(self):
        main = [self.conv, PixelUnshuffle(2) if self.pixel_unshuffle else None]
        return [Residual(main, [PixelUnshuffle(2, self.group)])] if self.shortcut else main


class DCUpBlock2d(Described):
    """Doubles the resolution: nearest x2 + 3x3 conv ("interpolate"), or a 3x3 conv to 4*out + pixel-shuffle (any
    other type name). The shortcut repeats every channel and pixel-shuffles the result."""

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool, shortcut: bool = True):
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = out_channels * 4 // in_channels
        self.conv = nn.Conv2d(in_channels, out_channels if interpolate else 4 * out_channels, 3, 1, 1)

    def describe(self):
        main = [UpConv(self.conv)] if self.interpolate else [self.conv, PixelShuffle(2)]
        return [Residual(main, [PixelShuffle(2, self.repeats)])] if self.shortcut else main


def _per_stage(value, n: int) -> list:
    return [value] * n if isinstance(value, str) or value is None else list(value)


class Encoder(Described):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        ch, layers = list(cfg["encoder_block_out_channels"]), list(cfg["encoder_layers_per_block"])
        n = len(ch)
        types = _per_stage(cfg["encoder_block_types"], n)
        unshuffle = cfg["downsample_block_type"] == "pixel_unshuffle"  # exact match, as diffusers
        if layers[0] > 0:
            self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, 1, 1)
        else:
            self.conv_in = DCDownBlock2d(cfg["in_channels"], ch[1], unshuffle, shortcut=False)
        stages = []
        for i in range(n):
            blocks = [make_block(types[i], ch[i], cfg["attention_head_dim"], "rms_norm", "silu",
                                 cfg["encoder_qkv_multiscales"][i]) for _ in range(layers[i])]
            if i < n - 1 and layers[i] > 0:
                blocks.append(DCDownBlock2d(ch[i], ch[i + 1], unshuffle))
            stages.append(nn.Sequential(*blocks))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(ch[-1], cfg["latent_channels"], 3, 1, 1)
        self.out_group = ch[-1] // cfg["latent_channels"] if cfg["encoder_out_shortcut"] else 0

    def describe(self):
        out = Residual([self.conv_out], [group_mean(self.out_group)]) if self.out_group else self.conv_out
        return [TO_CHANNELS_LAST, self.conv_in, *self.down_blocks, out, TO_CONTIGUOUS]


class Decoder(Described):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        ch, layers = list(cfg["decoder_block_out_channels"]), list(cfg["decoder_layers_per_block"])
        n = len(ch)
        types = _per_stage(cfg["decoder_block_types"], n)
        norms = _per_stage(cfg["decoder_norm_types"], n)
        acts = _per_stage(cfg["decoder_act_fns"], n)
        interpolate = cfg["upsample_block_type"] == "interpolate"  # exact match, as diffusers
        self.conv_in = nn.Conv2d(cfg["latent_channels"], ch[-1], 3, 1, 1)
        self.in_repeats = ch[-1] // cfg["latent_channels"] if cfg["decoder_in_shortcut"] else 0
        stages = []
        for i in range(n):
            blocks = []
            if i < n - 1 and layers[i] > 0:
                blocks.append(DCUpBlock2d(ch[i + 1], ch[i], interpolate))
            blocks += [make_block(types[i], ch[i], cfg["attention_head_dim"], norms[i], acts[i],
                                  cfg["decoder_qkv_multiscales"][i]) for _ in range(layers[i])]
            stages.append(nn.Sequential(*blocks))
        self.up_blocks = nn.ModuleList(stages)  # stage order; run from the last (lowest resolution) to the first
        last = ch[0] if layers[0] > 0 else ch[1]
        self.norm_out = RMSNorm2d(last)
        self.conv_act = cfg["decoder_conv_act_fn"]
        act(self.conv_act)
        if layers[0] > 0:
            self.conv_out = nn.Conv2d(last, cfg["in_channels"], 3, 1, 1)
        else:
            self.conv_out = DCUpBlock2d(last, cfg["in_channels"], interpolate, shortcut=False)

    def describe(self):
        first = Residual([self.conv_in], [repeat_channels(self.in_repeats)]) if self.in_repeats else self.conv_in
        return [TO_CHANNELS_LAST, first, *reversed(self.up_blocks), norm_op(self.norm_out), act(self.conv_act),
                self.conv_out, TO_CONTIGUOUS]


def _check_config(cfg: Mapping[str, Any]) -> None:
    for side in ("encoder", "decoder"):
        n = len(cfg[f"{side}_block_out_channels"])
        keys = [f"{side}_layers_per_block", f"{side}_qkv_multiscales", f"{side}_block_types"]
        keys += ["decoder_norm_types", "decoder_act_fns"] if side == "decoder" else []
        bad = [f"{k} has {len(cfg[k])}" for k in keys if not isinstance(cfg[k], str) and len(cfg[k]) != n]
        if bad:
            raise VAEError(f"inconsistent DC-AE config: {side}_block_out_channels has {n} stages but "
                           f"{', '.join(bad)}")
    if len(cfg["encoder_block_out_channels"]) != len(cfg["decoder_block_out_channels"]):
        raise VAEError("inconsistent DC-AE config: the encoder and decoder have different numbers of stages")


class AutoencoderDC(nn.Module):
    """encode(x) -> (latent, None); decode(z) -> image. Scaling is applied by the caller (vae.VAE)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **config}
        _check_config(cfg)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.latent_channels = cfg["latent_channels"]
        self.downscale = 2 ** (len(cfg["encoder_block_out_channels"]) - 1)

    def describe(self, direction: str):
        return [self.encoder if direction == "encode" else self.decoder]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.encoder(x), None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


# --------------------------------------------------------------------------------------------------
# Formats. Our names are diffusers' names; the original mit-han-lab (efficientvit) names are renamed by data.

# Ordered plain-substring replacements (original -> diffusers), applied to every key in this order.
_ORIGINAL_COMMON = [
    ("main.", ""),
    ("op_list.", ""),
    ("context_module", "attn"),
    ("local_module", "conv_out"),
    ("aggreg.0.0", "to_qkv_multiscale.0.proj_in"),  # released models have at most one multiscale kernel
    ("aggreg.0.1", "to_qkv_multiscale.0.proj_out"),
    ("depth_conv.conv", "conv_depth"),
    ("inverted_conv.conv", "conv_inverted"),
    ("point_conv.conv", "conv_point"),
    ("point_conv.norm", "norm"),
    ("conv.conv.", "conv."),
    ("conv1.conv", "conv1"),
    ("conv2.conv", "conv2"),
    ("conv2.norm", "norm"),
    ("proj.norm", "norm_out"),
]


def _original_table(conv_stem: bool) -> list[tuple[str, str]]:
    """conv_stem: SANA's plain 3x3 project_in / project_out convs; else in/mix's pixel-(un)shuffle blocks."""
    return _ORIGINAL_COMMON + [
        ("encoder.project_in.conv", "encoder.conv_in" if conv_stem else "encoder.conv_in.conv"),
        ("encoder.project_out.0.conv", "encoder.conv_out"),
        ("encoder.stages", "encoder.down_blocks"),
        ("decoder.project_in.conv", "decoder.conv_in"),
        ("decoder.project_out.0", "decoder.norm_out"),
        ("decoder.project_out.2.conv", "decoder.conv_out" if conv_stem else "decoder.conv_out.conv"),
        ("decoder.stages", "decoder.up_blocks"),
    ]


# Then: the attention's output projection is a 1x1 conv there, a Linear here ...
_ORIGINAL_RENAMES = [(r"\.attn\.proj\.conv\.weight$", ".attn.to_out.weight")]
_ORIGINAL_TENSOR_FIXES = [(r"\.attn\.to_out\.weight$", squeeze_linear)]
# ... and its fused qkv 1x1 conv (3C, C, 1, 1) is split in thirds along the output channels.
_ORIGINAL_SPLITS = [(r"\.attn\.qkv\.conv\.weight$", (".attn.to_q.weight", ".attn.to_k.weight", ".attn.to_v.weight"))]


def split_keys(sd: Mapping[str, torch.Tensor], table) -> dict[str, torch.Tensor]:
    """Each key matching a pattern becomes len(names) keys, the tensor chunked equally along dim 0 (1x1 squeezed)."""
    out = {}
    for key, value in sd.items():
        for pattern, names in table:
            if re.search(pattern, key):
                for name, part in zip(names, value.chunk(len(names), dim=0)):
                    out[re.sub(pattern, name, key)] = squeeze_linear(part)
                break
        else:
            out[key] = value
    return out


def is_original(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.stages.", "decoder.stages.", "decoder.project_in.")) for k in sd)


def matches(sd: Mapping[str, torch.Tensor]) -> bool:
    if is_original(sd):
        return any(".op_list." in k for k in sd)
    blocks = any(re.match(r"(encoder\.down_blocks|decoder\.up_blocks)\.\d+\.\d+\.", k) for k in sd)
    return blocks and ("decoder.norm_out.weight" in sd or "encoder.conv_out.weight" in sd)


def convert(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either format -> our (diffusers) names."""
    if not is_original(sd):
        return dict(sd)
    out = replace_substrings(sd, _original_table(conv_stem="encoder.project_in.conv.bias" in sd))
    out = rename_keys(out, _ORIGINAL_RENAMES, _ORIGINAL_TENSOR_FIXES)
    return split_keys(out, _ORIGINAL_SPLITS)


# --------------------------------------------------------------------------------------------------
# Config from the weights (diffusers names).

def _stages(sd: Mapping[str, torch.Tensor], prefix: str, n: int) -> list[list[tuple[str, str]]]:
    """For each stage: [(kind, key prefix)] with kind 'res', 'vit' or 'resample', in module order."""
    entries: dict[int, set[int]] = {}
    for k in sd:
        if m := re.match(rf"{prefix}\.(\d+)\.(\d+)\.", k):
            entries.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = []
    for i in range(n):
        row = []
        for j in sorted(entries.get(i, ())):
            p = f"{prefix}.{i}.{j}"
            kind = "res" if f"{p}.conv1.weight" in sd else "vit" if f"{p}.attn.to_q.weight" in sd else "resample"
            row.append((kind, p))
        stages.append(row)
    return stages


def _side_config(sd: Mapping[str, torch.Tensor], prefix: str, n: int) -> dict[str, list]:
    channels, layers, types, scales, bn = [], [], [], [], []
    for i, row in enumerate(_stages(sd, prefix, n)):
        blocks = [(kind, p) for kind, p in row if kind != "resample"]
        layers.append(len(blocks))
        if not blocks:
            channels.append(None)
            types.append(_RES)
            scales.append([])
            bn.append(None)
            continue
        kind, p = blocks[0]
        first = sd[f"{p}.conv1.weight"] if kind == "res" else sd[f"{p}.attn.to_q.weight"]
        channels.append(int(first.shape[0]))
        types.append(_RES if kind == "res" else _VIT)
        ks = []
        while f"{p}.attn.to_qkv_multiscale.{len(ks)}.proj_in.weight" in sd:
            ks.append(int(sd[f"{p}.attn.to_qkv_multiscale.{len(ks)}.proj_in.weight"].shape[-1]))
        scales.append(ks)
        bn.append(f"{p}.norm.running_mean" in sd or f"{p}.attn.norm_out.running_mean" in sd)
    for i in range(n):  # a stage without blocks (stage 0 of in/mix models) has no channels of its own
        if channels[i] is None:
            if i == 0 and n > 1 and channels[1] is not None:
                channels[0] = channels[1] // 2
            else:
                raise VAEError(f"unsupported DC-AE layout: stage {i} of {prefix.split('.')[0]} has no blocks")
        if bn[i] is None:
            bn[i] = bn[i + 1] if i + 1 < n and bn[i + 1] is not None else False
    return {"channels": channels, "layers": layers, "types": types, "scales": scales, "bn": bn}


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Everything the weights say about the architecture (diffusers names)."""
    try:
        idx = [int(m.group(2)) for k in sd if (m := re.match(r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.", k))]
        n = 1 + max(idx)
        enc = _side_config(sd, "encoder.down_blocks", n)
        dec = _side_config(sd, "decoder.up_blocks", n)
        latent = int(sd["encoder.conv_out.weight"].shape[0] if "encoder.conv_out.weight" in sd
                     else sd["decoder.conv_in.weight"].shape[1])
        stem = sd.get("encoder.conv_in.weight", sd.get("encoder.conv_in.conv.weight"))
        unshuffle = True
        for i in range(n - 1):
            down = [p for kind, p in _stages(sd, "encoder.down_blocks", n)[i] if kind == "resample"]
            if down:
                unshuffle = sd[f"{down[0]}.conv.weight"].shape[0] * 4 == enc["channels"][i + 1]
                break
        else:
            if "encoder.conv_in.conv.weight" in sd:
                unshuffle = stem.shape[0] * 4 == enc["channels"][1]
        interpolate = False
        for i in range(n - 1):
            ups = [p for kind, p in _stages(sd, "decoder.up_blocks", n)[i] if kind == "resample"]
            if ups:
                interpolate = sd[f"{ups[0]}.conv.weight"].shape[0] == dec["channels"][i]
                break
        head_dim = 32
        for k, v in sd.items():
            if k.endswith(".to_qkv_multiscale.0.proj_out.weight"):
                head_dim = int(v.shape[1])
                break
    except (KeyError, ValueError, IndexError) as e:
        raise VAEError(f"these DC-AE weights are incomplete or of an unknown layout ({type(e).__name__}: {e})") from None
    return {
        "in_channels": int(stem.shape[1]) if stem is not None else 3,
        "latent_channels": latent,
        "attention_head_dim": head_dim,
        "encoder_block_types": enc["types"],
        "decoder_block_types": dec["types"],
        "encoder_block_out_channels": enc["channels"],
        "decoder_block_out_channels": dec["channels"],
        "encoder_layers_per_block": enc["layers"],
        "decoder_layers_per_block": dec["layers"],
        "encoder_qkv_multiscales": enc["scales"],
        "decoder_qkv_multiscales": dec["scales"],
        "downsample_block_type": "pixel_unshuffle" if unshuffle else "Conv",
        "upsample_block_type": "interpolate" if interpolate else "pixel_shuffle",
        "decoder_norm_types": ["batch_norm" if b else "rms_norm" for b in dec["bn"]],
        # not stored in the weights: every release pairs BatchNorm with ReLU and RMSNorm with SiLU
        "decoder_act_fns": ["relu" if b else "silu" for b in dec["bn"]],
    }


_SHAPE_KEYS = ("latent_channels", "encoder_block_out_channels", "decoder_block_out_channels",
               "encoder_layers_per_block", "decoder_layers_per_block")


def _same_architecture(config: Mapping[str, Any], preset: Mapping[str, Any]) -> bool:
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    if any(norm(config.get(k)) != norm(preset[k]) for k in _SHAPE_KEYS):
        return False
    sana = preset["downsample_block_type"] != "pixel_unshuffle"
    return (config.get("downsample_block_type") != "pixel_unshuffle") == sana


def guess_variant(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], hints: Mapping[str, Any]) -> str:
    """Shapes give the architecture; in vs mix and sana-1.0 vs 1.1 need the config's scaling or a name."""
    candidates = [name for name, preset in VARIANTS.items() if _same_architecture(config, preset)]
    if not candidates:
        return "custom"
    scaling = config.get("scaling_factor")
    by_scaling = [c for c in candidates if scaling is not None and abs(scaling - VARIANTS[c]["scaling_factor"]) < 1e-6]
    if len(by_scaling) == 1:
        return by_scaling[0]
    pool = by_scaling or candidates
    text = " ".join(str(v) for v in hints.values()).lower()
    for name in pool:
        kind, version = name.split("-")[3:5]  # sana / in / mix, "1.0" / "1.1"
        if kind == "sana" and re.search(r"sana[-_ .]?v?" + version.replace(".", "[._]"), text):
            return name
        if kind in ("in", "mix") and re.search(rf"(^|[^a-z0-9]){kind}([-_ .]|$)", text):
            return name
    default = [c for c in pool if c.endswith(("sana-1.0", "mix-1.0"))]
    return (default or pool)[0]


def build(config: Mapping[str, Any]) -> AutoencoderDC:
    """load_vae calls this on the meta device and assigns the weights (no random init of ~1B parameters)."""
    return AutoencoderDC(config)


def _tiny_latent(model, latent_hw) -> bool:
    """DC-AE attends quadratically over at most head_dim tokens: such a latent gains nothing from tiling."""
    return latent_hw[0] * latent_hw[1] <= model.config.get("attention_head_dim", 32)


FAMILY = Family(
    name="dc", module=sys.modules[__name__], diffusers_classes=("AutoencoderDC",),
    default_variant="dc-ae-f32c32-sana-1.0", downscale=32, latent_channels=32,
    # wide layers: recomputing halos costs more than storing one more activation
    fuse_halo=0.06, untiled_below=_tiny_latent,
    preview={"dc-ae-f32c32-sana-1.0": "taesana", "dc-ae-f32c32-sana-1.1": "taesana"},
)
