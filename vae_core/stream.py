"""Layer-wise streaming: run a VAE over an image in tiles, exactly, with a working set bounded by the tile.

Why not "run the model per tile and blend": every GroupNorm normalises with statistics of the *whole* feature
map, the KL mid block attends over the whole latent and DC-AE's linear attention sums over it. A tile that sees
only itself gets other statistics (colour and contrast shifts, seams) whatever the overlap. Recomputing every
tile up to each GroupNorm would be exact but costs about (number of GN layers / 2) decodes.

What we do instead. A family describes its network as a *program*: a list of steps over named feature maps
("buffers") that live in a *store* (host RAM, or a temp file on disk), not on the compute device.

- ``Sweep``: for every output tile, read the input buffer(s) over the region the step's layers need (a halo
  of 1 px per 3x3 conv, derived from the layers, never guessed), run the layers on the device, write the tile's
  core into the output buffer, and fold the tile into *reductions* of the output (exact per-channel
  count/mean/M2, merged with Chan's formula in float64): these are the next GroupNorm's statistics, known
  exactly before any tile passes that GroupNorm.
- A GroupNorm with known statistics is a per-channel affine map, i.e. pointwise: it becomes the first op of
  the next sweep. Between two GroupNorms the layers are local (convs, up/downsampling, activations), so a
  sweep is exact tile by tile; halos are per sweep, a few pixels, so the extra compute is small.
- Global steps (attention) use the same reductions: softmax attention streams query tiles against key/value
  tiles with a running log-sum-exp; linear attention sums ``v k^T`` over tiles, then applies it per tile.
- Purely local chains (TAESD) are fused into one sweep whose halo covers the chain's receptive field: that
  needs no stored activations between the layers.

The compute device therefore only ever holds one tile's activations (peak ~ tile, not image), and every
result equals the untiled one up to float rounding (different summation order). The full-resolution
activations between sweeps are what the untiled run also holds; they go to the store, which on CUDA is host
RAM and on CPU a temp file once they exceed the RAM budget (see ``tiling``), so they do not count against the
device. The cost is the I/O of writing and re-reading those buffers once per sweep.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import VAEInterrupted


# ================================================================================================ regions
@dataclass(frozen=True)
class Region:
    """A half-open rectangle [y0, y1) x [x0, x1) in one buffer's pixel grid (may extend past its edges)."""
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def h(self) -> int:
        return self.y1 - self.y0

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    def union(self, o: "Region") -> "Region":
        return Region(min(self.y0, o.y0), max(self.y1, o.y1), min(self.x0, o.x0), max(self.x1, o.x1))

    def clip(self, hw: tuple[int, int]) -> "Region":
        return Region(max(self.y0, 0), min(self.y1, hw[0]), max(self.x0, 0), min(self.x1, hw[1]))

    def inside(self, o: "Region") -> bool:
        return o.y0 <= self.y0 and self.y1 <= o.y1 and o.x0 <= self.x0 and self.x1 <= o.x1


