"""AutoencoderKL: the VAE of SD1.x, SD2, SDXL, SD3 and FLUX.1, config-driven like diffusers.

Encoder: conv_in -> down_blocks -> mid_block -> GN -> SiLU -> conv_out (2 x latent channels: mean, logvar)
Decoder: conv_in -> mid_block -> up_blocks (reversed channels, layers+1 resnets) -> GN -> SiLU -> conv_out
"""
from __future__ import annotations

import re
import sys
from typing import Any, Mapping

import torch
from torch import nn

from .blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D, group_norm
from .convert import rename_keys, squeeze_linear
from .family import Family
from .ops import TO_CHANNELS_LAST, TO_CONTIGUOUS, Chain, Described, EagerContext, Norm

# The diffusers config fields that change the model, with diffusers' defaults.
DEFAULT_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "sample_size": 32,
}

_SD_LAYOUT = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32}

# Released configurations.
VARIANTS: dict[str, dict[str, Any]] = {
    "sd1": {**_SD_LAYOUT, "latent_channels": 4, "scaling_factor": 0.18215, "sample_size": 512},
    "sdxl": {**_SD_LAYOUT, "latent_channels": 4, "scaling_factor": 0.13025, "sample_size": 1024},
    "sdxl-fp16-fix": {**_SD_LAYOUT, "latent_channels": 4, "scaling_factor": 0.13025, "sample_size": 1024,
                      "force_upcast": False},
    "sd3": {**_SD_LAYOUT, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024},
    "flux1": {**_SD_LAYOUT, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
              "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024},
}
# Only these fields differ between variants of the same weights; the rest come from the weights.
VARIANT_FACTORS = ("scaling_factor", "shift_factor", "force_upcast", "sample_size", "latents_mean", "latents_std")


class Encoder(Described):
    def __init__(self, in_channels: int, latent_channels: int, block_out_channels, layers_per_block: int,
                 groups: int, double_z: bool = True, mid_block_add_attention: bool = True):
        super().__init__()
        ch = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], layers_per_block, groups, add_downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = UNetMidBlock2D(ch[-1], groups, mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * latent_channels if double_z else latent_channels, 3, padding=1)

    def describe(self):
        return [TO_CHANNELS_LAST, self.conv_in, *self.down_blocks, self.mid_block, Norm(self.conv_norm_out, "silu"),
                self.conv_out, TO_CONTIGUOUS]


class Decoder(Described):
    def __init__(self, latent_channels: int, out_channels: int, block_out_channels, layers_per_block: int,
                 groups: int, mid_block_add_attention: bool = True):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], groups, mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], layers_per_block + 1, groups, add_upsample=i < len(rev) - 1)
            for i in range(len(rev))
        )
        self.conv_norm_out = group_norm(rev[-1], groups)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def describe(self):
        return [TO_CHANNELS_LAST, self.conv_in, self.mid_block, *self.up_blocks, Norm(self.conv_norm_out, "silu"),
                self.conv_out, TO_CONTIGUOUS]


