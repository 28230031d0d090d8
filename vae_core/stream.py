"""Layer-wise streaming: run a described network (``ops``) over an image in tiles, exactly, with a working set
bounded by the tile.

Why not "run the model per tile and blend": every GroupNorm normalises with statistics of the *whole* feature
map, the KL mid block attends over the whole latent and DC-AE's linear attention sums over it. A tile that sees
only itself gets other statistics (colour and contrast shifts, seams) whatever the overlap. Recomputing every
tile up to each GroupNorm would be exact but costs about (number of GN layers / 2) decodes.

What we do instead. ``Compiler`` turns a network's description (the same one its untiled forward runs) into a
*program*: a list of steps over named feature maps ("buffers") that live in a *store* (host RAM, a temp file on
disk, or the device), not on the compute device.

- ``Sweep``: for every output tile, read the input buffer(s) over the region the step's layers need (a halo
  of 1 px per 3x3 conv, derived from the layers, never guessed), run the layers on the device, write the tile's
  core into the output buffer, and fold the tile into *reductions* of the output (exact per-channel
  count/mean/M2, merged with Chan's formula in float64): these are the next GroupNorm's statistics, known
  exactly before any tile passes that GroupNorm.
- A GroupNorm with known statistics is a per-channel affine map, i.e. pointwise: it becomes the first op of
  the next sweep. Local ops between two global ones fuse into one sweep while the halo stays small relative to
  the tile, so purely local chains (TAESD) need few stored activations.
- Global steps use the same reductions: softmax attention streams query tiles against key/value strips with a
  running log-sum-exp (``attention_step``); linear attention sums ``v k^T`` over tiles, then applies it per tile.

The compute device therefore only ever holds one tile's activations (peak ~ tile, not image), and every
result equals the untiled one up to float rounding (different summation order). The full-resolution
activations between sweeps are what the untiled run also holds; they go to the store. The cost is the I/O of
writing and re-reading those buffers once per sweep.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import ops
from .errors import VAEInterrupted
from .ops import Chain, Layer, Region, grid, group_affine, merge_moments, moments


def gn_act(norm: torch.nn.GroupNorm, key: str, act: str | None) -> Callable:
    """Pointwise fn: GroupNorm ``norm`` with the exact statistics of buffer ``key``, then an activation."""

    def fn(x, ctx, inplace=False):
        scale, shift = ctx.affine(norm, key, x.dtype, x.device)
        return ops.affine_act(x, scale, shift, act, inplace=inplace)

    return fn


# ================================================================================================ stores
class RamBuffer:
    """A map in memory. It takes the layout of the first tile written into it (a channels_last network's maps
    stay channels_last, so its tiles are read without a layout change)."""

    def __init__(self, shape, dtype, device, pin=False, data: torch.Tensor | None = None):
        self.data = data
        self.shape = tuple(data.shape) if data is not None else tuple(shape)
        self._alloc = (dtype, device, pin and device == "cpu")

    def read(self, r: Region, device, dtype) -> torch.Tensor:
        v = r.clip(self.shape[-2:])
        fmt = ops.layout(self.data) if self.data is not None else torch.contiguous_format
        if v == r and self.data is not None:
            return self.data[..., v.y0:v.y1, v.x0:v.x1].to(device=device, dtype=dtype, non_blocking=True, copy=True,
                                                             memory_format=fmt)
        out = torch.empty(self.shape[:2] + (r.h, r.w), device=device, dtype=dtype, memory_format=fmt).zero_()
        if v.h > 0 and v.w > 0 and self.data is not None:
            out[..., v.y0 - r.y0: v.y1 - r.y0, v.x0 - r.x0: v.x1 - r.x0].copy_(self.data[..., v.y0:v.y1, v.x0:v.x1])
        return out

    def write(self, r: Region, t: torch.Tensor) -> None:
        if self.data is None:
            dtype, device, pin = self._alloc
            self.data = torch.empty(self.shape, dtype=dtype, device=device, pin_memory=pin, memory_format=ops.layout(t))
        self.data[..., r.y0:r.y1, r.x0:r.x1].copy_(t)

    def close(self):
        self.data = None


class DiskBuffer:
    """A [B, C, H, W] feature map in a temp file, stored as [B, H, W, C] rows, read/written with pread/pwrite.

    Plain file I/O (not mmap): the pages sit in the kernel's page cache, which the kernel may drop or write
    back under memory pressure; they are not part of the process's own memory.
    """

    def __init__(self, shape, dtype, directory: str | None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.esize = torch.empty((), dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(prefix="vae_core_tile_", suffix=".bin", dir=directory)
        os.unlink(path)  # the file disappears with its descriptor
        self.fd = fd
        b, c, h, w = self.shape
        os.ftruncate(fd, b * c * h * w * self.esize)

    def _rows(self, r: Region):
        b, c, h, w = self.shape
        row = c * self.esize
        for bi in range(b):
            for y in range(r.y0, r.y1):
                yield bi, y - r.y0, ((bi * h + y) * w + r.x0) * row

    def read(self, r: Region, device, dtype) -> torch.Tensor:
        b, c, h, w = self.shape
        v = r.clip((h, w))
        if v.h <= 0 or v.w <= 0:
            return torch.zeros((b, c, r.h, r.w), device=device, dtype=dtype)
        host = torch.empty((b, r.h, r.w, c), dtype=self.dtype)  # channels-last rows, as stored
        if v != r:  # zero what lies outside the buffer (only those rows and columns)
            host[:, : v.y0 - r.y0].zero_()
            host[:, v.y1 - r.y0:].zero_()
            host[:, :, : v.x0 - r.x0].zero_()
            host[:, :, v.x1 - r.x0:].zero_()
        raw = host.view(torch.uint8).numpy().reshape(b, r.h, -1)
        row = c * self.esize
        cols = slice((v.x0 - r.x0) * row, (v.x1 - r.x0) * row)
        for bi, yi, off in self._rows(v):
            os.preadv(self.fd, [raw[bi, yi + v.y0 - r.y0, cols]], off)
        return host.permute(0, 3, 1, 2).to(device=device, dtype=dtype)  # no copy on CPU in the same dtype

    def write(self, r: Region, t: torch.Tensor) -> None:
        host = t.detach().to("cpu", self.dtype).permute(0, 2, 3, 1).contiguous()
        raw = host.view(torch.uint8).numpy().reshape(host.shape[0], host.shape[1], -1)
        for bi, yi, off in self._rows(r):
            os.pwrite(self.fd, raw[bi, yi], off)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


class Store:
    """Named buffers. ``kind``: 'ram' (host RAM, pinned for CUDA), 'disk' (temp files) or 'device'."""

    def __init__(self, kind: str, device: torch.device, dtype: torch.dtype, directory: str | None = None):
        self.kind, self.device, self.dtype, self.directory = kind, device, dtype, directory
        self.buffers: dict[str, object] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Wrap a caller's tensor (the input, the output) without copying; it does not count as stored."""
        self.buffers[name] = RamBuffer(None, None, None, data=tensor)

    def alloc(self, name: str, shape) -> None:
        if self.kind == "disk":
            buf = DiskBuffer(shape, self.dtype, self.directory)
        elif self.kind == "device":
            buf = RamBuffer(shape, self.dtype, self.device)
        else:
            buf = RamBuffer(shape, self.dtype, "cpu", pin=self.device.type == "cuda")
        self.buffers[name] = buf

    def alias(self, new: str, old: str) -> None:
        self.buffers[new] = self.buffers[old]

    def free(self, name: str) -> None:
        buf = self.buffers.pop(name, None)
        if buf is not None and all(b is not buf for b in self.buffers.values()):
            buf.close()

    def close(self):
        for name in list(self.buffers):
            self.free(name)


