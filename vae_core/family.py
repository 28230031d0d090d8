"""The one record of facts about a VAE family, and the contract a family module fulfils.

Adding a family is one file plus one registration:

1. ``vae_core/<name>.py`` builds the network as ``nn.Module``s named like diffusers' state-dict keys, every
   module describing its computation with ``describe()`` in ``ops`` layers (the untiled forward and the exact
   tiled executor both run that one description; never write a second copy for tiling), and defines:
   - ``DEFAULT_CONFIG``: the diffusers config fields that change the model, with diffusers' defaults;
   - ``VARIANTS``: released configurations, name -> config preset;
   - ``VARIANT_FACTORS``: the fields a variant decides that the weights cannot (scaling factors...);
   - ``matches(sd)``: whether a state dict (any supported layout) is this family;
   - ``convert(sd)``: any supported layout -> diffusers names, as rename tables (``convert.rename_keys``);
   - ``infer_config(sd)``: the architecture fields the (converted) weights determine;
   - ``guess_variant(sd, config, hints)``: the variant, from config, checkpoint companions and file names;
   - ``build(config)``: the model, with ``encode(x) -> (mean, logvar or None)``, ``decode(z)``,
     ``describe(direction)``, ``latent_channels``, ``downscale`` and ``encoder``/``decoder`` (None when a file
     holds only one half); an unsupported config raises ``VAEError`` here, at load time;
   - ``FAMILY = Family(...)``: this record.
2. One line in ``registry.py`` (the detection order).

Loading, tiling, the memory estimate, the nodes' choice lists, the tile widget's route and the previews all read
the record; nothing else needs to know the family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Mapping


@dataclass(frozen=True)
class Family:
    name: str
    module: ModuleType
    diffusers_classes: tuple[str, ...]
    default_variant: str
    downscale: int  # of the default variant; a model knows its own
    latent_channels: int  # of the default variant
    # tiling: local layers fuse into one sweep while the halo stays under this fraction of the tile
    fuse_halo: float = 0.2
    # tiling: (model, latent (h, w)) -> True when tiling gains nothing at that size (the run stays untiled)
    untiled_below: Callable | None = None
    # a diffusers folder's own scaling factors win over a guessed variant's (False: the variant's always win)
    folder_factors_apply: bool = True
    # variant -> the TAESD variant whose decoder previews its latents
    preview: Mapping[str, str] = field(default_factory=dict)
    # ComfyUI latent format class name -> variant of this family (what a sampler's model samples in)
    latent_formats: Mapping[str, str] = field(default_factory=dict)
    # what ComfyUI's LATENT holds for this family: "raw" VAE latents (every family but one), or "diffusion" (FLUX.2:
    # core folds the patchify + BatchNorm into its VAE, so a LATENT is ``VAE.to_diffusion`` of the raw latent)
    comfy_latent: str = "raw"
    # video families: images and latents may carry a time axis ([B,C,T,H,W]); tiling also cuts time in chunks
    video: bool = False
    # the diffusion space is per-channel: (z - latents_mean) / latents_std (config fields), not scale and shift
    channel_stats: bool = False
    # variant -> the decoder a live preview of its latents would need, when the pack has none (shown to users)
    preview_decoders: Mapping[str, str] = field(default_factory=dict)

    @property
    def variants(self) -> dict:
        return self.module.VARIANTS