def crop(x: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    assert want.inside(have), (want, have)
    return x[..., want.y0 - have.y0: want.y1 - have.y0, want.x0 - have.x0: want.x1 - have.x0]


def zero_outside(x: torch.Tensor, r: Region, hw: tuple[int, int], inplace: bool = False) -> torch.Tensor:
    """x over region r, with everything outside the buffer [0,h) x [0,w) set to zero (a conv's zero padding)."""
    v = r.clip(hw)
    if v == r:
        return x
    if v.h <= 0 or v.w <= 0:
        return x.zero_() if inplace else torch.zeros_like(x)
    if inplace:
        x[..., : v.y0 - r.y0, :] = 0
        x[..., v.y1 - r.y0:, :] = 0
        x[..., :, : v.x0 - r.x0] = 0
        x[..., :, v.x1 - r.x0:] = 0
        return x
    inner = crop(x, r, v)
    return F.pad(inner, (v.x0 - r.x0, r.x1 - v.x1, v.y0 - r.y0, r.y1 - v.y1))


def split(n: int, t: int) -> list[tuple[int, int]]:
    """[0, n) into ceil(n/t) nearly equal spans (no sliver tiles)."""
    k = max(1, -(-n // max(1, t)))
    cuts = [round(i * n / k) for i in range(k + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(k)]


def grid(hw: tuple[int, int], tile: int) -> list[Region]:
    return [Region(y0, y1, x0, x1) for y0, y1 in split(hw[0], tile) for x0, x1 in split(hw[1], tile)]


# ================================================================================================ layers
class Layer:
    """A local op: ``need`` maps an output region to the input region it reads; ``apply`` computes it.
    ``scale``: output resolution / input resolution."""

    scale = 1.0

    def size(self, hw: tuple[int, int]) -> tuple[int, int]:
        return hw

    def need(self, r: Region) -> Region:
        return r

    def apply(self, x: torch.Tensor, have: Region, r: Region, hw_in: tuple[int, int], ctx: "Runner") -> torch.Tensor:
        raise NotImplementedError

    def channels(self, c: int) -> int:  # output channels for c input channels (memory estimates)
        return c


class Conv(Layer):
    """A conv (any kernel/stride/groups) with its zero padding done explicitly at the buffer edges.

    ``pre`` is a pointwise function applied to the conv's input first (GroupNorm-with-known-stats + activation):
    the zero padding belongs *after* it, as in the untiled network.
    """

    def __init__(self, conv: torch.nn.Conv2d, pre: Callable | None = None, pad: tuple[int, int, int, int] | None = None,
                 inplace: bool = False):
        # inplace: the input tensor is this layer's alone (a fresh read, or a previous layer's output), so the
        # pointwise ``pre`` and the zero padding may overwrite it: one tile-sized tensor less at the peak
        self.inplace = inplace
        self.weight, self.bias = conv.weight, conv.bias
        self.groups = conv.groups
        self.k = tuple(conv.kernel_size)
        self.s = tuple(conv.stride)
        assert tuple(conv.dilation) == (1, 1)
        p = conv.padding if pad is None else None
        # (top, bottom, left, right)
        self.pad = (p[0], p[0], p[1], p[1]) if pad is None else pad
        self.pre = pre
        self.scale = 1.0 / self.s[0]

    def size(self, hw):
        t, b, l, r = self.pad
        return ((hw[0] + t + b - self.k[0]) // self.s[0] + 1, (hw[1] + l + r - self.k[1]) // self.s[1] + 1)

    def need(self, r):
        t, _, l, _ = self.pad
        return Region(r.y0 * self.s[0] - t, (r.y1 - 1) * self.s[0] - t + self.k[0],
                      r.x0 * self.s[1] - l, (r.x1 - 1) * self.s[1] - l + self.k[1])

    def apply(self, x, have, r, hw_in, ctx):
        n = self.need(r)
        x = crop(x, have, n)
        if self.pre is not None:
            x = self.pre(x, ctx, self.inplace)
        x = zero_outside(x, n, hw_in, inplace=self.inplace or self.pre is not None)
        return F.conv2d(x, self.weight, self.bias, self.s, 0, 1, self.groups)

    def channels(self, c):
        return self.weight.shape[0]


class Up(Layer):
    """Nearest-neighbour upsampling by an integer factor."""

    def __init__(self, factor: int = 2):
        self.f = factor
        self.scale = float(factor)

    def size(self, hw):
        return hw[0] * self.f, hw[1] * self.f

    def need(self, r):
        f = self.f
        return Region(r.y0 // f, (r.y1 - 1) // f + 1, r.x0 // f, (r.x1 - 1) // f + 1)

    def apply(self, x, have, r, hw_in, ctx):
        n = self.need(r)
        x = F.interpolate(crop(x, have, n), scale_factor=float(self.f), mode="nearest")
        return crop(x, Region(n.y0 * self.f, n.y1 * self.f, n.x0 * self.f, n.x1 * self.f), r)


class Subsample(Layer):
    """Nearest-neighbour downsampling by an integer factor (``F.interpolate(size=hw/f, mode='nearest')``)."""

    def __init__(self, factor: int):
        self.f = factor
        self.scale = 1.0 / factor

    def size(self, hw):
        return hw[0] // self.f, hw[1] // self.f

    def need(self, r):
        f = self.f
        return Region(r.y0 * f, (r.y1 - 1) * f + 1, r.x0 * f, (r.x1 - 1) * f + 1)

    def apply(self, x, have, r, hw_in, ctx):
        return crop(x, have, self.need(r))[..., :: self.f, :: self.f]


class PixelShuffle(Layer):
    """F.pixel_shuffle(x, f): channels to space."""

    def __init__(self, factor: int = 2):
        self.f = factor
        self.scale = float(factor)

    def size(self, hw):
        return hw[0] * self.f, hw[1] * self.f

    def need(self, r):
        return Up(self.f).need(r)

    def apply(self, x, have, r, hw_in, ctx):
        n = self.need(r)
        y = F.pixel_shuffle(crop(x, have, n), self.f)
        return crop(y, Region(n.y0 * self.f, n.y1 * self.f, n.x0 * self.f, n.x1 * self.f), r)

    def channels(self, c):
        return c // (self.f * self.f)


class PixelUnshuffle(Layer):
    """F.pixel_unshuffle(x, f): space to channels (the buffer's size must be a multiple of f)."""

    def __init__(self, factor: int = 2):
        self.f = factor
        self.scale = 1.0 / factor

    def size(self, hw):
        return hw[0] // self.f, hw[1] // self.f

    def need(self, r):
        f = self.f
        return Region(r.y0 * f, r.y1 * f, r.x0 * f, r.x1 * f)

    def apply(self, x, have, r, hw_in, ctx):
        return F.pixel_unshuffle(crop(x, have, self.need(r)), self.f)

    def channels(self, c):
        return c * self.f * self.f


class Pointwise(Layer):
    """Any per-pixel function ``fn(x, ctx)`` (activations, GroupNorm with known stats, 1x1 linears)."""

    def __init__(self, fn: Callable, out_channels: Callable[[int], int] | None = None):
        self.fn = fn
        self._ch = out_channels

    def apply(self, x, have, r, hw_in, ctx):
        return self.fn(crop(x, have, r), ctx)

    def channels(self, c):
        return self._ch(c) if self._ch else c


class Chain(Layer):
    """Layers one after another (a fused local segment)."""

    def __init__(self, layers: Sequence[Layer]):
        self.layers = list(layers)
        self.scale = math.prod(layer.scale for layer in self.layers)

    def size(self, hw):
        for layer in self.layers:
            hw = layer.size(hw)
        return hw

    def need(self, r):
        for layer in reversed(self.layers):
            r = layer.need(r)
        return r

    def apply(self, x, have, r, hw_in, ctx):
        regions = [r]
        for layer in reversed(self.layers):
            regions.append(layer.need(regions[-1]))
        regions.reverse()  # regions[i] = input region of layer i; regions[-1] = r
        hw = hw_in
        for i, layer in enumerate(self.layers):
            x = layer.apply(x, have, regions[i + 1], hw, ctx)
            have, hw = regions[i + 1], layer.size(hw)
        return x if have == r else crop(x, have, r)

    def channels(self, c):
        for layer in self.layers:
            c = layer.channels(c)
        return c


class Residual(Layer):
    """``post(main(x) + skip(x))`` for two local branches from the same input (TAESD's Block)."""

    def __init__(self, main: Sequence[Layer], skip: Sequence[Layer] = (), post: Callable | None = None):
        self.main, self.skip, self.post = Chain(main), Chain(skip), post
        self.scale = self.main.scale

    def size(self, hw):
        return self.main.size(hw)

    def need(self, r):
        return self.main.need(r).union(self.skip.need(r))

    def apply(self, x, have, r, hw_in, ctx):
        y = self.main.apply(x, have, r, hw_in, ctx)
        y = y + self.skip.apply(x, have, r, hw_in, ctx)
        return self.post(y, ctx) if self.post is not None else y

    def channels(self, c):
        return self.main.channels(c)


# ================================================================================================ stats
def moments(x: torch.Tensor) -> torch.Tensor:
    """Per (batch, channel) [count, mean, M2] of a tile, float64, for exact merging (Chan et al.)."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    b, c, h, w = xf.shape
    n = float(h * w)
    if not xf.is_contiguous() and xf.is_contiguous(memory_format=torch.channels_last):
        # channels-last tiles (the disk store's layout): var_mean is slow on this layout; two passes over the
        # (B, HW, C) view are fast and just as exact (centred sum of squares)
        flat = xf.permute(0, 2, 3, 1).reshape(b, h * w, c)
        mean = flat.mean(1)
        var = (flat - mean[:, None]).square_().sum(1) / n
    else:
        var, mean = torch.var_mean(xf, dim=(2, 3), correction=0)
    return torch.stack([torch.full_like(mean, n, dtype=torch.float64), mean.double(), var.double() * n])


def merge_moments(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """Chan's parallel merge of [count, mean, M2] along dim 0 (elementwise over the trailing dims)."""
    if a is None:
        return b
    na, ma, qa = a
    nb, mb, qb = b
    n = na + nb
    d = mb - ma
    return torch.stack([n, ma + d * nb / n, qa + qb + d * d * na * nb / n])


def group_affine(norm: torch.nn.GroupNorm, mom: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm with the statistics ``mom`` ([3, B, C] per channel) as a per-(B, C) scale and shift."""
    n, mean, m2 = mom
    b, c = mean.shape
    g = norm.num_groups
    n, mean, m2 = (t.reshape(b, g, c // g) for t in (n, mean, m2))
    gn = n.sum(-1)
    gmean = (n * mean).sum(-1) / gn
    gm2 = (m2 + n * (mean - gmean[..., None]) ** 2).sum(-1)
    rstd = torch.rsqrt(gm2 / gn + norm.eps)  # (B, G)
    scale = rstd.repeat_interleave(c // g, dim=1)
    shift = -gmean.repeat_interleave(c // g, dim=1) * scale
    if norm.affine:
        w, bias = norm.weight.double(), norm.bias.double()
        scale, shift = scale * w, shift * w + bias
    return scale.to(dtype)[..., None, None], shift.to(dtype)[..., None, None]


def gn_act(norm: torch.nn.GroupNorm, key: str, act: str | None = "silu") -> Callable:
    """Pointwise fn: GroupNorm ``norm`` with the exact statistics of buffer ``key``, then an activation."""

    def fn(x, ctx, inplace=False):
        scale, shift = ctx.affine(norm, key, x.dtype, x.device)
        y = x.mul_(scale).add_(shift) if inplace else torch.addcmul(shift, x, scale)
        if act == "silu":
            y = F.silu(y, inplace=True)
        elif act == "relu":
            y = F.relu(y, inplace=True)
        return y

    return fn


# ================================================================================================ stores
class RamBuffer:
    def __init__(self, shape, dtype, device, pin=False, data: torch.Tensor | None = None):
        if data is None:
            data = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin and device == "cpu")
        self.data = data
        self.shape = tuple(data.shape)

    def read(self, r: Region, device, dtype) -> torch.Tensor:
        hw = self.shape[-2:]
        v = r.clip(hw)
        if v.h <= 0 or v.w <= 0:
            return torch.zeros(self.shape[:2] + (r.h, r.w), device=device, dtype=dtype)
        part = self.data[..., v.y0:v.y1, v.x0:v.x1]
        if v == r:
            return part.to(device=device, dtype=dtype, non_blocking=True, copy=True)
        out = torch.zeros(self.shape[:2] + (r.h, r.w), device=device, dtype=dtype)
        out[..., v.y0 - r.y0: v.y1 - r.y0, v.x0 - r.x0: v.x1 - r.x0].copy_(part)
        return out

    def write(self, r: Region, t: torch.Tensor) -> None:
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
        self.bytes_now = 0
        self.bytes_peak = 0

    def _size(self, shape) -> int:
        return math.prod(shape) * torch.empty((), dtype=self.dtype).element_size()

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
        buf.counted = self._size(shape)
        self.bytes_now += buf.counted
        self.bytes_peak = max(self.bytes_peak, self.bytes_now)
        self.buffers[name] = buf

    def alias(self, new: str, old: str) -> None:
        self.buffers[new] = self.buffers[old]

    def free(self, name: str) -> None:
        buf = self.buffers.pop(name, None)
        if buf is not None and all(b is not buf for b in self.buffers.values()):
            self.bytes_now -= getattr(buf, "counted", 0)
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
    stats_fn: Callable | None = None  # stats of stats_fn(y, ctx) (a pointwise map of the output) instead of y


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
    inplace: str | None = None  # the input buffer whose storage the output takes over


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
        self.work_peak = 0

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
                ys = s.stats_fn(y, self) if s.stats_fn is not None else y
                self.stats[s.stats] = merge_moments(self.stats.get(s.stats), moments(ys))
                del ys
            if s.reduce is not None:
                part = s.reduce(y, self)
                self.sums[s.reduce_key] = part if s.reduce_key not in self.sums else self.sums[s.reduce_key] + part
            if s.dst is not None:
                self.store.buffers[s.dst].write(r, y)
            del y
            self.tick()


def identity() -> Layer:
    return Chain([])