# ================================================================================================ program
@dataclass
class Buf:
    """A buffer declaration: channels and downscale ``d`` (image pixels per buffer pixel)."""
    channels: int
    d: float


@dataclass
class Sweep:
    """out[tile] = combine([layers_i(read(src_i, need_i(tile))) for each branch]) for every tile of ``dst``.

    ``dst`` None: nothing stored, only the reductions (``stats``: fold the output tile's moments into
    ctx.stats[stats]). ``inplace``: the output may overwrite this input buffer (it is read only at the core).
    """
    branches: list[tuple[str, Layer]]
    dst: str | None
    out: Buf
    stats: str | None = None
    combine: Callable | None = None
    inplace: str | None = None
    reduce: Callable | None = None  # reduce(y, ctx) -> folded into ctx.sums[reduce_key] by addition
    reduce_key: str | None = None


@dataclass
class Free:
    names: tuple[str, ...]


@dataclass
class Custom:
    """A global step with its own tile loop (attention): run(ctx); ``tiles(ctx)`` counts its tiles."""
    run: Callable
    tiles: Callable
    allocs: tuple[tuple[str, Buf], ...] = ()
    work: Callable | None = None  # work(ctx, tile_px) -> device bytes per tile (estimates)
    inplace: str | None = None  # the input buffer whose storage the output takes over (set by the compiler)
    reads: tuple[str, ...] = ()
    core_only: str | None = None  # the input it reads only at each output tile's own core (may be taken over)


