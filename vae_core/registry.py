"""Every family vae_core knows, in detection order (asym before kl: asymmetric weights contain a KL encoder;
flux2 before kl: a FLUX.2 VAE is a KL network plus ``bn.*``, and kl refuses weights with ``bn.*``).

Registering a family is one line here; the recipe is in ``family.py``.
"""
from __future__ import annotations

from . import asym, dc, flux2, kl, tiny, wan
from .errors import VAEError
from .family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (asym.FAMILY, flux2.FAMILY, kl.FAMILY, dc.FAMILY, tiny.FAMILY,
                                                    wan.FAMILY)}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise VAEError(f"unknown VAE family {name!r}: use one of {', '.join(FAMILIES)} (or None to detect it)")
    return FAMILIES[name]


def by_class(class_name: str) -> Family | None:
    """The family of a diffusers ``_class_name``."""
    return next((f for f in FAMILIES.values() if class_name in f.diffusers_classes), None)


def detect(sd) -> Family | None:
    return next((f for f in FAMILIES.values() if f.module.matches(sd)), None)
