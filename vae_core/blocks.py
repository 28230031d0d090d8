"""Building blocks shared by the KL-type families (AutoencoderKL, AsymmetricAutoencoderKL).

Module and attribute names follow diffusers' state-dict keys, so ``decoder.up_blocks.0.resnets.1.norm2.weight``
maps to exactly one attribute path here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(num_channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(groups, num_channels, eps=eps, affine=True)


class ResnetBlock2D(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, plus a (1x1-conv when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one statement per step, so each intermediate is freed as soon as the next exists (3 maps live, not 4)
        h = F.silu(self.norm1(x), inplace=True)
        h = self.conv1(h)
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h.add_(x)


class Downsample2D(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv (the KL encoder's asymmetric downsampler)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_queries: int = 4096) -> torch.Tensor:
    """Softmax attention over all keys, computed for blocks of queries.

    Each query row is independent, so splitting the queries is exact; it bounds the score matrix
    to ``max_queries x tokens`` for latents too large for one block.
    """
    n = q.shape[-2]
    if n <= max_queries:
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.empty_like(q)
    for s in range(0, n, max_queries):
        out[..., s:s + max_queries, :] = F.scaled_dot_product_attention(q[..., s:s + max_queries, :], k, v)
    return out


class Attention(nn.Module):
    """Single-head self-attention over all spatial positions (the KL mid block's attention)."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.group_norm = group_norm(channels, groups, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        out = chunked_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out)
        return out.transpose(1, 2).reshape(b, c, h, w).add_(x)


class UNetMidBlock2D(nn.Module):
    """resnet -> attention -> resnet (attention optional: ``mid_block_add_attention``)."""

    def __init__(self, channels: int, groups: int = 32, add_attention: bool = True):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)]) if add_attention else None
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups), ResnetBlock2D(channels, channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x