@dataclass
class Program:
    src: str
    src_buf: Buf
    dst: str
    dst_buf: Buf
    steps: list = field(default_factory=list)
    extra_inputs: dict = field(default_factory=dict)  # name -> Buf, tensors given at run time
    bufs: dict = field(default_factory=dict)  # name -> Buf, filled by ``declare``

    def declare(self):
        self.bufs = {self.src: self.src_buf, self.dst: self.dst_buf, **self.extra_inputs}
        for s in self.steps:
            if isinstance(s, Sweep) and s.dst is not None:
                self.bufs[s.dst] = s.out
            if isinstance(s, Custom):
                self.bufs.update(dict(s.allocs))
        return self


# ================================================================================================ runner
class Runner:
    """Executes a Program: the tile loop, the store, the statistics, progress and cancel."""

    def __init__(self, program: Program, image_hw: tuple[int, int], tile_px: int, store: Store,
                 device, dtype, progress=None, should_stop=None):
        self.p = program.declare()
        self.image_hw = image_hw
        self.tile_px = tile_px
        self.store = store
        self.device, self.dtype = device, dtype
        self.progress, self.should_stop = progress, should_stop
        self.stats: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self._affine: dict = {}
        self.done = 0
        self.total = sum(self.count(s) for s in self.p.steps)

    # ---- geometry
    def hw(self, name_or_buf) -> tuple[int, int]:
        b = self.p.bufs[name_or_buf] if isinstance(name_or_buf, str) else name_or_buf
        return round(self.image_hw[0] / b.d), round(self.image_hw[1] / b.d)

    def tile(self, buf: Buf) -> int:
        return max(1, round(self.tile_px / buf.d))

    def tiles(self, buf: Buf) -> list[Region]:
        return grid(self.hw(buf), self.tile(buf))

    def count(self, step) -> int:
        if isinstance(step, Sweep):
            return len(self.tiles(step.out))
        if isinstance(step, Custom):
            return step.tiles(self)
        return 0

    # ---- hooks for layers
    def affine(self, norm, key, dtype, device):
        k = (id(norm), key, dtype, device)
        if k not in self._affine:
            scale, shift = group_affine(norm, self.stats[key], dtype)
            self._affine[k] = (scale.to(device), shift.to(device))
        return self._affine[k]

    def tick(self):
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def check_stop(self):
        if self.should_stop is not None and self.should_stop():
            raise VAEInterrupted(f"stopped by the caller after {self.done} of {self.total} tiles")

    # ---- execution
    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        b = next(iter(inputs.values())).shape[0]
        self.batch = b
        for name, t in inputs.items():
            self.store.put(name, t)
        dst_hw = self.hw(self.p.dst)
        out = torch.empty((b, self.p.dst_buf.channels) + dst_hw, device=self.device, dtype=self.dtype)
        self.store.put(self.p.dst, out)
        try:
            for step in self.p.steps:
                if isinstance(step, Sweep):
                    self.sweep(step)
                elif isinstance(step, Free):
                    for n in step.names:
                        self.store.free(n)
                else:
                    step.run(self)
        finally:
            self.store.close()
        return out

    def sweep(self, s: Sweep):
        if s.dst is not None and s.dst not in self.store.buffers:
            if s.inplace is not None:
                self.store.alias(s.dst, s.inplace)
            else:
                self.store.alloc(s.dst, (self.batch, s.out.channels) + self.hw(s.out))
        srcs = [(name, layer, self.hw(name)) for name, layer in s.branches]
        for r in self.tiles(s.out):
            self.check_stop()
            ys = []
            for name, layer, hw in srcs:
                n = layer.need(r)
                x = self.store.buffers[name].read(n, self.device, self.dtype)
                ys.append(layer.apply(x, n, r, hw, self))
                del x
            if s.combine is not None:
                y = s.combine(ys, r, self)
            else:  # every branch result is this sweep's own tensor (fresh reads, layer outputs): add in place
                y = ys[0]
                for other in ys[1:]:
                    y = y.add_(other)
            del ys
            if s.stats is not None:
                self.stats[s.stats] = merge_moments(self.stats.get(s.stats), moments(y))
            if s.reduce is not None:
                part = s.reduce(y, self)
                self.sums[s.reduce_key] = part if s.reduce_key not in self.sums else self.sums[s.reduce_key] + part
            if s.dst is not None:
                self.store.buffers[s.dst].write(r, y)
            del y
            self.tick()




