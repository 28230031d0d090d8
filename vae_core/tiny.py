"""AutoencoderTiny: madebyollin's TAESD family of tiny distilled autoencoders, named as diffusers names them.

    Block(c)  = ReLU( conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv3x3 (x)  +  x )
    Encoder   = [x -> (x+1)/2] conv 3->64 | Block | (stride-2 conv, Block x3) x3 | conv 64->L
    Decoder   = [z -> 3 tanh(z/3)] conv L->64 | ReLU | (Block x3, nearest x2, conv) x3 | Block | conv 64->3 | [y -> 2y-1]

Two later members widen that topology (both are config fields here, not separate code paths):
- taef2 (FLUX.2, ``midblock_group_norm``): the three blocks at the lowest resolution first add a global
  branch ``x + conv1x1(ReLU(GroupNorm(4)(conv1x1(x))))`` (4x wider inside). The GroupNorm makes it not tile-local.
- taesana (DC-AE f32c32, ``encoder_stem_channels``): a 32x model. The encoder starts with two stride-2 convs
  (3->32->64, ReLU after each) instead of the stride-1 conv; the decoder has five stages of 256,128,64,64,64
  channels, and the conv after each upsampling moves to the next stage's width.

The networks read and write the latents a diffusion model samples in (TAESD's "scale factor" is 1), so the
model says ``native_space = "diffusion"`` and ``vae.VAE`` converts raw latents with the variant's
scaling_factor/shift_factor, exactly as ComfyUI's ``vae_scale``/``vae_shift``. diffusers' AutoencoderTiny configs
say scaling 1.0 for the same reason; the variant preset replaces that so raw latents stay interchangeable with
the full VAE of the same latent space.

Formats read: diffusers (``encoder.layers.N`` / ``decoder.layers.N``), madebyollin's split files (bare
``nn.Sequential`` indices; the decoder file counts the parameter-free clamp as index 0), a pair of those,
ComfyUI's merged dict (``taesd_encoder.`` / ``taesd_decoder.`` plus ``vae_scale``/``vae_shift``), and a lone
encoder or decoder file (the other half is then None).
"""
from __future__ import annotations

import re
import sys
from typing import Any, Mapping

import torch
from torch import nn

from .convert import WeightParts, rename_keys
from .errors import VAEError
from .family import Family
from .ops import TO_CHANNELS_LAST, TO_CONTIGUOUS, Chain, Described, EagerContext, Fn, Norm, Residual, Up, act

DEFAULT_CONFIG: dict[str, Any] = {
    # diffusers AutoencoderTiny fields
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "force_upcast": False,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    # ours: the taef2 / taesana extensions and half-models
    "midblock_group_norm": False,  # taef2: GroupNorm "pool" branch in the lowest-resolution blocks
    "encoder_stem_channels": [],  # taesana: stride-2 convs (ReLU after each) replacing the first stride-1 conv
    "has_encoder": True,
    "has_decoder": True,
}

_F32 = {"encoder_stem_channels": [32, 64], "num_encoder_blocks": [1, 3, 3, 3],
        "decoder_block_out_channels": [256, 128, 64, 64, 64], "num_decoder_blocks": [3, 3, 3, 3, 1]}

# Released weights (madebyollin/taesd). scaling/shift are those of the latent space each one was distilled
# for (the same as ComfyUI's vae_scale/vae_shift for TAESD files).
VARIANTS: dict[str, dict[str, Any]] = {
    "taesd": {"latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": 0.0},  # SD1.x / SD2
    "taesdxl": {"latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": 0.0},  # SDXL
    "taesd3": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609},  # SD3 / SD3.5
    "taef1": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159},  # FLUX.1, HiDream, Z-Image
    "taef2": {"latent_channels": 32, "scaling_factor": 1.0, "shift_factor": 0.0,  # FLUX.2, raw 32-ch latents
              "midblock_group_norm": True},
    "taesana": {"latent_channels": 32, "scaling_factor": 0.41407, "shift_factor": 0.0, **_F32},  # DC-AE f32c32
}
VARIANT_FACTORS = ("scaling_factor", "shift_factor")

CLAMP = 3.0  # the decoder squashes its input into (-3, 3) with 3*tanh(z/3)


