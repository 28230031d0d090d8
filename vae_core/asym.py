"""AsymmetricAutoencoderKL: a KL VAE whose (bigger) decoder also sees the masked original image.

"Designing a Better Asymmetric VQGAN for StableDiffusion" (Zhu et al. 2023). For inpainting, the decoder is
told which pixels to keep: the original with the hole zeroed goes through a small conv stack (the condition
encoder), and before every up block the decoder's features *outside* the hole are replaced by the condition
features of the same shape. Inside the hole the decoder keeps its own features.

Encoder:  the SD KL encoder (kl.Encoder) -> quant_conv -> (mean, logvar)
Decoder:  post_quant_conv -> conv_in -> mid_block -> [blend -> up block] x N -> blend -> GN -> SiLU -> conv_out
          blend(x) = x * mask + condition_feature(shape of x) * (1 - mask), mask resized (nearest) to x.
          Without image and mask there is no blend: a plain KL decoder.
mask: 1 = region to (re)generate, 0 = keep. No pixel blend with the original happens inside the VAE.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import kl
from .convert import rename_keys
from .errors import VAEError
from .family import Family
from .ops import TO_CHANNELS_LAST, TO_CONTIGUOUS, Blend, Chain, EagerContext, Norm
from .vae import check_images

# The diffusers config fields that change the model, with diffusers' defaults.
DEFAULT_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_out_channels": [64],
    "layers_per_down_block": 1,
    "up_block_out_channels": [64],
    "layers_per_up_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "force_upcast": False,
}

_SD_ENCODER = {"down_block_out_channels": [128, 256, 512, 512], "layers_per_down_block": 2}
_RELEASED = {"latent_channels": 4, "norm_num_groups": 32, "sample_size": 256, "scaling_factor": 0.18215,
             "force_upcast": False}

# Released configurations (cross-attention/asymmetric-autoencoder-kl-x-1-5 and -x-2), under their short and
# long names. x-2 has a wider decoder with more resnets per up block.
VARIANTS: dict[str, dict[str, Any]] = {
    "x-1-5": {**_SD_ENCODER, "up_block_out_channels": [192, 384, 768, 768], "layers_per_up_block": 3, **_RELEASED},
    "x-2": {**_SD_ENCODER, "up_block_out_channels": [256, 512, 1024, 1024], "layers_per_up_block": 5, **_RELEASED},
}
VARIANTS["asymmetric-autoencoder-kl-x-1-5"] = VARIANTS["x-1-5"]
VARIANTS["asymmetric-autoencoder-kl-x-2"] = VARIANTS["x-2"]
# Only these fields are not in the weights; the architecture always comes from the weights.
VARIANT_FACTORS = ("scaling_factor", "sample_size", "force_upcast")


# --------------------------------------------------------------------------------------------------- model
class MaskConditionEncoder(nn.Module):
    """Five convs over the masked image: two 3x3 at full resolution, then three 4x4 stride-2 (to 1/8).

    Widths double from ``base`` and stop at ``top``; the last is always ``top``. A ReLU sits between convs.
    Every conv's output *before* its ReLU is a condition feature; the decoder picks them by the shape of its own
    activations (as the original code and diffusers do): ``ops.Blend`` runs them.
    """

    def __init__(self, in_channels: int, base: int, top: int):
        super().__init__()
        widths = [min(base * 2 ** i, top) for i in range(4)] + [top]
        ins = [in_channels] + widths[:-1]
        self.layers = nn.Sequential(*(
            nn.Conv2d(c_in, c_out, 3, stride=1, padding=1) if i < 2 else nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)
            for i, (c_in, c_out) in enumerate(zip(ins, widths))
        ))

    def shapes(self) -> set[tuple[int, int]]:
        """(channels, downscale) of every feature."""
        out, d = set(), 1
        for conv in self.layers:
            d *= conv.stride[0]
            out.add((conv.out_channels, d))
        return out


class MaskConditionDecoder(kl.Decoder):
    """The KL decoder plus ``condition_encoder``; with image and mask it blends condition features in."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels, layers_per_block: int, groups: int):
        super().__init__(latent_channels, out_channels, block_out_channels, layers_per_block, groups,
                         mid_block_add_attention=True)
        self.condition_encoder = MaskConditionEncoder(out_channels, block_out_channels[0], block_out_channels[-1])
        rev = list(reversed(block_out_channels))
        # the blend points: before every up block and before the output norm, as (channels, downscale)
        n = len(rev)
        self.blend_shapes = [(rev[max(i - 1, 0)], 2 ** (n - 1 - i)) for i in range(n)] + [(rev[-1], 1)]

    def describe(self, conditioned: bool = False):
        if not conditioned:
            return super().describe()
        blend = Blend(self.condition_encoder.layers)
        ups = [layer for block in self.up_blocks for layer in (blend, block)]
        return [TO_CHANNELS_LAST, self.conv_in, self.mid_block, *ups, blend, Norm(self.conv_norm_out, "silu"),
                self.conv_out, TO_CONTIGUOUS]