# ================================================================================================ tiled forms
class Affine(Layer):
    """A GroupNorm whose input statistics (buffer ``key``) are known: a per-channel affine map, then ``act``."""

    def __init__(self, norm: torch.nn.GroupNorm, key: str, act: str | None):
        self.fn = gn_act(norm, key, act)

    def apply(self, x, have, r, hw_in, ctx):
        return self.fn(crop_to(x, have, r), ctx)


def crop_to(x, have, r):
    return x if have == r else ops.crop(x, have, r)


class KV(Layer):
    """Keys and values of ``ops.Attention`` per pixel (its GroupNorm with the known statistics of ``key``)."""

    def __init__(self, attn, key: str):
        self.attn, self.norm = attn, gn_act(attn.group_norm, key, None)

    def apply(self, x, have, r, hw_in, ctx):
        a = self.attn
        tok = self.norm(crop_to(x, have, r), ctx).flatten(2).transpose(1, 2)
        k, v = F.linear(tok, a.to_k.weight, a.to_k.bias), F.linear(tok, a.to_v.weight, a.to_v.bias)
        return torch.cat([k, v], -1).transpose(1, 2).reshape(x.shape[0], -1, r.h, r.w)

    def channels(self, c):
        return 2 * c


class Partial(Layer):
    """A sweep 'output' that is ``ops.LinearAttention.partial``: the tile's share of the global sums."""

    def __init__(self, la: ops.LinearAttention):
        self.la = la

    def need(self, r):
        return self.la.need(r)

    def apply(self, x, have, r, hw_in, ctx):
        return self.la.partial(x, have, r, hw_in)


def attention_step(attn, x: str, kv: str, out: str, xbuf: Buf) -> Custom:
    """``ops.Attention`` tiled: exact softmax attention with one query tile and one key strip on the device.

    For each query tile, keys/values stream strip by strip with a running max and normaliser (the log-sum-exp
    merge of flash attention), so the result equals full attention up to rounding. out = to_out(attn) + x.
    """
    c = xbuf.channels
    norm = gn_act(attn.group_norm, x, None)
    scale = 1.0 / math.sqrt(c)
    block_max = ops.Attention.BLOCK

    def run(ctx):
        store = ctx.store
        if step.inplace:
            store.alias(out, x)  # each query tile reads x only at its own core, then overwrites it
        else:
            store.alloc(out, (ctx.batch, c) + ctx.hw(xbuf))
        tiles = ctx.tiles(xbuf)
        # keys/values stream in full-width strips of about block tokens; queries go block at a time, so the
        # score matrix is at most block x block whatever the tile and latent size
        block = min(block_max, max(r.h * r.w for r in tiles))  # scales with the tile, at most BLOCK
        strips = ops.key_strips(ctx.hw(xbuf), block)

        def keys_values():
            for rk in strips:
                kvt = store.buffers[kv].read(rk, ctx.device, ctx.dtype).flatten(2).transpose(1, 2).float()
                yield kvt[..., :c], kvt[..., c:]

        for r in tiles:
            ctx.check_stop()
            xt = store.buffers[x].read(r, ctx.device, ctx.dtype)
            b, _, h, w = xt.shape
            tok = norm(xt, ctx).flatten(2).transpose(1, 2)
            q = F.linear(tok, attn.to_q.weight, attn.to_q.bias).float() * scale
            del tok
            o = ops.attend_streamed(q, keys_values, block)
            o = F.linear(o.to(ctx.dtype), attn.to_out[0].weight, attn.to_out[0].bias)
            y = o.transpose(1, 2).reshape(b, c, h, w) + xt
            ctx.stats[out] = merge_moments(ctx.stats.get(out), moments(y))
            store.buffers[out].write(r, y)
            ctx.tick()

    def work(ctx, tile_px):
        total = math.prod(ctx.hw(xbuf))
        n = min(max(1, round(tile_px / xbuf.d)) ** 2, total)
        block = min(n, block_max)
        kb = min(total, max(block, ctx.hw(xbuf)[1]))
        return 4 * (n * c * 4 + kb * c * 4 + block * kb * 2)

    step = Custom(run, lambda ctx: len(ctx.tiles(xbuf)), allocs=((out, xbuf),), work=work, reads=(x, kv),
                  core_only=x)
    return step


