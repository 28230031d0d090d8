"""vae_core: four VAE families as diffusers defines them, in plain torch (no diffusers, no ComfyUI).

    from vae_core import load_vae
    vae = load_vae("sdxl_vae.safetensors")          # family and variant detected
    z = vae.encode(images)                          # [B,3,H,W] in [-1,1] -> raw latents
    images = vae.decode(z)
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import VAEError, VAEInterrupted
from .vae import VAE

__all__ = ["load_vae", "VAE", "VAEError", "VAEInterrupted", "FAMILIES"]
__version__ = "0.1.0"

from .loading import FAMILIES  # noqa: E402

log = logging.getLogger("vae_core")


def load_vae(source: Any, family: str | None = None, variant: str | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VAE:
    """Load a VAE of any supported family from a file, folder, state dict, file pair or ``hf:`` reference."""
    from .loading import (CLASS_TO_FAMILY, describe_non_vae, detect_family, family_module, read_source,
                          strip_vae_prefix)

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise VAEError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    sd, folder_config, hints = read_source(source)
    if "__parts__" in sd:  # a TAESD encoder/decoder pair
        family = family or "tiny"
    else:
        sd, companions = strip_vae_prefix(sd)
        hints["companion_keys"] = companions
    if folder_config is not None and family is None:
        family = CLASS_TO_FAMILY.get(folder_config.get("_class_name", ""))
    detected = None if "__parts__" in sd else detect_family(sd)
    if family is None:
        family = detected
        if family is None:
            raise VAEError(f"{hints.get('filename') or 'this state dict'} is not a VAE: it looks like "
                           f"{describe_non_vae(sd)}. Pick a VAE file (e.g. from models/vae)")
    mod = family_module(family)
    if detected is not None and detected != family:
        raise VAEError(f"family={family!r} was asked for, but the weights are a {detected!r} VAE")
    if "__parts__" not in sd and not mod.matches(sd):
        raise VAEError(f"family={family!r} was asked for, but the weights are not that family: "
                       f"{describe_non_vae(sd)}")
    sd = mod.convert(sd)
    try:
        config = dict(mod.infer_config(sd))
    except (KeyError, ValueError, IndexError) as e:
        raise VAEError(f"the weights look like a {family} VAE but are incomplete (missing {e}): the file may be "
                       "truncated or only part of a model") from None
    inferred = dict(config)
    if folder_config:
        config.update({k: v for k, v in folder_config.items() if not k.startswith("_")})
    explicit = variant is not None
    if variant is None:
        variant = mod.guess_variant(sd, config, hints)
    elif variant not in mod.VARIANTS:
        raise VAEError(f"unknown {family} variant {variant!r}; known: {', '.join(mod.VARIANTS)}")
    preset = mod.VARIANTS.get(variant)
    if preset is not None:
        factors = set(getattr(mod, "VARIANT_FACTORS", ()))
        if explicit:
            clash = [k for k, v in preset.items() if k not in factors and k in inferred
                     and _shape_value(v) is not None and _shape_value(v) != _shape_value(inferred[k])]
            if clash:
                detail = ", ".join(f"{k}={inferred[k]} (variant: {preset[k]})" for k in clash[:3])
                raise VAEError(f"variant={variant!r} does not fit these weights: {detail}. Use the variant of the "
                               f"weights (detected: {mod.guess_variant(sd, inferred, hints)!r}) or other weights")
        folder_wins = folder_config is not None and not explicit and getattr(mod, "FOLDER_FACTORS_APPLY", True)
        for key in factors:  # an explicit variant wins; a guessed one defers to a diffusers folder's own config
            if key in preset and not folder_wins:
                config[key] = preset[key]
        for key, value in preset.items():
            config.setdefault(key, value)
    model = _build(mod, config, sd, family, variant)

    upcast = ""
    if dtype == torch.float16 and config.get("force_upcast", False):
        upcast = f"{family}/{variant} sets force_upcast: kept in float32 (fp16 overflows in this VAE)"
        log.info("vae_core: %s", upcast)
        dtype = torch.float32
    return VAE(model, family, variant, config, device=device, dtype=dtype, upcast_reason=upcast)


def _shape_value(v):
    """Ints and lists of ints (channel counts, layer counts) compare across configs; anything else is skipped."""
    if isinstance(v, (tuple, list)):
        items = [_shape_value(x) for x in v]
        return None if any(x is None for x in items) else items
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _build(mod, config: dict, sd: dict, family: str, variant: str) -> torch.nn.Module:
    """Build on the meta device (no random init, one copy of the weights in memory), then assign the tensors."""
    with torch.device("meta"):
        model = mod.build(config)
    _load_weights(model, sd, family, variant)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # state outside the state dict: build for real
        model = mod.build(config)
        _load_weights(model, sd, family, variant)
    return model


def _load_weights(model: torch.nn.Module, sd: dict, family: str, variant: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {list(sd[k].shape)} vs {list(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {'; '.join(wrong[:2])})")
        raise VAEError(f"the weights do not fit a {family} VAE ({variant}): {'; '.join(parts)}. The file may be "
                       "truncated, of another model, or of an unsupported variant")
    # a family may build its model on the meta device (no random init of ~1B parameters): assign the tensors then
    model.load_state_dict(sd, strict=True, assign=any(t.is_meta for t in own.values()))
