"""Building blocks shared by the KL-type families (AutoencoderKL, AsymmetricAutoencoderKL), each described once
in ``ops`` layers (the untiled forward and the tiled executor both run ``describe()``).

Module and attribute names follow diffusers' state-dict keys, so ``decoder.up_blocks.0.resnets.1.norm2.weight``
maps to exactly one attribute path here.
"""
from __future__ import annotations

from torch import nn

from .ops import Attention as AttentionOp
from .ops import Conv, Described, Norm, Residual, UpConv


def group_norm(num_channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(groups, num_channels, eps=eps, affine=True)


class ResnetBlock2D(Described):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, plus a (1x1-conv when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def describe(self):
        main = [Norm(self.norm1, "silu"), Conv(self.conv1), Norm(self.norm2, "silu"), Conv(self.conv2)]
        return [Residual(main, [Conv(self.conv_shortcut)] if self.conv_shortcut is not None else [])]


class Downsample2D(Described):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv (the KL encoder's asymmetric downsampler)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def describe(self):
        return [Conv(self.conv, pad=(0, 1, 0, 1))]


class Upsample2D(Described):
    """Nearest x2, then a 3x3 conv (computed at the low resolution: ``ops.UpConv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def describe(self):
        return [UpConv(self.conv)]


class Attention(Described):
    """Single-head self-attention over all spatial positions (the KL mid block's attention)."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.group_norm = group_norm(channels, groups, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def describe(self):
        return [AttentionOp(self)]


class UNetMidBlock2D(Described):
    """resnet -> attention -> resnet (attention optional: ``mid_block_add_attention``)."""

    def __init__(self, channels: int, groups: int = 32, add_attention: bool = True):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)]) if add_attention else None
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups), ResnetBlock2D(channels, channels, groups)])

    def describe(self):
        return [self.resnets[0], *(self.attentions or []), self.resnets[1]]


class DownEncoderBlock2D(Described):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def describe(self):
        return [*self.resnets, *(self.downsamplers or [])]


class UpDecoderBlock2D(Described):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def describe(self):
        return [*self.resnets, *(self.upsamplers or [])]
