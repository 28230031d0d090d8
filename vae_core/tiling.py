"""Tiled encode/decode: exact (equal to the untiled result up to float rounding) with memory bounded by the tile.

Design (details in ``stream``): the network runs as a sequence of sweeps over tiles, cut at every GroupNorm and
attention. Each sweep's output goes to a store (host RAM, or a temp file on disk) while the exact statistics the
next GroupNorm needs are accumulated tile by tile; attention streams query tiles against key/value tiles. So
there are no seams and no colour shift (no per-tile statistics, no blending) and the compute device holds one
tile's activations at a time. Halos are derived from the layers (1 px per 3x3 conv per sweep), so ``overlap``
is not needed for exactness and is accepted only so callers can keep one setting for every tiler; it does not
change the result.

Costs: about the untiled FLOPs plus a few % of halo, plus writing and re-reading each full-resolution
activation once per sweep (memory bandwidth on the 'ram' store, page-cache/disk I/O on the 'disk' store).

Where the activations between sweeps live (``Tiling.store``): 'ram' (host memory; pinned when computing on
CUDA), 'disk' (temp files in $VAE_CORE_TILE_DIR or the system temp dir, read and written with pread/pwrite),
'device' (on the compute device: fastest, not bounded). 'auto': 'ram' on CUDA; on CPU 'ram' while the stored
activations stay under RAM_STORE_FRACTION of free RAM, else 'disk'. On CPU only the 'disk' store keeps the
process's memory bounded by the tile: with 'ram' the stored activations are what an untiled run holds anyway.

Why streaming rather than recompute: (1) GroupNorm needs whole-map statistics before a tile passes it, and
recomputing from a checkpoint costs ~(number of GN layers / 2) runs. (2) The latent-resolution part is streamed
too (not run untiled): otherwise K/V and the mid-block activations grow with the image and break the bound;
attention streams key/value strips with an online softmax. Statistics merge per tile (mean, M2) with Chan's
formula in float64 (robust when |mean| >> std, unlike E[x^2] - mean^2 summed in float32). (3) Purely local
chains (TAESD) fuse into sweeps while the halo stays under a fraction of the tile (``Family.fuse_halo``), which
keeps recompute small at the cost of storing a few stage outputs.

Public API:
- ``Tiling(tile_size=512, overlap=64, store="auto")`` (pixels for both directions); ``tile=`` also takes
  None (auto), False, True (defaults) or a dict with those keys.
- ``estimate_memory(vae, direction, image_hw, tiling, dtype)``: compute-device bytes (what auto mode uses).
- ``estimate(...)``: the same, with the store size and tile count.
- ``plan_grid(width=, height=, tile_size=, ...)``: the tile rectangles and estimates for the widget.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from . import memory, ops, registry, stream, video
from .errors import VAEError, VAEInterrupted
from .ops import Chain

STORES = ("auto", "ram", "disk", "device")
# Auto mode tiles when the untiled estimate exceeds this fraction of free device memory.
AUTO_FRACTION = 0.8
# On CPU, the 'auto' store spills to disk when the stored activations would exceed this fraction of free RAM.
RAM_STORE_FRACTION = 0.25
MIN_TILE = 32
# The out-of-memory fallback halves the tile down to this edge, then gives up.
FALLBACK_MIN_TILE = 128
# The nodes' INT inputs (nodes/common.py) and the widget (web/lib/tile_plan.js) correct within these limits.
NODE_TILE_MIN, NODE_TILE_MAX = 64, 4096

log = logging.getLogger("vae_core")


@dataclass(frozen=True)
class Tiling:
    tile_size: int = 512  # pixels, for both directions
    overlap: int = 64  # pixels; accepted for compatibility, exactness does not depend on it (see module doc)
    store: str = "auto"  # where full-resolution activations live between sweeps: auto | ram | disk | device
    time_chunk: int = 1  # video families: latent frames per causal chunk (0: all frames at once); see video.py

    def __post_init__(self):
        if not isinstance(self.tile_size, int) or self.tile_size < MIN_TILE:
            raise VAEError(f"tile_size must be an integer >= {MIN_TILE} pixels, got {self.tile_size!r}")
        if not isinstance(self.overlap, int) or self.overlap < 0:
            raise VAEError(f"overlap must be an integer >= 0 pixels, got {self.overlap!r}")
        if self.store not in STORES:
            raise VAEError(f"store must be one of {', '.join(STORES)}, got {self.store!r}")
        if not isinstance(self.time_chunk, int) or self.time_chunk < 0:
            raise VAEError(f"time_chunk must be an integer >= 0 latent frames (0: all at once), got {self.time_chunk!r}")


@dataclass(frozen=True)
class Plan:
    tiling: Tiling
    store: str  # resolved: ram | disk | device
    image_hw: tuple[int, int]


def correct_tiling(tile_size: int, overlap: int, downscale: int, tile_min: int = MIN_TILE,
                   tile_max: int | None = None, min_latent: int = 1) -> tuple[int, int, list[str]]:
    """Snap tile settings to what fits the VAE -> (tile_size, overlap, notes); the widget's JS does the same.

    tile_size: down to a multiple of the downscale factor, within [max(tile_min, min_latent latent px),
    tile_max]. overlap: down to a multiple of the downscale factor, within [0, largest such multiple below
    half the tile]. Notes say what changed, e.g. "overlap 500 -> 376 (< tile/2)".
    """
    ds = max(1, int(downscale))
    t0, o0 = int(tile_size), int(overlap)
    lo = max(-(-tile_min // ds) * ds, min_latent * ds)
    hi = (tile_max // ds * ds) if tile_max else max(lo, t0 // ds * ds)
    t = min(max(t0 // ds * ds, lo), hi)
    notes = []
    if t != t0:
        notes.append(f"tile {t0} -> {t} (x{ds})" if t0 % ds and lo <= t0 <= hi else f"tile {t0} -> {t} ({lo}-{hi})")
    o_max = max(0, (((t + 1) // 2 - 1) // ds) * ds)
    o = min(max(0, max(o0, 0) // ds * ds), o_max)
    if o != o0:
        notes.append(f"overlap {o0} -> {o} (< tile/2)" if o0 > o_max else f"overlap {o0} -> {o}" if o0 < 0
                     else f"overlap {o0} -> {o} (x{ds})")
    return t, o, notes


def as_tiling(tile: Any) -> Tiling | None | str:
    """None -> 'auto'; False -> None; True -> Tiling(); dict/Tiling -> Tiling."""
    if tile is None:
        return "auto"
    if tile is False:
        return None
    if tile is True:
        return Tiling()
    if isinstance(tile, Tiling):
        return tile
    if isinstance(tile, dict):
        unknown = set(tile) - {"tile_size", "overlap", "store", "time_chunk"}
        if unknown:
            raise VAEError(f"tile dict has unknown keys {sorted(unknown)}; use tile_size, overlap, store, time_chunk")
        return Tiling(**{k: (int(v) if k != "store" else v) for k, v in tile.items()})
    raise VAEError(f"tile must be None (auto), False, True, a Tiling or a dict, got {type(tile).__name__}")


def _direction(fn_name: str) -> str:
    return "encode" if fn_name == "encode" else "decode"


def _image_hw(vae, direction, shape) -> tuple[int, int]:
    h, w = shape[-2:]
    return (h, w) if direction == "encode" else (h * vae.downscale, w * vae.downscale)


def _free_bytes(device: torch.device) -> int:
    return memory.available(device)


def resolve(vae, fn_name, shape, tile, dtype):
    """-> None (run untiled) or a Plan."""
    direction = _direction(fn_name)
    t = as_tiling(tile)
    if t is None:
        return None
    hw = _image_hw(vae, direction, shape)
    batch = shape[0]
    if t == "auto":
        need = estimate_memory(vae, direction, hw, None, dtype, batch=batch)
        free = _free_bytes(vae.device)
        if need <= AUTO_FRACTION * free or _half(vae.model, direction) is None:
            return None
        t = Tiling()
        while t.tile_size > 128 and estimate_memory(vae, direction, hw, t, dtype, batch=batch) > AUTO_FRACTION * free:
            t = Tiling(t.tile_size // 2, t.overlap // 2)
    tile_size, overlap, _ = correct_tiling(t.tile_size, t.overlap, vae.downscale)
    t = Tiling(tile_size, overlap, t.store)
    if hw[0] <= t.tile_size and hw[1] <= t.tile_size:
        return None  # one tile: the untiled run is the same computation
    quirk = registry.get(vae.family).untiled_below
    if quirk is not None and quirk(vae.model, (hw[0] // vae.downscale, hw[1] // vae.downscale)):
        return None
    if _half(vae.model, direction) is None:
        raise VAEError(f"this {vae.family} VAE ({vae.variant}) has no {direction}r")
    store = t.store
    if store == "auto":
        if vae.device.type == "cuda":
            store = "ram"
        else:
            stored = estimate(vae, direction, hw, t, dtype, batch=batch)["store_bytes"]
            store = "ram" if stored <= RAM_STORE_FRACTION * _free_bytes(vae.device) else "disk"
    return Plan(t, store, hw)


def _half(model, direction: str):
    return getattr(model, "encoder" if direction == "encode" else "decoder", None)


def stream_program(model, family: str, direction: str, tile_px: int = 512, conditioned: bool = False):
    """The model's own description of ``direction`` compiled into sweeps (None when it lacks that half)."""
    if _half(model, direction) is None:
        return None
    layers = model.describe(direction, conditioned=True) if conditioned else model.describe(direction)
    f = model.downscale
    if direction == "encode":
        src = stream.Buf(model.config.get("in_channels", 3), 1)
    else:
        src = stream.Buf(model.latent_channels, f)
    dst = stream.Buf(Chain(layers).channels(src.channels), f if direction == "encode" else 1)
    extra = {"masked": stream.Buf(3, 1), "mask": stream.Buf(1, 1)} if conditioned else None
    return stream.compile(layers, (src, dst), tile_px, registry.get(family).fuse_halo, extra)