# --------------------------------------------------------------------------------------------------
# Model

def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class ReLU(Described):
    def describe(self):
        return [act("relu")]


class Upsample(Described):
    def __init__(self, factor: int, mode: str):
        super().__init__()
        self.factor, self.mode = factor, mode

    def describe(self):
        return [Up(self.factor, self.mode)]


class AutoencoderTinyBlock(Described):
    """Three 3x3 convs with a residual (1x1 conv when the width changes), ReLU after the sum.

    ``pool`` (taef2 only): a residual 1x1 -> GroupNorm(4) -> ReLU -> 1x1 applied to the input first.
    """

    def __init__(self, c_in: int, c_out: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv3x3(c_in, c_out), ReLU(), conv3x3(c_out, c_out), ReLU(), conv3x3(c_out, c_out))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.pool = nn.Sequential(nn.Conv2d(c_in, 4 * c_in, 1, bias=False), nn.GroupNorm(4, 4 * c_in),
                                  ReLU(), nn.Conv2d(4 * c_in, c_in, 1, bias=False)) if pool else None

    def describe(self):
        pool = [Residual([self.pool[0], Norm(self.pool[1], "relu"), self.pool[3]])] if self.pool is not None else []
        skip = [self.skip] if isinstance(self.skip, nn.Conv2d) else []
        return pool + [Residual([self.conv], skip, post=act("relu"))]