# ================================================================================================ compiler
@dataclass
class Lazy:
    """A value during compilation: ``layers`` (local, not yet run) applied to the stored buffer ``name``.
    ``stats``: the key under which this value's own statistics are known (it is recomputed, never stored)."""
    name: str
    buf: Buf
    layers: list = field(default_factory=list)
    stats: str | None = None


class Compiler:
    """A network's description (``ops`` layers) -> a Program of sweeps.

    Local ops accumulate on the current value and run in the next sweep; a sweep is emitted where a global op
    needs its input stored (with statistics for a GroupNorm), where two stored values meet (a residual sum), or
    where the fused halo would exceed ``fuse_halo`` of the tile. Afterwards, statistics nobody reads are
    dropped, every buffer is freed after its last reader, and an output may take over an input's storage when
    that input is read only at the output's own pixels for the last time.
    """

    def __init__(self, src: str, src_buf: Buf, dst: str, dst_buf: Buf, tile_px: int, fuse_halo: float,
                 extra_inputs: dict | None = None):
        self.p = Program(src, src_buf, dst, dst_buf, extra_inputs=dict(extra_inputs or {}))
        self.tile_px, self.fuse_halo = tile_px, fuse_halo
        self.n = 0
        self.stats_read: set[str] = set()
        self.stats_done: set[str] = set()

    def name(self, tag: str) -> str:
        self.n += 1
        return f"{self.n}.{tag}"

    def compile(self, layers) -> Program:
        v = self.value(Chain(layers), Lazy(self.p.src, self.p.src_buf))
        self.sweep([v], dst=self.p.dst, buf=self.p.dst_buf)
        self._finish()
        return self.p

    # ---- values
    @staticmethod
    def out_buf(v: Lazy) -> Buf:
        chain = Chain(v.layers)
        return Buf(chain.channels(v.buf.channels), v.buf.d / chain.scale)

    def value(self, layer: Layer, v: Lazy) -> Lazy:
        if isinstance(layer, Chain):
            for sub in layer.layers:
                v = self.value(sub, v)
            return v
        if layer.local:
            return self.extend(v, layer)
        if isinstance(layer, ops.Residual):
            x = self.recomputed(v) if Chain(v.layers).scale > 1 else self.stored(v)
            main = self.value(layer.main, x)
            out = self.sweep([main, Lazy(x.name, x.buf, x.layers + list(layer.skip.layers))])
            return self.extend(out, layer.post) if layer.post is not None else out
        if isinstance(layer, ops.Norm):
            if v.stats is not None:
                self.stats_read.add(v.stats)
                return Lazy(v.name, v.buf, v.layers + [Affine(layer.norm, v.stats, layer.act)])
            x = self.with_stats(v)
            return Lazy(x.name, x.buf, [Affine(layer.norm, x.name, layer.act)])
        if isinstance(layer, ops.Attention):
            x = self.with_stats(v)
            kv = self.name("kv")
            self.p.steps.append(Sweep([(x.name, KV(layer.attn, x.name))], kv, Buf(2 * x.buf.channels, x.buf.d)))
            out = self.name("attn")
            self.p.steps.append(attention_step(layer.attn, x.name, kv, out, x.buf))
            self.stats_done.add(out)
            return Lazy(out, x.buf)
        if isinstance(layer, ops.LinearAttention):
            x = self.stored(v)
            la = ops.LinearAttention(layer.attn)
            la.key = self.name("vk")
            self.p.steps.append(Sweep([(x.name, Partial(la))], None, x.buf, reduce=lambda y, ctx: y,
                                      reduce_key=la.key))
            return Lazy(x.name, x.buf, [la])
        if isinstance(layer, ops.Blend):
            return self.blend(layer, v)
        raise TypeError(f"the streaming compiler does not know {type(layer).__name__}")

    def extend(self, v: Lazy, layer: Layer) -> Lazy:
        """Append a local op, cutting first when the fused halo would grow past the budget."""
        if v.layers and isinstance(v.layers[-1], Affine) and isinstance(layer, ops.Conv) and layer.pre is None:
            fused = ops.Conv(layer.m, layer.explicit_pad, pre=v.layers[-1].fn, inplace=True)
            return Lazy(v.name, v.buf, v.layers[:-1] + [fused])
        trial = Chain(v.layers + [layer])
        t = max(4, round(self.tile_px / (v.buf.d / trial.scale)))
        if v.layers and ops.halo(trial, t) > max(2, self.fuse_halo * t):
            v = self.stored(v)
        return Lazy(v.name, v.buf, v.layers + [layer])

    def stored(self, v: Lazy) -> Lazy:
        """The value as a stored buffer (a sweep, unless it already is one)."""
        if not v.layers:
            return v
        return self.sweep([v])

    def recomputed(self, v: Lazy) -> Lazy:
        """An upsampled value entering a residual block: instead of storing it (at the higher resolution), one
        sweep takes its statistics and both branches recompute it per tile from the smaller stored input."""
        key = self.name("stats")
        self.p.steps.append(Sweep([(v.name, Chain(v.layers))], None, self.out_buf(v), stats=key))
        self.stats_done.add(key)
        return Lazy(v.name, v.buf, list(v.layers), stats=key)

    def with_stats(self, v: Lazy) -> Lazy:
        x = self.stored(v)
        if x.name not in self.stats_done:  # the program's input: a sweep that only reduces
            self.p.steps.append(Sweep([(x.name, Chain([]))], None, x.buf, stats=x.name))
            self.stats_done.add(x.name)
        self.stats_read.add(x.name)
        return x

    def sweep(self, values: list[Lazy], dst: str | None = None, buf: Buf | None = None, combine=None,
              branches=None) -> Lazy:
        buf = buf or self.out_buf(values[0])
        dst = dst or self.name("x")
        branches = branches or [(v.name, Chain(v.layers)) for v in values]
        self.p.steps.append(Sweep(branches, dst, buf, stats=dst, combine=combine))
        self.stats_done.add(dst)
        return Lazy(dst, buf)

    def blend(self, layer: ops.Blend, v: Lazy) -> Lazy:
        from .errors import VAEError
        buf = self.out_buf(v)
        key = (buf.channels, round(buf.d))
        chains = layer.chains()
        if key not in chains:
            raise VAEError(f"the condition encoder has no feature with {key[0]} channels at 1/{key[1]} resolution "
                           "for this decoder: its decoder and condition encoder do not fit")
        mask = ops.Subsample(key[1]) if key[1] > 1 else Chain([])
        branches = [(v.name, Chain(v.layers)), ("masked", chains[key]), ("mask", mask)]
        return self.sweep([v], buf=buf, combine=_blend, branches=branches)

    # ---- clean-up passes
    def _finish(self):
        p = self.p
        keep = {p.src, p.dst, *p.extra_inputs}
        reads: dict[str, int] = {}
        for i, s in enumerate(p.steps):
            for name in (n for n, _ in s.branches) if isinstance(s, Sweep) else s.reads:
                reads[name] = i
        for s in p.steps:
            if isinstance(s, Sweep) and s.stats is not None and s.stats not in self.stats_read:
                s.stats = None
        probe = Region(5, 9, 5, 9)
        bufs = {p.src: p.src_buf, **p.extra_inputs}
        for i, s in enumerate(p.steps):
            if isinstance(s, Sweep) and s.dst is not None and s.dst != p.dst and s.combine is None:
                names = [n for n, _ in s.branches]
                for name, layer in s.branches:
                    if (name not in keep and reads.get(name) == i and names.count(name) == 1
                            and layer.need(probe) == probe and bufs.get(name) == s.out):
                        s.inplace = name
                        break
            elif isinstance(s, Custom) and s.core_only not in keep and reads.get(s.core_only) == i:
                s.inplace = s.core_only
            if isinstance(s, Sweep) and s.dst is not None:
                bufs[s.dst] = s.out
            if isinstance(s, Custom):
                bufs.update(dict(s.allocs))
        steps = []
        for i, s in enumerate(p.steps):
            steps.append(s)
            done = tuple(n for n, last in reads.items() if last == i and n not in keep)
            if done:
                steps.append(Free(done))
        p.steps = steps


def _blend(ys, r, ctx):
    x, feat, m = ys
    return x * m + feat * (1 - m)


def compile(layers, direction_bufs: tuple[Buf, Buf], tile_px: int = 512, fuse_halo: float = 0.2,
            extra_inputs: dict | None = None) -> Program:
    """A description -> Program from ``"in"`` (Buf of the input) to ``"out"``."""
    src_buf, dst_buf = direction_bufs
    return Compiler("in", src_buf, "out", dst_buf, tile_px, fuse_halo, extra_inputs).compile(layers)
