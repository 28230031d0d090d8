"""HTTP route for the tile-settings widget.

``GET /vae_suite/tile_plan`` (also under ``/api/vae_suite/tile_plan``)

Query parameters (all optional except width and height):
    width, height   image size in pixels (ints >= 1)
    tile_size       tile edge in pixels (default 512)
    overlap         overlap in pixels (default 64)
    family          a vae_core family (vae_core.registry; default kl): sets the downscale factor and the estimate
    downscale       override the downscale factor (default: the family's)
    mode            decode | encode (default decode)
    tiling          auto | always | never (default always)

200 answer (JSON):
    {
      "width": 1024, "height": 768,          # as asked
      "tile_size": 512, "overlap": 64,       # as used (after vae_core's own clamping/snapping)
      "family": "kl", "downscale": 8, "mode": "decode",
      "tiled": true,                         # false when one pass covers the image (or tiling=never)
      "rows": 2, "cols": 3, "count": 6,
      "tiles": [[x0, y0, x1, y1], ...],      # image-pixel rectangles, row-major, end-exclusive
      "memory": {"untiled_bytes": int, "per_tile_bytes": int,   # float32 compute-device estimates
                 "store_bytes": int | null},                    # activations kept between sweeps (tiled)
      "exact": true,                         # vae_core's tiling equals the untiled result (no seams)
      "corrections": ["overlap 500 -> 376 (< tile/2)", ...],   # what vae_core.tiling.correct_tiling changed
      "source": "vae_core"
    }
    Estimates are null for a family vae_core cannot estimate.
400 answer: {"error": "<message naming the bad parameter>"}
"""
from __future__ import annotations

from aiohttp import web

from server import PromptServer

from ..vae_core.registry import FAMILIES


def _int(q, name, default=None, lo=1, hi=1 << 20):
    raw = q.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"{name} is required")
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def tile_plan(query) -> dict:
    width, height = _int(query, "width"), _int(query, "height")
    tile_size = _int(query, "tile_size", 512, 32)
    overlap = _int(query, "overlap", 64, 0)
    family = query.get("family", "kl") or "kl"
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    f = _int(query, "downscale", FAMILIES[family].downscale, 1, 128)
    mode = query.get("mode", "decode") or "decode"
    if mode not in ("decode", "encode"):
        raise ValueError(f"mode must be decode or encode, got {mode!r}")
    tiling = query.get("tiling", "always") or "always"
    if tiling not in ("auto", "always", "never"):
        raise ValueError(f"tiling must be auto, always or never, got {tiling!r}")

    from ..vae_core.tiling import plan_grid

    plan = plan_grid(width=width, height=height, tile_size=tile_size, overlap=overlap, downscale=f, mode=mode,
                     family=family, tiling=tiling)
    plan["source"] = "vae_core"
    return plan


@PromptServer.instance.routes.get("/vae_suite/tile_plan")
async def _tile_plan(request):
    try:
        return web.json_response(tile_plan(request.rel_url.query))
    except ValueError as e:  # VAEError is a ValueError too
        return web.json_response({"error": str(e)}, status=400)


@PromptServer.instance.routes.get("/vae_suite/search_aliases")
async def _search_aliases(request):
    """{node id: [alias, ...]} from each node's SEARCH_ALIASES, for the node search of frontends whose server
    does not send them in /object_info."""
    from . import NODE_CLASS_MAPPINGS

    return web.json_response({k: list(getattr(c, "SEARCH_ALIASES", [])) for k, c in NODE_CLASS_MAPPINGS.items()})