class AutoencoderKL(nn.Module):
    """encode(x) -> (mean, logvar); decode(z) -> image. Scaling factors are applied by the caller (vae.VAE)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **config}
        self.config = cfg
        ch, layers, groups, lat = cfg["block_out_channels"], cfg["layers_per_block"], cfg["norm_num_groups"], cfg["latent_channels"]
        attn = cfg["mid_block_add_attention"]
        self.encoder = Encoder(cfg["in_channels"], lat, ch, layers, groups, True, attn)
        self.decoder = Decoder(lat, cfg["out_channels"], ch, layers, groups, attn)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if cfg["use_post_quant_conv"] else None
        self.latent_channels = lat
        self.downscale = 2 ** (len(ch) - 1)

    def describe(self, direction: str):
        """The whole encode path (to mean and logvar stacked on channels) or decode path."""
        if direction == "encode":
            return [self.encoder, self.quant_conv]
        return [self.post_quant_conv, self.decoder]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = Chain(self.describe("encode")).eager(x, False, EagerContext()).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return Chain(self.describe("decode")).eager(z, False, EagerContext())


# --------------------------------------------------------------------------------------------------
# Formats. Our names are diffusers' names; everything else is renamed by these tables.

# Old diffusers checkpoints (e.g. SD1.5 `vae/`) name the attention projections differently.
LEGACY_DIFFUSERS_RENAMES = [
    (r"\.attentions\.(\d+)\.query\.", r".attentions.\1.to_q."),
    (r"\.attentions\.(\d+)\.key\.", r".attentions.\1.to_k."),
    (r"\.attentions\.(\d+)\.value\.", r".attentions.\1.to_v."),
    (r"\.attentions\.(\d+)\.proj_attn\.", r".attentions.\1.to_out.0."),
]

# The original ldm layout (SD single files, FLUX ae.safetensors). `{rev:N}` is the reversed up-block index.
LDM_RENAMES = [
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", r"decoder.up_blocks.{rev:1}.resnets.\2."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.{rev:1}.upsamplers.0."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.q\.", r"\1.mid_block.attentions.0.to_q."),
    (r"^(encoder|decoder)\.mid\.attn_1\.k\.", r"\1.mid_block.attentions.0.to_k."),
    (r"^(encoder|decoder)\.mid\.attn_1\.v\.", r"\1.mid_block.attentions.0.to_v."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
]
# ldm stores the attention projections as 1x1 convs; ours are Linear.
LDM_TENSOR_FIXES = [(r"\.attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", squeeze_linear)]


def is_ldm(sd: Mapping[str, torch.Tensor]) -> bool:
    return "encoder.down.0.block.0.norm1.weight" in sd or "decoder.up.0.block.0.norm1.weight" in sd


def matches(sd: Mapping[str, torch.Tensor]) -> bool:
    keys = ("encoder.down_blocks.0.resnets.0.norm1.weight", "decoder.up_blocks.0.resnets.0.norm1.weight",
            "decoder.mid_block.resnets.0.norm1.weight")
    diffusers_kl = any(k in sd for k in keys)
    return ((diffusers_kl or is_ldm(sd)) and "bn.running_mean" not in sd  # bn.*: FLUX.2 (flux2.py)
            and not any(k.startswith(("decoder.condition_encoder.", "decoder.encoder.")) for k in sd))


def convert(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported KL layout -> our (diffusers) names."""
    if is_ldm(sd):
        n_up = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
        return rename_keys(sd, LDM_RENAMES, LDM_TENSOR_FIXES, rev_count=n_up)
    return rename_keys(sd, LEGACY_DIFFUSERS_RENAMES)


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Everything the weights say about the architecture (diffusers names)."""
    n_down = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    ch = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n_down)]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
    return {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "block_out_channels": ch,
        "layers_per_block": layers,
        "latent_channels": sd["decoder.conv_in.weight"].shape[1],
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "decoder.mid_block.attentions.0.to_q.weight" in sd,
    }


def guess_variant(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], hints: Mapping[str, Any]) -> str:
    """Shapes cannot tell SD1 from SDXL, nor SD3 from FLUX.1: use config, checkpoint companions and names."""
    scaling = config.get("scaling_factor")
    for name, v in VARIANTS.items():
        if scaling is not None and abs(scaling - v["scaling_factor"]) < 1e-6 and config.get("latent_channels") == v["latent_channels"]:
            if name == "sdxl" and config.get("force_upcast") is False:
                return "sdxl-fp16-fix"
            return name
    text = " ".join(str(v) for v in hints.values()).lower()
    companions = hints.get("companion_keys", "")
    if config.get("latent_channels") == 16:
        if "joint_blocks" in companions or re.search(r"sd3|sd_3|stable-diffusion-3|sd35", text):
            return "sd3"
        return "flux1"
    if config.get("latent_channels") == 4:
        if "fp16-fix" in text or "fp16_fix" in text:
            return "sdxl-fp16-fix"
        if "conditioner.embedders.1" in companions or re.search(r"sdxl|sd_xl|xl[-_]|[-_]xl|stable-diffusion-xl|pony|illustrious", text):
            return "sdxl"
        return "sd1"
    return "custom"


def build(config: Mapping[str, Any]) -> AutoencoderKL:
    return AutoencoderKL(config)


FAMILY = Family(
    name="kl", module=sys.modules[__name__], diffusers_classes=("AutoencoderKL",), default_variant="sd1",
    downscale=8, latent_channels=4,
    preview={"sd1": "taesd", "sdxl": "taesdxl", "sdxl-fp16-fix": "taesdxl", "sd3": "taesd3", "flux1": "taef1"},
    latent_formats={"SD15": "sd1", "SDXL": "sdxl", "SDXL_Playground_2_5": "sdxl", "SD3": "sd3", "Flux": "flux1"},
)