class AsymmetricAutoencoderKL(nn.Module):
    """encode(x) -> (mean, logvar); decode(z, image=None, mask=None) -> image. Scaling is the caller's (vae.VAE)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **config}
        if cfg["act_fn"] != "silu":
            raise VAEError(f"asymmetric VAE config has act_fn={cfg['act_fn']!r}; only 'silu' (as released) is supported")
        for key in ("down_block_types", "up_block_types"):
            kinds = set(cfg.get(key) or ()) - {"DownEncoderBlock2D", "UpDecoderBlock2D"}
            if kinds:
                raise VAEError(f"asymmetric VAE config has {key} {sorted(kinds)}; only DownEncoderBlock2D / "
                               "UpDecoderBlock2D (as released) are supported")
        self.config = cfg
        lat, groups = cfg["latent_channels"], cfg["norm_num_groups"]
        down, up = list(cfg["down_block_out_channels"]), list(cfg["up_block_out_channels"])
        if len(down) != len(up):
            raise VAEError(f"asymmetric VAE config: {len(down)} down blocks but {len(up)} up blocks; they must match")
        self.encoder = kl.Encoder(cfg["in_channels"], lat, down, cfg["layers_per_down_block"], groups, double_z=True)
        self.decoder = MaskConditionDecoder(lat, cfg["out_channels"], up, cfg["layers_per_up_block"], groups)
        missing = [s for s in self.decoder.blend_shapes if s not in self.decoder.condition_encoder.shapes()]
        if missing:
            raise VAEError(f"asymmetric VAE config: up_block_out_channels {up} needs condition features "
                           f"(channels, downscale) {missing} that its condition encoder does not make; use the "
                           "released up_block_out_channels (e.g. [192, 384, 768, 768])")
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1)
        self.post_quant_conv = nn.Conv2d(lat, lat, 1)
        self.latent_channels = lat
        self.downscale = 2 ** (len(up) - 1)

    def describe(self, direction: str, conditioned: bool = False):
        if direction == "encode":
            return [self.encoder, self.quant_conv]
        return [self.post_quant_conv, *self.decoder.describe(conditioned)]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = Chain(self.describe("encode")).eager(x, False, EagerContext()).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor, image: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        conditioned = image is not None and mask is not None
        ctx = EagerContext({"masked": (1 - mask) * image, "mask": mask} if conditioned else None)
        return Chain(self.describe("decode", conditioned)).eager(z, False, ctx)

    def prepare_condition(self, z: torch.Tensor, image: Any, mask: Any) -> tuple[dict[str, torch.Tensor], tuple | None]:
        """Check and normalise the original image and mask for ``decode``: -> (decode kwargs, crop (H, W) or None).

        image: [B,3,H,W] or [3,H,W] in [-1, 1], the picture the latents were encoded from. H and W need not be
        multiples of the downscale: any size with ceil(H/f) == latent h works; the image and mask are padded
        (edge pixels repeated, as ``VAE.encode`` pads) and the output is cropped back to H x W.
        mask: [B,1,H,W], [B,H,W] or [H,W], at the image size or at the latent size (resized, nearest), values in
        [0, 1] (bool too), 1 = regenerate, 0 = keep. A single image or mask serves a whole batch of latents.
        """
        return prepare_condition(z, image, mask, self.downscale)


def prepare_condition(z: torch.Tensor, image: Any, mask: Any, f: int) -> tuple[dict[str, torch.Tensor], tuple | None]:
    if image is None or mask is None:
        missing = "image" if image is None else "mask"
        raise VAEError(f"the asymmetric decoder needs both image (the original, [B,3,H,W] in [-1, 1]) and mask "
                       f"([B,1,H,W], 1 = regenerate); {missing} is missing. Pass both, or neither for a plain decode")
    b, _, h, w = z.shape
    hp, wp = h * f, w * f

    # ---- image
    image = check_images(image, "image", "decoding with the original image")
    if image.numel() and float(image.abs().max()) > 1.5:
        raise VAEError(f"image values reach {float(image.abs().max()):.4g}, but the original must be in [-1, 1] "
                       "(a [0, 255] image? use x / 127.5 - 1; a [0, 1] image: x * 2 - 1)")
    H, W = image.shape[-2:]
    if -(-H // f) != h or -(-W // f) != w:
        raise VAEError(f"image is {H}x{W} but the latents are {h}x{w}, which decode to {hp}x{wp}: pass the original "
                       f"the latents were encoded from (any size whose ceil(size/{f}) is the latent size, e.g. "
                       f"{hp}x{wp}), or resize it to {hp}x{wp}")

    # ---- mask
    if not isinstance(mask, torch.Tensor):
        raise VAEError(f"mask must be a torch.Tensor [B,1,H,W] (1 = regenerate, 0 = keep), got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    elif mask.ndim == 4 and mask.shape[1] != 1:
        hint = " (it looks like [B,H,W,1]: use mask[..., 0])" if mask.shape[-1] == 1 else \
            " (an RGB mask? take one channel, or image.mean(1, keepdim=True))"
        raise VAEError(f"mask must have one channel, got {mask.shape[1]} channels (shape {list(mask.shape)}){hint}")
    elif mask.ndim != 4:
        raise VAEError(f"mask must be [B,1,H,W], [B,H,W] or [H,W], got shape {list(mask.shape)}")
    if not mask.is_floating_point():
        mask = mask.to(image.dtype)
    if not torch.isfinite(mask).all():
        raise VAEError("mask contains NaN or Inf values")
    if mask.numel() and (float(mask.min()) < -1e-3 or float(mask.max()) > 1 + 1e-3):
        raise VAEError(f"mask values must be in [0, 1] (1 = regenerate, 0 = keep), got [{float(mask.min()):.4g}, "
                       f"{float(mask.max()):.4g}] (a [0, 255] mask? divide by 255)")
    mask = mask.clamp(0, 1)
    mh, mw = mask.shape[-2:]
    if (mh, mw) == (h, w) and (h, w) != (H, W):
        mask = F.interpolate(mask, size=(hp, wp), mode="nearest")  # each latent cell covers an f x f block
    elif (mh, mw) not in ((H, W), (hp, wp)):
        raise VAEError(f"mask is {mh}x{mw}; it must be the image size {H}x{W} or the latent size {h}x{w}")

    # ---- batch: one image or one mask serves every latent
    for name, t in (("image", image), ("mask", mask)):
        if t.shape[0] not in (1, b):
            raise VAEError(f"{name} has batch {t.shape[0]} but the latents have batch {b}: give one {name} per "
                           f"latent, or a single {name} for all")
    image = image.expand(b, -1, -1, -1)
    mask = mask.to(image.dtype).expand(b, -1, -1, -1)

    # ---- pad to the decoded size; the output is cropped back
    crop = None
    if (H, W) != (hp, wp):
        image = F.pad(image, (0, wp - W, 0, hp - H), mode="replicate")
        if mask.shape[-2:] != (hp, wp):
            mask = F.pad(mask, (0, wp - W, 0, hp - H), mode="replicate")
        crop = (H, W)
    return {"image": image, "mask": mask}, crop


# --------------------------------------------------------------------------------------------------- formats
# Our names are diffusers' names. The original Asymmetric_VQGAN checkpoints use ldm names (kl.LDM_RENAMES) with
# the condition encoder under `decoder.encoder.`; their `decoder.up_layers.*` and training-only keys (loss.*)
# are not part of the model.
ORIGINAL_KEEP = r"^(encoder|decoder|quant_conv|post_quant_conv)\."
ORIGINAL_DROP = r"^decoder\.up_layers\."
ORIGINAL_RENAMES = [(r"^decoder\.encoder\.", "decoder.condition_encoder."), *kl.LDM_RENAMES]


def is_original(sd: Mapping[str, torch.Tensor]) -> bool:
    return kl.is_ldm(sd) and any(k.startswith("decoder.encoder.layers.") for k in sd)


def matches(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("decoder.condition_encoder.layers.") for k in sd) or is_original(sd)


def convert(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either layout -> our (diffusers) names."""
    if not is_original(sd):
        return rename_keys(sd, kl.LEGACY_DIFFUSERS_RENAMES)
    kept = {k: v for k, v in sd.items() if re.match(ORIGINAL_KEEP, k) and not re.match(ORIGINAL_DROP, k)}
    n_up = 1 + max((int(m.group(1)) for k in kept if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
    return rename_keys(kept, ORIGINAL_RENAMES, kl.LDM_TENSOR_FIXES, rev_count=n_up)


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    return 1 + max((int(m.group(1)) for k in sd if (m := re.match(pattern, k))), default=-1)


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture from the weights (diffusers config names); the rest are diffusers' defaults."""
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        raise VAEError("these asymmetric VAE weights lack the encoder or decoder (encoder.conv_in / decoder.conv_in "
                       "missing): the file is truncated or not a whole AsymmetricAutoencoderKL")
    enc = kl.infer_config(sd)
    n_up = _count(sd, r"decoder\.up_blocks\.(\d+)\.")
    up = [sd[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in reversed(range(n_up))]
    return {
        **DEFAULT_CONFIG,
        "in_channels": enc["in_channels"],
        "out_channels": enc["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * len(enc["block_out_channels"]),
        "down_block_out_channels": enc["block_out_channels"],
        "layers_per_down_block": enc["layers_per_block"],
        "up_block_types": ["UpDecoderBlock2D"] * n_up,
        "up_block_out_channels": up,
        "block_out_channels": up,  # diffusers registers this alias too
        "layers_per_up_block": _count(sd, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.") - 1,
        "latent_channels": enc["latent_channels"],
    }


def guess_variant(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], hints: Mapping[str, Any]) -> str:
    """The two released models differ in decoder width and depth, so the shapes decide."""
    arch = ("down_block_out_channels", "layers_per_down_block", "up_block_out_channels", "layers_per_up_block",
            "latent_channels")
    def same(a, b):
        return list(a) == list(b) if isinstance(b, list) and a is not None else a == b

    for name in ("x-1-5", "x-2"):
        if all(same(config.get(k), VARIANTS[name][k]) for k in arch):
            return name
    return "custom"


def build(config: Mapping[str, Any]) -> AsymmetricAutoencoderKL:
    return AsymmetricAutoencoderKL(config)


FAMILY = Family(
    name="asym", module=sys.modules[__name__], diffusers_classes=("AsymmetricAutoencoderKL",),
    default_variant="x-1-5", downscale=8, latent_channels=4,
    preview={"x-1-5": "taesd", "x-2": "taesd"},
)