def run(vae, model, fn_name, x, plan: Plan, progress, should_stop, **kw):
    direction = _direction(fn_name)
    inputs = {}
    if direction == "decode" and kw.get("image") is not None and kw.get("mask") is not None:
        image, mask = kw["image"], kw["mask"]
        inputs = {"masked": (1 - mask) * image, "mask": mask}
    elif kw:
        raise VAEError(f"tiled {direction} got unexpected arguments {sorted(kw)}")
    program = stream_program(model, vae.family, direction, tile_px=plan.tiling.tile_size, conditioned=bool(inputs))
    dtype = x.dtype
    store = stream.Store(plan.store, x.device, dtype, directory=os.environ.get("VAE_CORE_TILE_DIR"))
    runner = stream.Runner(program, plan.image_hw, plan.tiling.tile_size, store, x.device, dtype, progress,
                           should_stop)
    out = runner.run({program.src: x, **inputs})
    if direction == "encode":
        if out.shape[1] == 2 * model.latent_channels:
            mean, logvar = out.chunk(2, dim=1)
            return mean, logvar
        return out, None
    return out


# ================================================================================================ out of memory
def execute(vae, model, fn_name, x, tile, progress=None, should_stop=None, **kw):
    """Run ``model.<fn_name>(x)`` the way ``tile`` asks, and never lose the run to an allocation failure.

    The first attempt is ``resolve``'s plan, the batch cut into slices when the estimate says a whole batch does
    not fit. When an attempt fails to allocate (``memory.is_oom``), what it held is released and the run is
    retried smaller: fewer items per slice; then tiled, with the largest tile whose estimate fits the memory
    the process can really use (``memory.available``: free RAM, cgroup and rlimit room, the device's free
    memory), moving the stored activations to the disk store when host memory ran out; then the tile halved,
    until a ``FALLBACK_MIN_TILE`` tile fails too and a ``VAEError`` says what the estimate needed and what to
    try. Tiling is exact, so every retry returns the untiled result. One warning says what was done.
    """
    direction = _direction(fn_name)
    shape = tuple(x.shape)
    if x.ndim == 5:
        return execute_video(vae, model, direction, x, tile, progress, should_stop)
    hw, batch, dtype = _image_hw(vae, direction, shape), shape[0], x.dtype
    plan = resolve(vae, fn_name, shape, tile, dtype)
    out, (plan, items), failed = _retrying(
        (plan, _slice_items(vae, direction, hw, plan, dtype, batch)), x.device, direction, should_stop,
        attempt=lambda a: _sliced(vae, model, fn_name, x, a[0], a[1], progress, should_stop, kw),
        smaller=lambda a, host: _smaller(vae, direction, hw, a[0], a[1], host, dtype, batch),
        describe=lambda a: _describe(a[0], a[1], batch),
        give_up=lambda failed, host: _oom_message(vae, direction, hw, batch, dtype, failed, host))
    if failed:
        log.warning("vae_core: %s of %dx%d (batch %d) ran out of memory with %s; it succeeded with %s (the result "
                    "equals the untiled one)", direction, hw[1], hw[0], batch, ", then ".join(failed),
                    _describe(plan, items, batch))
    return out


