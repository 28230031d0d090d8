"""Exact tiled runs of video networks ([B,C,T,H,W]): space in tiles through halos, time in causal chunks.

The network is its ``describe()`` (``wan.py``), cut at its global ops (the per-frame attention) into segments.
Every other op is local in space and causal in time, so a local segment runs tile by tile (each tile reads the
halo its layers need, derived from the layers as in ``stream``), and within a tile chunk by chunk in time: the
first chunk is the first frame, then ``time_chunk`` latent frames (4x as many image frames) at a time, each causal
op carrying its last input frames from one chunk to the next (``ops.EagerContext.time_cache``, one per tile).
That is what diffusers and ComfyUI do over whole frames, so chunking changes nothing but float rounding. A global
segment (the frame attention) runs frame by frame over the whole frame.

Between segments the activations of the whole video live in a store (host RAM; the device for
store='device'), as ``stream``'s buffers do: the compute device holds one tile of one chunk and its carried
frames. Results equal the untiled run up to float rounding.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import ops
from .errors import VAEError, VAEInterrupted
from .ops import Chain, Region, grid


def segments(model, direction: str) -> list:
    """The description cut at its global ops: local ``Chain``s and global ops, in order."""
    out, cur = [], []
    for layer in Chain(model.describe(direction)).layers:
        if layer.local:
            cur.append(layer)
            continue
        if cur:
            out.append(Chain(cur))
            cur = []
        out.append(layer)
    if cur:
        out.append(Chain(cur))
    return out


def time_scale(layer) -> float:
    """Output frames per input frame of a layer (after the first frame)."""
    if isinstance(layer, ops.TimeDownsample):
        return 0.5
    if isinstance(layer, ops.TimeUpsample):
        return 2.0
    if isinstance(layer, ops.Chain):
        return math.prod(time_scale(sub) for sub in layer.layers)
    if isinstance(layer, ops.Residual):
        return time_scale(layer.main)
    return 1.0


def chunks(frames: int, size: int) -> list[tuple[int, int]]:
    """[0, frames) as the first frame, then spans of ``size`` frames (0: all the rest at once)."""
    size = size if size > 0 else max(frames - 1, 1)
    return [(0, 1)] + [(t, min(frames, t + size)) for t in range(1, frames, size)]


def tile_apply(layer, x: torch.Tensor, have: Region, r: Region, hw, ctx) -> torch.Tensor:
    """``layer.apply`` with every intermediate region clipped to its buffer: a tile at the frame's edge computes
    nothing past the edge (every spatial op here zero-pads outside its buffer, so the zeros read there instead
    are exact). ``x`` covers ``have``; returns the output over ``r``."""
    if isinstance(layer, ops.Chain):
        sizes = [tuple(hw)]
        for sub in layer.layers:
            sizes.append(sub.size(sizes[-1]))
        regions = [r]
        for i in range(len(layer.layers) - 1, 0, -1):
            regions.append(layer.layers[i].need(regions[-1]).clip(sizes[i]))
        regions.reverse()  # regions[i]: the output region of layer i
        for sub, out, size in zip(layer.layers, regions, sizes):
            x, have = tile_apply(sub, x, have, out, size, ctx), out
        return x
    if isinstance(layer, ops.Residual):
        y = tile_apply(layer.main, x, have, r, hw, ctx)
        y = y.add_(tile_apply(layer.skip, x, have, r, hw, ctx)) if layer.skip.layers else y + ops.crop(x, have, r)
        return layer.post.eager(y, True, ctx) if layer.post is not None else y
    n = layer.need(r)
    if not n.inside(have):  # zeros past the buffer's edge (the part inside the buffer is in x)
        v = n.clip(tuple(hw))
        x = F.pad(ops.crop(x, have, v), (v.x0 - n.x0, n.x1 - v.x1, v.y0 - n.y0, n.y1 - v.y1))
        have = n
    return layer.apply(x, have, r, hw, ctx)


class _Progress:
    def __init__(self, total: int, progress, should_stop):
        self.total, self.done, self.progress, self.should_stop = max(total, 1), 0, progress, should_stop

    def check(self):
        if self.should_stop is not None and self.should_stop():
            raise VAEInterrupted("cancelled between tiles")

    def tick(self):
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def plan(model, direction: str, shape, tile_px: int, time_chunk: int) -> list[dict]:
    """Per segment: its op, input and output (frames, h, w), tile grid and chunk size (latent frames)."""
    f = model.downscale
    frames, h, w = shape[2], shape[3], shape[4]
    tf = model.time_downscale if direction == "encode" else 1  # buffer frames per latent frame
    px = 1 if direction == "encode" else f  # image pixels per buffer pixel
    out = []
    for seg in segments(model, direction):
        ts = time_scale(seg)
        frames_out = 1 + int(round((frames - 1) * ts))
        if seg.local:
            hw_out = seg.size((h, w))
            px_out = px / seg.scale
            tiles = grid(hw_out, max(1, int(tile_px // px_out))) if tile_px else [Region(0, hw_out[0], 0, hw_out[1])]
            step = {"op": seg, "tiles": tiles, "chunk": int(round(time_chunk * tf)), "hw_out": hw_out}
        else:  # the frame attention: query tiles of the local segments' size, at this resolution
            hw_out, px_out = (h, w), px
            tiles = grid(hw_out, max(1, int(tile_px // px))) if tile_px else [Region(0, h, 0, w)]
            step = {"op": seg, "tiles": tiles, "chunk": 0, "hw_out": hw_out}
        step.update(frames=frames, frames_out=frames_out, hw=(h, w))
        out.append(step)
        frames, (h, w), px, tf = frames_out, hw_out, px_out, tf * ts
    return out


def run(model, direction: str, x: torch.Tensor, tile_px: int | None, time_chunk: int, store: str = "ram",
        progress=None, should_stop=None) -> torch.Tensor:
    """The whole ``direction`` of a video network on x [B,C,T,H,W], in tiles of ``tile_px`` image pixels (None:
    whole frames) and chunks of ``time_chunk`` latent frames (0: all frames at once)."""
    device, dtype = x.device, x.dtype
    keep = device if store == "device" else torch.device("cpu")
    steps = plan(model, direction, x.shape, tile_px or 0, time_chunk)
    total = sum(len(s["tiles"]) * (len(chunks(s["frames"], s["chunk"])) if s["op"].local else s["frames"])
                for s in steps)
    prog = _Progress(total, progress, should_stop)
    h = x
    for s in steps:
        op = s["op"]
        prog.check()
        if not op.local:
            h = frame_attention(op, h, s["tiles"], device, dtype, keep, prog)
            continue
        out = None
        for r in s["tiles"]:
            n = op.need(r).clip(s["hw"])
            ctx = ops.EagerContext()
            ctx.time_cache = {}
            t_out = 0
            whole = len(s["tiles"]) == 1  # whole frames: the eager path, no halo read past the frame's edges
            spans = chunks(s["frames"], s["chunk"])
            for t0, t1 in spans:
                prog.check()
                ctx.time_final = t1 == spans[-1][1]
                if whole:
                    y = op.eager(h[:, :, t0:t1].to(device, dtype), False, ctx)
                else:
                    y = tile_apply(op, h[:, :, t0:t1, n.y0:n.y1, n.x0:n.x1].to(device, dtype), n, r, s["hw"], ctx)
                if out is None:
                    out = torch.empty(y.shape[:2] + (s["frames_out"],) + tuple(s["hw_out"]), dtype=y.dtype, device=keep)
                out[:, :, t_out:t_out + y.shape[2], r.y0:r.y1, r.x0:r.x1] = y
                t_out += y.shape[2]
                del y
                prog.tick()
            if t_out != s["frames_out"]:
                raise VAEError(f"internal: a tile produced {t_out} frames, {s['frames_out']} expected")
            del ctx
        h = out
    return h.to(device)


def frame_attention(op: ops.FrameAttention, h: torch.Tensor, tiles: list[Region], device, dtype, keep, prog):
    """``op`` over the stored video h [B,C,T,H,W], frame by frame and streamed: a frame's keys and values are
    written to the store tile by tile, then each query tile attends to them in full-width strips
    (``ops.attend_streamed``), so the device holds one tile, one strip and one score block, whatever the frame
    size and the number of frames."""
    b, c, frames, hh, ww = h.shape
    out = torch.empty_like(h, device=keep)
    block = min(ops.Attention.BLOCK, max(r.h * r.w for r in tiles))
    strips = ops.key_strips((hh, ww), block)

    def keys_values(kv):
        for rk in strips:
            kvt = kv[:, :, rk.y0:rk.y1].to(device, dtype).flatten(2).transpose(1, 2).float()
            yield kvt[..., :c], kvt[..., c:]

    for t in range(frames):
        kv = torch.empty((b, 2 * c, hh, ww), dtype=h.dtype, device=keep)
        for r in tiles:
            prog.check()
            kv[:, :, r.y0:r.y1, r.x0:r.x1] = op.keys_values(h[:, :, t, r.y0:r.y1, r.x0:r.x1].to(device, dtype))
        for r in tiles:
            prog.check()
            xt = h[:, :, t, r.y0:r.y1, r.x0:r.x1].to(device, dtype)
            o = ops.attend_streamed(op.queries(xt), functools.partial(keys_values, kv), block)
            out[:, :, t, r.y0:r.y1, r.x0:r.x1] = op.finish(o, xt)
            del xt, o
            prog.tick()
        del kv
    return out


# ================================================================================================ estimates
def _peak_2d(layer, c: int, hw) -> int:
    from .tiling import eager_peak
    return eager_peak(layer, c, hw)[2]


def estimate(model, direction: str, shape, tile_px: int | None, time_chunk: int, dtype=torch.float32) -> dict:
    """Bytes a run holds at its peak, a model (not a measurement): untiled (tile_px None, time_chunk 0), the
    network's description run on shapes per frame times the frames in flight; tiled, one tile of one chunk plus
    its carried frames, and the store (the activations between segments)."""
    es = torch.empty((), dtype=dtype).element_size()
    b = shape[0]
    steps = plan(model, direction, shape, tile_px or 0, time_chunk)
    work, stored = 0, 0
    c = shape[1]
    for s in steps:
        op, frames, ts = s["op"], s["frames"], time_scale(s["op"])
        if not time_chunk or s["chunk"] == 0 or frames == 1:
            inflight = max(frames, s["frames_out"])
        else:
            inflight = max(min(frames - 1, s["chunk"]) * max(1.0, ts), 1)
        extra = 0
        if not op.local and tile_px is None:  # every frame at once
            work = max(work, _peak_2d(op, c, s["hw"]) * inflight)
        elif not op.local:  # frame_attention: a query tile, a key strip and a score block; a frame's K and V stored
            n = max(r.h * r.w for r in s["tiles"])
            block = min(ops.Attention.BLOCK, n)
            kb = ops.key_strips(s["hw"], block)[0]
            kb = kb.h * kb.w
            work = max(work, 6 * n * c + 4 * kb * c + 2 * block * kb)
            extra = 2 * c * math.prod(s["hw"])
        else:
            r = max(s["tiles"], key=lambda t: t.h * t.w)
            n = op.need(r)
            carried = 0
            if time_chunk and frames > 1:  # two frames of every causal conv's input over the tile
                carried = 2 * sum(layer.m.in_channels * (n.h * scale) * (n.w * scale)
                                  for layer, scale in _walk(op, 1.0) if isinstance(layer, ops.CausalConv3d)
                                  and layer.frames)
            work = max(work, _peak_2d(op, c, (n.h, n.w)) * inflight + carried)
        c = op.channels(c)
        stored = max(stored, c * s["frames_out"] * math.prod(s["hw_out"]) + extra)
    return {"device_bytes": int(work * b * es), "store_bytes": int(stored * b * es)}


def _walk(layer, scale: float):
    """(op, its input resolution relative to the segment's input) for every op of a segment."""
    if isinstance(layer, ops.Chain):
        for sub in layer.layers:
            yield from _walk(sub, scale)
            scale *= sub.scale
    elif isinstance(layer, ops.Residual):
        yield from _walk(layer.main, scale)
        yield from _walk(layer.skip, scale)
    else:
        yield layer, scale