class EncoderTiny(Described):
    """[-1,1] image -> diffusion-space latent. ``layers`` is one flat Sequential, as in the released files."""

    def __init__(self, in_channels: int, latent_channels: int, channels, num_blocks, stem=(), pool: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        if stem:  # taesana: downscale by 2 per stem conv before the first block
            widths = [in_channels, *stem]
            for a, b in zip(widths, widths[1:]):
                layers += [conv3x3(a, b, stride=2), ReLU()]
        last = len(num_blocks) - 1
        for i, (c, n) in enumerate(zip(channels, num_blocks)):
            if i == 0:
                if not stem:
                    layers.append(conv3x3(in_channels, c))
            else:
                layers.append(conv3x3(channels[i - 1], c, stride=2, bias=False))
            layers += [AutoencoderTinyBlock(c, c, pool=pool and i == last) for _ in range(n)]
        layers.append(conv3x3(channels[-1], latent_channels))
        self.layers = nn.Sequential(*layers)
        self.downscale = 2 ** (len(stem) + len(num_blocks) - 1)

    def describe(self):
        return [Fn(lambda x, own: x.add(1).div(2)), TO_CHANNELS_LAST, self.layers, TO_CONTIGUOUS]  # on [0, 1] images


class DecoderTiny(Described):
    """Diffusion-space latent -> [-1,1] image (not clamped). ``skip_upsamples``: leave out the last upsamplings
    (a smaller picture for the same cost per pixel: the size-capped previews)."""

    def __init__(self, latent_channels: int, out_channels: int, channels, num_blocks, upscale: int = 2,
                 upsample_fn: str = "nearest", pool: bool = False):
        super().__init__()
        layers: list[nn.Module] = [conv3x3(latent_channels, channels[0]), ReLU()]
        last = len(num_blocks) - 1
        for i, (c, n) in enumerate(zip(channels, num_blocks)):
            layers += [AutoencoderTinyBlock(c, c, pool=pool and i == 0) for _ in range(n)]
            if i < last:
                layers += [Upsample(upscale, upsample_fn), conv3x3(c, channels[i + 1], bias=False)]
            else:
                layers.append(conv3x3(c, out_channels))
        self.layers = nn.Sequential(*layers)
        self.upsamples = last
        self.upscale = upscale ** last

    def describe(self, skip_upsamples: int = 0):
        ups = [m for m in self.layers if isinstance(m, Upsample)]
        dropped = set(map(id, ups[len(ups) - skip_upsamples:])) if skip_upsamples else set()
        layers = [m for m in self.layers if id(m) not in dropped]
        return [Fn(lambda z, own: torch.tanh(z / CLAMP) * CLAMP), TO_CHANNELS_LAST, *layers, TO_CONTIGUOUS,
                Fn(lambda x, own: x.mul(2).sub(1))]


class AutoencoderTiny(nn.Module):
    """encode(x) -> (latent, None); decode(z) -> image. Latents are diffusion-space (``native_space``)."""

    native_space = "diffusion"

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **config}
        self.config = cfg
        if cfg["act_fn"] != "relu" or cfg["upsample_fn"] not in Up.REACH:
            raise VAEError(f"AutoencoderTiny with act_fn={cfg['act_fn']!r}, upsample_fn={cfg['upsample_fn']!r} is not "
                           f"supported: use act_fn 'relu' and upsample_fn one of {', '.join(Up.REACH)} (every "
                           "released TAESD uses relu and nearest)")
        pool = bool(cfg["midblock_group_norm"])
        lat = cfg["latent_channels"]
        self.encoder = EncoderTiny(cfg["in_channels"], lat, cfg["encoder_block_out_channels"], cfg["num_encoder_blocks"],
                                   cfg["encoder_stem_channels"], pool) if cfg["has_encoder"] else None
        self.decoder = DecoderTiny(lat, cfg["out_channels"], cfg["decoder_block_out_channels"], cfg["num_decoder_blocks"],
                                   cfg["upsampling_scaling_factor"], cfg["upsample_fn"], pool) if cfg["has_decoder"] else None
        if self.encoder is None and self.decoder is None:
            raise VAEError("an AutoencoderTiny needs an encoder or a decoder (both are missing)")
        if self.encoder is not None and self.decoder is not None and self.encoder.downscale != self.decoder.upscale:
            raise VAEError(f"the TAESD encoder downscales {self.encoder.downscale}x but the decoder upscales "
                           f"{self.decoder.upscale}x: the two halves are from different models")
        self.latent_channels = lat
        self.downscale = self.encoder.downscale if self.encoder is not None else self.decoder.upscale
        self.latent_magnitude = float(cfg["latent_magnitude"])
        self.latent_shift = float(cfg["latent_shift"])

    def describe(self, direction: str, skip_upsamples: int = 0):
        if direction == "encode":
            return [self.encoder]
        return self.decoder.describe(skip_upsamples)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.encoder(x), None  # deterministic: no posterior

    def decode(self, z: torch.Tensor, skip_upsamples: int = 0) -> torch.Tensor:
        """``skip_upsamples``: decode to 1/2**k of the size by leaving out the last k upsamplings (previews)."""
        if not 0 <= skip_upsamples <= self.decoder.upsamples:
            raise VAEError(f"this TAESD decoder has {self.decoder.upsamples} upsamplings; cannot skip {skip_upsamples}")
        return Chain(self.decoder.describe(skip_upsamples)).eager(z, False, EagerContext())

    # 8-bit latent storage, as TAESD's PNG latents and diffusers' forward() use it
    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """diffusion-space latent -> [0, 1]"""
        return z.div(2 * self.latent_magnitude).add(self.latent_shift).clamp(0, 1)

    def unscale_latents(self, u: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> diffusion-space latent"""
        return u.sub(self.latent_shift).mul(2 * self.latent_magnitude)


# --------------------------------------------------------------------------------------------------
# Formats. Our names are diffusers' names (plus ``.pool.`` for taef2); everything else is renamed by tables.

_MAX_LAYERS = 64
# madebyollin's files are bare Sequential state dicts; the decoder's index 0 is the parameter-free clamp,
# which diffusers does not count (its clamp is in forward), so decoder indices shift down by one.
ENCODER_FILE_RENAMES = [(r"^(\d+)\.", r"encoder.layers.\1.")]
DECODER_FILE_RENAMES = [(rf"^{i}\.", f"decoder.layers.{i - 1}.") for i in range(1, _MAX_LAYERS)]
# ComfyUI keeps both halves in one dict under these prefixes (comfy/sd.py, load_taesd in nodes.py).
COMFY_RENAMES = ([(r"^taesd_encoder\.(\d+)\.", r"encoder.layers.\1.")]
                 + [(rf"^taesd_decoder\.{i}\.", f"decoder.layers.{i - 1}.") for i in range(1, _MAX_LAYERS)])
COMFY_SCALARS = {"vae_scale": "scaling_factor", "vae_shift": "shift_factor"}

_BARE_KEY = re.compile(r"^\d+\.(weight|bias|conv\.[024]\.(weight|bias)|skip\.weight|pool\.[013]\.(weight|bias))$")


class TinyWeights(dict):
    """Converted tensors, plus the scalars (scaling/shift) a ComfyUI-style dict carried beside them."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, float] | None = None):
        super().__init__(tensors)
        self.scalars = dict(scalars or {})


def _file_kind(sd: Mapping[str, torch.Tensor]) -> str | None:
    """'diffusers', 'comfy', 'encoder' (bare encoder file), 'decoder' (bare decoder file) or None."""
    if "encoder.layers.0.weight" in sd or "decoder.layers.0.weight" in sd:
        return "diffusers"
    if "taesd_encoder.0.weight" in sd or "taesd_decoder.1.weight" in sd:
        return "comfy"
    if not sd or not all(_BARE_KEY.match(k) for k in sd) or not any(k.endswith(".conv.0.weight") for k in sd):
        return None
    first = sd.get("0.weight")
    if first is not None and first.ndim == 4:
        return "encoder"
    if "0.bias" not in sd and isinstance(sd.get("1.weight"), torch.Tensor) and sd["1.weight"].ndim == 4:
        return "decoder"
    return None


def matches(sd: Mapping[str, torch.Tensor]) -> bool:
    return _file_kind(sd) is not None


def _convert_one(sd: Mapping[str, torch.Tensor], what: str = "the weights") -> TinyWeights:
    kind = _file_kind(sd)
    if kind == "diffusers":
        return TinyWeights({k: v for k, v in sd.items() if k.startswith(("encoder.layers.", "decoder.layers."))})
    if kind == "comfy":
        scalars = {COMFY_SCALARS[k]: float(sd[k]) for k in COMFY_SCALARS if k in sd and sd[k].numel() == 1}
        tensors = {k: v for k, v in sd.items() if k.startswith(("taesd_encoder.", "taesd_decoder."))}
        return TinyWeights(rename_keys(tensors, COMFY_RENAMES), scalars)
    if kind == "encoder":
        return TinyWeights(rename_keys(sd, ENCODER_FILE_RENAMES))
    if kind == "decoder":
        return TinyWeights(rename_keys(sd, DECODER_FILE_RENAMES))
    raise VAEError(f"{what} is not a TAESD file: expected madebyollin's taesd*_encoder/_decoder (.pth or "
                   f".safetensors), a diffusers AutoencoderTiny or a ComfyUI TAESD dict; got keys like "
                   f"{', '.join(list(sd)[:3]) or '(none)'}")


def convert(sd: Mapping[str, Any]) -> TinyWeights:
    """Any supported TAESD layout (or an encoder/decoder pair of them, ``WeightParts``) -> our names."""
    if not isinstance(sd, WeightParts):
        return _convert_one(sd)
    out = TinyWeights({})
    for n, part in enumerate(sd, 1):
        conv = _convert_one(part, f"file {n} of the TAESD pair")
        for half in ("encoder", "decoder"):
            if any(k.startswith(f"{half}.") for k in conv) and any(k.startswith(f"{half}.") for k in out):
                raise VAEError(f"the TAESD pair holds two {half}s: pass one *_encoder file and one *_decoder file")
        out.update(conv)
        out.scalars.update(conv.scalars)
    return out


def _layer_plan(sd: Mapping[str, torch.Tensor], half: str) -> list[tuple[int, str, torch.Tensor]]:
    """(index, 'block' | 'conv', the layer's first weight) for every Sequential index that has weights."""
    plan: dict[int, tuple[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.match(rf"{half}\.layers\.(\d+)\.(conv\.0\.weight|weight)$", key)
        if m:
            plan[int(m.group(1))] = ("block" if m.group(2) != "weight" else "conv", value)
    return [(i, *plan[i]) for i in sorted(plan)]


def _stages(plan: list[tuple[int, str, torch.Tensor]]) -> tuple[list[int], list[int]]:
    """Blocks grouped into stages at every conv between them -> (blocks per stage, width per stage)."""
    counts: list[int] = []
    widths: list[int] = []
    new_stage = True
    for _, kind, w in plan:
        if kind == "conv":
            new_stage = True
            continue
        if new_stage:
            counts.append(0)
            widths.append(w.shape[0])
            new_stage = False
        counts[-1] += 1
    return counts, widths


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Everything the weights say about the architecture (diffusers names, plus our extensions)."""
    config: dict[str, Any] = {"midblock_group_norm": any(".pool." in k for k in sd)}
    enc, dec = _layer_plan(sd, "encoder"), _layer_plan(sd, "decoder")
    config["has_encoder"], config["has_decoder"] = bool(enc), bool(dec)
    if not enc and not dec:
        raise VAEError("the TAESD weights hold neither encoder nor decoder layers")
    if enc:
        first_block = next((n for n, (_, kind, _w) in enumerate(enc) if kind == "block"), None)
        if first_block is None or enc[-1][1] != "conv":
            raise VAEError("the TAESD encoder weights are incomplete (no blocks, or no final conv)")
        stem = enc[:first_block]
        counts, widths = _stages(enc[first_block:-1])
        config.update({
            "in_channels": stem[0][2].shape[1],
            "encoder_stem_channels": [w.shape[0] for _, _, w in stem] if len(stem) > 1 else [],
            "num_encoder_blocks": counts,
            "encoder_block_out_channels": widths,
            "latent_channels": enc[-1][2].shape[0],
        })
    if dec:
        if dec[0][1] != "conv" or dec[-1][1] != "conv" or len(dec) < 3:
            raise VAEError("the TAESD decoder weights are incomplete (no input or output conv)")
        counts, widths = _stages(dec[1:-1])
        lat = dec[0][2].shape[1]
        if enc and lat != config["latent_channels"]:
            raise VAEError(f"the TAESD encoder makes {config['latent_channels']}-channel latents but the decoder "
                           f"reads {lat}: the two files are from different TAESD models (e.g. taesd vs taef1)")
        config.update({
            "num_decoder_blocks": counts,
            "decoder_block_out_channels": widths,
            "latent_channels": lat,
            "out_channels": dec[-1][2].shape[0],
        })
    config.update(getattr(sd, "scalars", {}))  # ComfyUI's vae_scale / vae_shift
    return config


def guess_variant(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], hints: Mapping[str, Any]) -> str:
    """The architecture picks taef2 / taesana; ComfyUI's scale, then file names, pick among the 8x ones."""
    lat = config.get("latent_channels")
    if config.get("encoder_stem_channels") or len(config.get("decoder_block_out_channels") or ()) == 5:
        return "taesana" if lat == 32 else "custom"
    if config.get("midblock_group_norm"):
        return "taef2" if lat == 32 else "custom"
    plain = {n: v for n, v in VARIANTS.items() if n not in ("taef2", "taesana") and v["latent_channels"] == lat}
    scale, shift = config.get("scaling_factor"), config.get("shift_factor") or 0.0
    for name, v in plain.items():
        if scale is not None and abs(scale - v["scaling_factor"]) < 1e-5 and abs(shift - v["shift_factor"]) < 1e-5:
            return name
    text = " ".join(str(v) for v in hints.values()).lower()
    for name, pattern in (("taesdxl", r"taesdxl|sdxl|sd_xl|[-_]xl"), ("taesd3", r"taesd3|sd3|sd_3|sd35"),
                          ("taef1", r"taef1|flux|hidream|z-image|zimage"), ("taesd", r"taesd|sd1|sd15|sd2")):
        if name in plain and re.search(pattern, text):
            return name
    return {4: "taesd", 16: "taef1"}.get(lat, "custom")


def build(config: Mapping[str, Any]) -> AutoencoderTiny:
    return AutoencoderTiny(config)


FAMILY = Family(
    name="tiny", module=sys.modules[__name__], diffusers_classes=("AutoencoderTiny",), default_variant="taesd",
    downscale=8, latent_channels=4,
    # diffusers' AutoencoderTiny configs always say scaling 1.0 / shift 0.0 (the nets work on scaled latents);
    # the factors that matter are the full VAE's, which only the variant knows
    folder_factors_apply=False,
    preview={v: v for v in VARIANTS},
    # ComfyUI's Flux2 latent format belongs to the flux2 family, whose record previews it with taef2
)