def _retrying(first, device, direction: str, should_stop, attempt, smaller, describe, give_up):
    """Run ``attempt(plan)`` from ``first`` until it does not fail to allocate -> (output, the plan that worked,
    descriptions of the plans that failed). After a failure (``memory.is_oom``; anything else is re-raised)
    what the attempt held is released, a Cancel is honoured, and ``smaller(plan, host_ran_out)`` gives the next
    plan; None there raises a VAEError with ``give_up(failed, host_ran_out)``."""
    plan, failed = first, []
    while True:
        host = None
        try:
            out = attempt(plan)
        except Exception as e:  # noqa: BLE001 - only allocation failures are handled, the rest re-raised
            if not memory.is_oom(e):
                raise
            host = memory.host_ran_out(e, device)
        if host is None:
            return out, plan, failed
        # outside the handler: the traceback and the tensors its frames held are gone
        memory.release(device)
        failed.append(describe(plan))
        if should_stop is not None and should_stop():
            raise VAEInterrupted(f"{direction} cancelled between retries")
        nxt = smaller(plan, host)
        if nxt is None:
            raise VAEError(give_up(failed, host))
        plan = nxt


def resolve_video(vae, direction: str, shape, tile, dtype) -> Tiling | None:
    """-> None (untiled: every frame at once) or the Tiling of a video run (auto: whole frames in causal chunks,
    and tiles too when one chunk of whole frames does not fit)."""
    t = as_tiling(tile)
    if t is None:
        return None
    room = AUTO_FRACTION * _free_bytes(vae.device)
    if t == "auto":
        if video.estimate(vae.model, direction, shape, None, 0, dtype)["device_bytes"] <= room:
            return None
        t = Tiling(NODE_TILE_MAX)
        while t.tile_size > FALLBACK_MIN_TILE and \
                video.estimate(vae.model, direction, shape, t.tile_size, 1, dtype)["device_bytes"] > room:
            t = Tiling(t.tile_size // 2)
    size, lap, _ = correct_tiling(t.tile_size, t.overlap, vae.downscale)
    return Tiling(size, lap, t.store, t.time_chunk)


def execute_video(vae, model, direction: str, x, tile, progress=None, should_stop=None):
    """``execute`` for [B,C,T,H,W]: video.run in the tiles and chunks ``tile`` asks for; on an allocation
    failure, retried in one-latent-frame chunks with halved tiles down to FALLBACK_MIN_TILE (exact either way)."""
    shape, dtype = tuple(x.shape), x.dtype

    def attempt(plan):
        if plan is None:
            out = getattr(model, direction)(x)
            if progress is not None:
                progress(1, 1)
            return out
        out = video.run(model, direction, x, plan.tile_size, plan.time_chunk, plan.store, progress, should_stop)
        if direction == "encode":
            out = tuple(out.chunk(2, dim=1)) if out.shape[1] == 2 * model.latent_channels else (out, None)
        return out

    def smaller(plan, host):
        if plan is not None and plan.tile_size <= FALLBACK_MIN_TILE:
            return None
        biggest = max(shape[-2:]) * (vae.downscale if direction == "decode" else 1)
        size = Tiling().tile_size if plan is None else plan.tile_size // 2
        while size >= biggest and size > FALLBACK_MIN_TILE:
            size //= 2
        return Tiling(max(size, FALLBACK_MIN_TILE), 0, "ram", 1)

    out, plan, failed = _retrying(
        resolve_video(vae, direction, shape, tile, dtype), x.device, direction, should_stop, attempt, smaller,
        describe=lambda p: "untiled" if p is None else f"{p.tile_size} px tiles, {p.time_chunk} frame chunks",
        give_up=lambda failed, host: (
            f"the {vae.family} VAE ran out of memory for a video {direction} of shape {list(shape)} even in "
            f"{FALLBACK_MIN_TILE} px tiles and one-frame chunks (tried: {'; '.join(failed)}). Try fewer frames per "
            "run, a smaller batch, freeing memory or a bf16/fp16 VAE"))
    if failed:
        log.warning("vae_core: video %s ran out of memory with %s; it succeeded with %s px tiles in one-frame chunks "
                    "(the result equals the untiled one)", direction, ", then ".join(failed), plan.tile_size)
    return out


def _describe(plan: Plan | None, items: int, batch: int) -> str:
    what = "untiled" if plan is None else f"{plan.tiling.tile_size} px tiles, {plan.store} store"
    return what + (f", {items} item(s) at a time" if items < batch else "")


def _slice_items(vae, direction, hw, plan: Plan | None, dtype, batch: int) -> int:
    """Items per run: the whole batch when its estimate fits free memory, else as many as fit (at least 1)."""
    if batch == 1:
        return 1
    need = estimate_memory(vae, direction, hw, None if plan is None else plan.tiling, dtype, batch=batch)
    room = AUTO_FRACTION * _free_bytes(vae.device)
    if need <= room:
        return batch
    one = estimate_memory(vae, direction, hw, None if plan is None else plan.tiling, dtype, batch=1)
    return max(1, min(batch, int(room // max(one, 1))))


def _smaller(vae, direction, hw, plan: Plan | None, items: int, host: bool, dtype, batch: int):
    """The next, smaller attempt after a failure -> (plan, items), or None when a FALLBACK_MIN_TILE tile failed."""
    if items > 1:
        return plan, items // 2
    if _half(vae.model, direction) is None:
        return None
    biggest = max(hw)
    if plan is None:  # the largest default-or-smaller tile that is a real split and that the estimate says fits
        size = Tiling().tile_size
        while size >= biggest:
            size //= 2
        room = AUTO_FRACTION * _free_bytes(vae.device)
        while size > FALLBACK_MIN_TILE and estimate_memory(vae, direction, hw, Tiling(size, 0), dtype) > room:
            size //= 2
        store = "disk" if host else ("ram" if vae.device.type == "cuda" else "disk")
    else:
        if plan.tiling.tile_size <= FALLBACK_MIN_TILE:
            return None
        size = plan.tiling.tile_size // 2
        store = "disk" if host else ("ram" if plan.store == "device" else plan.store)
    size = max(size, FALLBACK_MIN_TILE)
    if size >= biggest:
        return None
    size, lap, _ = correct_tiling(size, 0, vae.downscale)
    return Plan(Tiling(size, lap, store), store, hw), 1


def _oom_message(vae, direction, hw, batch, dtype, failed, host) -> str:
    gib = 1 << 30
    untiled = estimate_memory(vae, direction, hw, None, dtype, batch=batch) / gib
    smallest = estimate_memory(vae, direction, hw, Tiling(FALLBACK_MIN_TILE, 0, "disk"), dtype) / gib
    where = "host memory" if host else f"{vae.device} memory"
    return (f"the {vae.family} VAE ran out of {where} for a {direction} of {hw[1]}x{hw[0]} (batch {batch}), even in "
            f"{FALLBACK_MIN_TILE} px tiles with the disk store (tried: {'; '.join(failed)}). By vae_core's estimate "
            f"the untiled run needs {untiled:.2f} GiB and one {FALLBACK_MIN_TILE} px tile {smallest:.2f} GiB; "
            f"{_free_bytes(vae.device) / gib:.2f} GiB is available now. Try: a smaller batch, freeing memory (unload "
            f"other models, close other programs), a bf16/fp16 VAE{'' if vae.device.type == 'cpu' else ', or the CPU'}. "
            f"Nothing upstream is lost: the "
            f"{'LATENT' if direction == 'decode' else 'IMAGE'} can still be saved and {direction}d later.")


def _sliced(vae, model, fn_name, x, plan: Plan | None, items: int, progress, should_stop, kw):
    batch = x.shape[0]
    if items >= batch:
        return _once(vae, model, fn_name, x, plan, progress, should_stop, kw)
    starts = range(0, batch, items)
    out = None
    for k, i in enumerate(starts):
        part = {n: (v[i:i + items] if isinstance(v, torch.Tensor) and v.shape[0] == batch else v) for n, v in kw.items()}
        step = None if progress is None else (lambda d, t, k=k: progress(k * t + d, len(starts) * t))
        res = _once(vae, model, fn_name, x[i:i + items], plan, step, should_stop, part)
        res = res if isinstance(res, tuple) else (res,)
        if out is None:
            out = tuple(None if r is None else r.new_empty((batch, *r.shape[1:])) for r in res)
        for o, r in zip(out, res):
            if o is not None:
                o[i:i + items] = r
        del res
    return out if len(out) > 1 else out[0]


def _once(vae, model, fn_name, x, plan: Plan | None, progress, should_stop, kw):
    if plan is None:
        out = getattr(model, fn_name)(x, **kw)
        if progress is not None:
            progress(1, 1)
        return out
    return run(vae, model, fn_name, x, plan, progress, should_stop, **kw)


# ================================================================================================ estimates
def _bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# A banded op (ops.band_conv, the banded UpConv and skip) holds about this many bands at once: its input band,
# the band's result, and the conv library's layout copies of both.
BAND_WORK = 4


def eager_peak(layer: ops.Layer, c: int, hw: tuple[int, int], own: bool = False,
               banded: bool = True) -> tuple[int, tuple[int, int], int]:
    """Run a description on shapes only, as ``Layer.eager`` runs it on tensors -> (channels out, size out, peak
    elements the op allocates at once, its output included; its input is the caller's).

    Chains free each intermediate once the next exists; a residual holds its main branch's output while the skip
    runs; ops that may overwrite an owned input allocate nothing then. ``banded``: large convs run in bands as
    ``Layer.eager`` runs them (False for a tile's ops, which ``apply`` runs whole)."""
    def n(ch, s):
        return ch * s[0] * s[1]

    if isinstance(layer, ops.Chain):
        peak, held, subs, i = 0, 0, layer.layers, 0
        while i < len(subs):
            mine = own or i > 0
            if banded and i + 1 < len(subs) and ops.fuses(subs[i], subs[i + 1], (1, c, *hw)):  # the norm allocates nothing
                i += 1
            c, hw_out, p = eager_peak(subs[i], c, hw, mine, banded)
            peak, held, hw, i = max(peak, held + p), n(c, hw_out), hw_out, i + 1
        return c, hw, peak
    if isinstance(layer, ops.Residual):
        c2, hw2, peak = eager_peak(layer.main, c, hw, False, banded)
        if banded and layer.banded_skip((1, c2, *hw2)):
            peak = max(peak, n(c2, hw2) + BAND_WORK * ops.BAND_ELEMENTS)
        elif layer.skip.layers:
            peak = max(peak, n(c2, hw2) + eager_peak(layer.skip, c, hw, own, banded)[2])
        return c2, hw2, peak
    if isinstance(layer, (ops.Attention, ops.FrameAttention)):  # tokens, q, k, v, out, a copy, one score block
        tokens = hw[0] * hw[1]
        return c, hw, 6 * tokens * c + min(tokens, ops.Attention.BLOCK) * tokens
    if isinstance(layer, ops.LinearAttention):  # qkv, per multiscale kernel two 3C maps, the heads' output, y
        k = len(layer.attn.to_qkv_multiscale)
        return c, hw, n(c, hw) * (3 + 6 * k + (1 + k) + 2)
    if isinstance(layer, ops.Blend):  # x * m, feature * (1 - m), their sum
        return c, hw, 3 * n(c, hw)
    c2, hw2 = layer.channels(c), layer.size(hw)
    if banded and isinstance(layer, ops.Conv) and not layer._pointwise() and layer.banded((1, c, *hw)):
        in_place = own and layer.s == (1, 1) and (c2, hw2) == (c, hw) and layer.k[0] - 1 >= layer.pad[2]
        return c2, hw2, (0 if in_place else n(c2, hw2)) + BAND_WORK * ops.BAND_ELEMENTS
    if isinstance(layer, ops.Conv):
        return c2, hw2, n(c2, hw2) + (n(c, (hw[0] + 1, hw[1] + 1)) if layer.explicit_pad else 0)
    if isinstance(layer, ops.UpConv):  # the padded input, the output and one phase (of a band, on large maps)
        whole = n(c, (hw[0] + 2, hw[1] + 2)) + n(c2, hw2) // 4
        return c2, hw2, n(c2, hw2) + (min(whole, BAND_WORK * ops.BAND_ELEMENTS) if banded else whole)
    if isinstance(layer, ops.Module):  # a per-pixel norm: a squared copy (and a clone when it may not overwrite)
        return c2, hw2, n(c2, hw2) * (1 if own else 2)
    if isinstance(layer, ops.Fn) and not isinstance(layer, stream.Affine):
        return c2, hw2, 0 if own and c2 <= c else n(c2, hw2)
    return c2, hw2, n(c2, hw2)  # Norm, Up, pixel (un)shuffles, subsampling, per-tile forms: a new map


# The process's memory over a run's tensors, measured on CPU (bench/bench_estimate.py: every family, both
# directions, two sizes each, untiled and tiled): oneDNN's layout reorders of conv inputs and outputs add a
# seventh to the tensors an untiled run holds (its large convs run in bands, so their reorders are a band's; more
# for tiles: whole-tile reorders, and many medium-sized blocks the allocator keeps), and by a decoder's peak, at
# its last layers, reorder buffers about a quarter of its conv weights' size are held too.
CPU_FACTOR = 1.15
CPU_TILE_FACTOR = 1.8
CPU_DECODER_WEIGHTS = 0.25


def _conv_weight_elements(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Conv2d))


def _sweep_work(runner: stream.Runner, s: stream.Sweep, r: ops.Region, batch: int) -> int:
    """Elements one tile of a sweep holds at its peak: each branch's read and its layers run on it (as the
    untiled forward would, ``eager_peak``), plus the outputs of the branches already done."""
    done, peak = 0, 0
    for name, layer in s.branches:
        c = runner.p.bufs[name].channels
        n = layer.need(r)
        read = c * n.h * n.w
        c_out, _, p = eager_peak(layer, c, (n.h, n.w), own=True, banded=False)  # a tile's ops run whole
        peak = max(peak, done + read + p)
        done += c_out * r.h * r.w
    return peak * batch


def estimate(vae_or_model, direction: str, image_hw, tiling: Tiling | None, dtype=torch.float32, batch: int = 1,
             family: str | None = None) -> dict:
    """Memory of a run: {'device_bytes', 'store_bytes', 'work_bytes', 'tiles'}.

    device_bytes is what the compute device holds at its peak (the number auto mode compares with free
    memory): untiled, the network's description run on shapes (``eager_peak``); tiled, one tile's working set
    (plus the stored activations only for store='device'). The weights and the input are not counted. A model,
    not a measurement: bench/bench_estimate.py checks it against measured peaks.
    """
    model = getattr(vae_or_model, "model", vae_or_model)
    family = family or getattr(vae_or_model, "family", None)
    if _half(model, direction) is None:
        return {"device_bytes": None, "store_bytes": None, "work_bytes": None, "tiles": None}
    if getattr(model, "video", False):  # one frame of a video family: video.py's own model of a run
        f = model.downscale
        h, w = (int(image_hw[0]), int(image_hw[1]))
        shape = (batch, model.latent_channels, 1, h // f, w // f) if direction == "decode" else (batch, 3, 1, h, w)
        est = video.estimate(model, direction, shape, None if tiling is None else tiling.tile_size, 0 if tiling is None
                             else tiling.time_chunk, dtype)
        tiles = 1 if tiling is None else len(ops.grid((h, w), tiling.tile_size))
        return {**est, "work_bytes": est["device_bytes"], "tiles": tiles}
    hw = tuple(int(v) for v in image_hw)
    es = _bytes(dtype)
    cpu = getattr(getattr(vae_or_model, "device", None), "type", "cpu") == "cpu"
    store_peak, tiles = None, 1
    if tiling is None:  # the untiled forward: its description run on shapes
        f = model.downscale
        c, hw_in = (model.latent_channels, (hw[0] // f, hw[1] // f)) if direction == "decode" else (3, hw)
        work_peak = eager_peak(ops.Chain(model.describe(direction)), c, hw_in)[2] * batch * es
    else:
        work_peak, store_peak, tiles = _tiled_peaks(model, family, direction, hw, tiling, es, batch, dtype)
    device = work_peak
    if cpu:
        device = work_peak * (CPU_FACTOR if tiling is None else CPU_TILE_FACTOR)
        if direction == "decode":
            device += CPU_DECODER_WEIGHTS * _conv_weight_elements(_half(model, direction)) * es
    if tiling is not None and tiling.store == "device":
        device += store_peak
    return {"device_bytes": int(device), "store_bytes": None if store_peak is None else int(store_peak),
            "work_bytes": int(work_peak), "tiles": tiles}


def _tiled_peaks(model, family, direction, hw, tiling: Tiling, es: int, batch: int, dtype) -> tuple[int, int, int]:
    """(one tile's working set, the store's peak, tile count) of the compiled program, in bytes."""
    program = stream_program(model, family, direction, tile_px=tiling.tile_size)
    runner = stream.Runner(program, hw, tiling.tile_size, None, "meta", dtype)
    runner.batch = batch
    live, store_peak, work_peak = 0, 0, 0
    sizes = {}
    for s in program.steps:
        if isinstance(s, stream.Sweep):
            if s.dst is not None and s.dst != program.dst and s.inplace is None and s.dst not in sizes:
                sizes[s.dst] = s.out.channels * math.prod(runner.hw(s.out)) * es * batch
                live += sizes[s.dst]
            elif s.inplace is not None:
                sizes[s.dst] = sizes.pop(s.inplace, 0)
            store_peak = max(store_peak, live)
            biggest = max(runner.tiles(s.out), key=lambda r: r.h * r.w)
            work_peak = max(work_peak, _sweep_work(runner, s, biggest, batch) * es)
        elif isinstance(s, stream.Custom):
            for name, buf in s.allocs:
                if s.inplace is not None:
                    sizes[name] = sizes.pop(s.inplace, 0)
                elif name not in sizes:
                    sizes[name] = buf.channels * math.prod(runner.hw(buf)) * es * batch
                    live += sizes[name]
            store_peak = max(store_peak, live)
            if s.work is not None:
                work_peak = max(work_peak, s.work(runner, tiling.tile_size) * batch * es // 4)
        elif isinstance(s, stream.Free):
            for n in s.names:
                live -= sizes.pop(n, 0)
    return work_peak, store_peak, runner.total


def estimate_memory(vae, direction: str, image_hw, tiling: Tiling | None, dtype=torch.float32, batch: int = 1) -> int:
    """Compute-device bytes a run needs (untiled for ``tiling=None``); see ``estimate``."""
    return estimate(vae, direction, image_hw, tiling, dtype, batch=batch)["device_bytes"] or 0


# ================================================================================================ widget
_META_MODELS: dict = {}


def _meta_model(family: str):
    """A model of the family's default released config on the meta device (shapes only, no memory)."""
    if family not in _META_MODELS:
        rec = registry.get(family)
        with torch.device("meta"):
            _META_MODELS[family] = rec.module.build(dict(rec.variants[rec.default_variant]))
    return _META_MODELS[family]


def plan_grid(width: int, height: int, tile_size: int = 512, overlap: int = 64, downscale: int | None = None,
              mode: str = "decode", family: str = "kl", tiling: str = "always", vae=None) -> dict:
    """The tile grid the engine uses for an image, with memory estimates (float32), for the widget.

    Tiles are the cores written by the image-resolution sweeps: non-overlapping, nearly equal, covering the
    image (each sweep reads a few pixels of halo around them; ``overlap`` does not change the grid).
    """
    model = vae.model if vae is not None else _meta_model(family)
    f = downscale or (vae.downscale if vae is not None else (model.downscale if model is not None else 8))
    size, lap, notes = correct_tiling(tile_size, overlap, f, tile_min=NODE_TILE_MIN, tile_max=NODE_TILE_MAX,
                                      min_latent=8)
    t = Tiling(size, lap)
    hw = (-(-int(height) // f) * f, -(-int(width) // f) * f)
    untiled = est = None
    if model is not None:
        untiled = estimate(model, mode, hw, None, family=family)["device_bytes"]
        est = estimate(model, mode, hw, t, family=family)
    if tiling == "never":
        tiled = False
    elif tiling == "auto":
        tiled = untiled is not None and untiled > AUTO_FRACTION * _free_bytes(torch.device("cpu"))
    else:
        tiled = True
    tiled = tiled and not (hw[0] <= t.tile_size and hw[1] <= t.tile_size)
    spans_y = ops.split(hw[0], t.tile_size) if tiled else [(0, hw[0])]
    spans_x = ops.split(hw[1], t.tile_size) if tiled else [(0, hw[1])]
    tiles = [[x0, y0, min(x1, int(width)), min(y1, int(height))] for y0, y1 in spans_y for x0, x1 in spans_x]
    return {
        "width": int(width), "height": int(height), "tile_size": t.tile_size, "overlap": t.overlap,
        "family": family, "downscale": f, "mode": mode, "tiled": tiled,
        "rows": len(spans_y), "cols": len(spans_x), "count": len(tiles), "tiles": tiles,
        "memory": {"untiled_bytes": untiled,
                   "per_tile_bytes": (est["device_bytes"] if tiled else untiled) if est else None,
                   "store_bytes": est["store_bytes"] if (est and tiled) else None},
        "exact": True, "corrections": notes,
    }
