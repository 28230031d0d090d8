"""Seeded random-weight models with real shapes, written by the preview tests and the preview bench.

- ``sd15_unet_state_dict``: the smallest UNet that ComfyUI 0.3.75 detects as SD1.x (``comfy.model_detection``
  matches SD15 on model_channels 320, context_dim 768, conv proj_in, no ADM): one level, one res block, one
  transformer block, the usual middle block. 25.8 M parameters, in ComfyUI's LDM key names.
- ``taesd_decoder_state_dict``: a TAESD decoder in madebyollin's original format (bare nn.Sequential indices;
  index 0 is the parameter-less clamp), as ComfyUI's ``models/vae_approx/taesd_decoder.*`` holds it.
"""
from __future__ import annotations

import math

import torch


def _fill(shapes: dict[str, tuple], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if len(shape) == 1:  # norm scales 1, biases 0
            is_scale = key.endswith(".weight")
            sd[key] = torch.ones(shape) if is_scale else torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[key] = sd[key].to(dtype)
    return sd


def sd15_unet_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16, context_dim: int = 768,
                         linear_proj: bool = False) -> dict[str, torch.Tensor]:
    """context_dim=1024 with linear_proj=True gives the SD2.x shape instead (ComfyUI detects SD2, same latents)."""
    ch, emb, ctx = 320, 1280, context_dim
    shapes: dict[str, tuple] = {}

    def linear(p, n_in, n_out, bias=True):
        shapes[f"{p}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{p}.bias"] = (n_out,)

    def conv(p, n_in, n_out, k=3):
        shapes[f"{p}.weight"] = (n_out, n_in, k, k)
        shapes[f"{p}.bias"] = (n_out,)

    def norm(p, c):
        shapes[f"{p}.weight"] = (c,)
        shapes[f"{p}.bias"] = (c,)

    def res_block(p, n_in, n_out):
        norm(f"{p}.in_layers.0", n_in)
        conv(f"{p}.in_layers.2", n_in, n_out)
        linear(f"{p}.emb_layers.1", emb, n_out)
        norm(f"{p}.out_layers.0", n_out)
        conv(f"{p}.out_layers.3", n_out, n_out)
        if n_in != n_out:
            conv(f"{p}.skip_connection", n_in, n_out, k=1)

    def proj(p):
        if linear_proj:
            linear(p, ch, ch)
        else:
            conv(p, ch, ch, k=1)

    def transformer(p):  # SpatialTransformer, depth 1, 1x1-conv (SD1.x) or linear (SD2.x) projections
        norm(f"{p}.norm", ch)
        proj(f"{p}.proj_in")
        t = f"{p}.transformer_blocks.0"
        for attn, kv in (("attn1", ch), ("attn2", ctx)):
            linear(f"{t}.{attn}.to_q", ch, ch, bias=False)
            linear(f"{t}.{attn}.to_k", kv, ch, bias=False)
            linear(f"{t}.{attn}.to_v", kv, ch, bias=False)
            linear(f"{t}.{attn}.to_out.0", ch, ch)
        linear(f"{t}.ff.net.0.proj", ch, 8 * ch)  # GEGLU
        linear(f"{t}.ff.net.2", 4 * ch, ch)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{t}.{n}", ch)
        proj(f"{p}.proj_out")

    linear("time_embed.0", ch, emb)
    linear("time_embed.2", emb, emb)
    conv("input_blocks.0.0", 4, ch)
    res_block("input_blocks.1.0", ch, ch)
    transformer("input_blocks.1.1")
    res_block("middle_block.0", ch, ch)
    transformer("middle_block.1")
    res_block("middle_block.2", ch, ch)
    for i in (0, 1):
        res_block(f"output_blocks.{i}.0", 2 * ch, ch)
        transformer(f"output_blocks.{i}.1")
    norm("out.0", ch)
    conv("out.2", ch, 4)
    return _fill(shapes, seed, dtype)


def taesd_decoder_state_dict(latent_channels: int = 4, seed: int = 0,
                             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    shapes: dict[str, tuple] = {}

    def conv(i, n_in, n_out, bias=True):
        shapes[f"{i}.weight"] = (n_out, n_in, 3, 3)
        if bias:
            shapes[f"{i}.bias"] = (n_out,)

    conv(1, latent_channels, 64)
    for i in (3, 4, 5, 8, 9, 10, 13, 14, 15, 18):  # Blocks: three 3x3 convs, no skip (64 -> 64)
        for j in (0, 2, 4):
            conv(f"{i}.conv.{j}", 64, 64)
    for i in (7, 12, 17):  # the conv after each upsample has no bias
        conv(i, 64, 64, bias=False)
    conv(19, 64, 3)
    sd = _fill(shapes, seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    for k in sd:  # biases random too, so the picture is not flat
        if k.endswith(".bias"):
            sd[k] = (torch.randn(sd[k].shape, generator=g) * 0.1).to(dtype)
    # Centre the output (TAESD decodes to [0, 1]) so a preview is mostly unclipped mid-tones, not black or white.
    sd["19.weight"] = sd["19.weight"] * 0.5
    sd["19.bias"] = torch.full((3,), 0.5, dtype=dtype)
    return sd
