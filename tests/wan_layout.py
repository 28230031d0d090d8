"""The original Wan VAE layout (Wan2.1_VAE.pth; ComfyUI's wan_2.1_vae.safetensors and qwen_image_vae.safetensors)
made from a diffusers state dict, for tests. Written from the original model's module names; diffusers' own
single-file converter (``convert_wan_vae_to_diffusers``) checks that it maps back to the diffusers names."""
from __future__ import annotations

import re

_INNER = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
          "conv_shortcut": "shortcut"}


def _block(prefix: str, n_res: int) -> str:
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)$", prefix)
    if m:
        level = int(m.group(1))
        j = int(m.group(3)) if m.group(3) is not None else n_res + 1
        return f"decoder.upsamples.{level * (n_res + 2) + j}"
    prefix = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", prefix)
    prefix = re.sub(r"\.mid_block\.resnets\.0$", ".middle.0", prefix)
    prefix = re.sub(r"\.mid_block\.resnets\.1$", ".middle.2", prefix)
    return prefix


def to_original(sd: dict, n_res: int = 2) -> dict:
    out = {}
    for key, value in sd.items():
        m = re.match(r"^(.*?(?:resnets\.\d+|down_blocks\.\d+))\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(.+)$", key)
        if m:
            new = f"{_block(m.group(1), n_res)}.{_INNER[m.group(2)]}.{m.group(3)}"
        else:
            m = re.match(r"^(decoder\.up_blocks\.\d+\.upsamplers\.0|encoder\.down_blocks\.\d+)\.(.+)$", key)
            if m:
                new = f"{_block(m.group(1), n_res)}.{m.group(2)}"
            else:
                new = key
                for a, b in ((r"\.mid_block\.attentions\.0\.", ".middle.1."), (r"\.norm_out\.", ".head.0."),
                             (r"\.conv_out\.", ".head.2."), (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
                             (r"^quant_conv\.", "conv1."), (r"^post_quant_conv\.", "conv2.")):
                    new = re.sub(a, b, new)
        out[new] = value
    return out
