"""Tiled encode/decode (placeholder until the tiling work lands: only untiled runs are planned)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import VAEError


@dataclass(frozen=True)
class Tiling:
    tile_size: int = 512  # pixels, for both directions
    overlap: int = 64  # pixels


def resolve(vae, fn_name, shape, tile, dtype):
    """-> None (run untiled) or a Tiling."""
    if tile is None or tile is False:
        return None
    raise VAEError("tiled encode/decode is not available yet; pass tile=None or tile=False")


def run(vae, model, fn_name, x, plan, progress, should_stop, **kw):
    raise NotImplementedError
