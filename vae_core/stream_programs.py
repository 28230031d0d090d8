"""Each family's network as a streaming program (see ``stream``): the same maths as its ``forward``, cut at
every place that needs whole-image information (GroupNorm statistics, attention), with halos derived from
the layers. A family plugs in with a ``build_<family>(model, direction, **kw) -> Program`` below.

Buffer names are unique per value (SSA style); a step that may overwrite its input says so (``inplace``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import VAEError
from .stream import (Buf, Chain, Conv, Custom, Free, Layer, PixelShuffle, PixelUnshuffle, Pointwise, Program,
                     Region, Residual, Subsample, Sweep, Up, crop, gn_act, identity, merge_moments, moments,
                     zero_outside)


class Builder:
    """Appends steps to a Program while tracking the current buffer (name, Buf)."""

    def __init__(self, src: str, src_buf: Buf, dst: str, dst_buf: Buf):
        self.p = Program(src, src_buf, dst, dst_buf)
        self.cur, self.buf = src, src_buf
        self.n = 0

    def name(self, tag: str) -> str:
        self.n += 1
        return f"{self.n}.{tag}"

    def sweep(self, layers, tag: str, channels: int, scale: float = 1.0, stats: bool = True, free_src: bool = True,
              dst: str | None = None, extra=(), combine=None, inplace: bool = False, stats_fn=None):
        """cur -> layers -> new buffer (``scale``: resolution factor of the layers, 2 for an upsample)."""
        out = Buf(channels, self.buf.d / scale)
        name = dst or self.name(tag)
        branches = [(self.cur, layers if isinstance(layers, Layer) else Chain(layers)), *extra]
        self.p.steps.append(Sweep(branches, name, out, stats=name if stats else None, combine=combine,
                                  inplace=self.cur if inplace and self.cur != self.p.src else None,
                                  stats_fn=stats_fn))
        if free_src and self.cur != self.p.src:
            self.p.steps.append(Free((self.cur,)))
        self.cur, self.buf = name, out
        return name

    def finish(self, layers):
        self.sweep(layers, "out", self.p.dst_buf.channels, scale=self.buf.d / self.p.dst_buf.d, stats=False,
                   dst=self.p.dst)
        return self.p

    # ---- shared KL blocks (blocks.py)
    def resnet(self, block):
        """ResnetBlock2D: h = conv1(silu(gn1(x))); out = conv2(silu(gn2(h))) + shortcut(x)."""
        x, xbuf = self.cur, self.buf
        cout = block.conv1.out_channels
        h = self.sweep([Conv(block.conv1, gn_act(block.norm1, x), inplace=True)], "h", cout, free_src=False)
        skip = Conv(block.conv_shortcut) if block.conv_shortcut is not None else identity()
        self.cur, self.buf = h, self.buf
        same = block.conv_shortcut is None
        out = self.name("res")
        self.p.steps.append(Sweep([(h, Conv(block.conv2, gn_act(block.norm2, h), inplace=True)), (x, skip)], out,
                                  Buf(cout, xbuf.d), stats=out, inplace=x if same else None))
        self.p.steps.append(Free((h, x)))
        self.cur, self.buf = out, Buf(cout, xbuf.d)

    def attention(self, attn):
        """blocks.Attention: softmax attention over every latent pixel, streamed (see ``attention_step``)."""
        x, xbuf = self.cur, self.buf
        c = xbuf.channels
        kv = self.name("kv")
        norm = attn.group_norm

        def kv_fn(t, ctx):
            tok = gn_act(norm, x, None)(t, ctx).flatten(2).transpose(1, 2)
            k, v = F.linear(tok, attn.to_k.weight, attn.to_k.bias), F.linear(tok, attn.to_v.weight, attn.to_v.bias)
            return torch.cat([k, v], -1).transpose(1, 2).reshape(t.shape[0], 2 * c, *t.shape[-2:])

        self.p.steps.append(Sweep([(x, Pointwise(kv_fn, lambda ch: 2 * ch))], kv, Buf(2 * c, xbuf.d)))
        out = self.name("attn")
        self.p.steps.append(attention_step(attn, x, kv, out, xbuf))
        self.p.steps.append(Free((kv, x)))
        self.cur, self.buf = out, xbuf

    def mid(self, mid):
        self.resnet(mid.resnets[0])
        if mid.attentions is not None:
            self.attention(mid.attentions[0])
        self.resnet(mid.resnets[1])


BLOCK = 4096  # tokens per query block and per key strip in streamed attention


def attention_step(attn, x: str, kv: str, out: str, xbuf: Buf) -> Custom:
    """Exact softmax attention over all tokens with one query tile and one key tile on the device at a time.

    For each query tile, keys/values stream tile by tile with a running max and normaliser (the log-sum-exp
    merge of flash attention), so the result equals full attention up to rounding. out = to_out(attn) + x.
    """
    c = xbuf.channels
    norm = attn.group_norm
    scale = 1.0 / math.sqrt(c)

    def run(ctx):
        store = ctx.store
        store.alias(out, x)  # each query tile reads x only at its own core, then overwrites it
        tiles = ctx.tiles(xbuf)
        h_all, w_all = ctx.hw(xbuf)
        # keys/values stream in full-width strips of about BLOCK tokens; queries go BLOCK at a time, so the
        # score matrix is at most BLOCK x BLOCK whatever the tile and latent size
        block = min(BLOCK, max(r.h * r.w for r in tiles))  # scales with the tile, at most BLOCK
        rows = max(1, min(h_all, block // w_all))
        key_blocks = [Region(y, min(y + rows, h_all), 0, w_all) for y in range(0, h_all, rows)]
        for r in tiles:
            ctx.check_stop()
            xt = store.buffers[x].read(r, ctx.device, ctx.dtype)
            b, _, h, w = xt.shape
            tok = gn_act(norm, x, None)(xt, ctx).flatten(2).transpose(1, 2)
            q_all = F.linear(tok, attn.to_q.weight, attn.to_q.bias).float() * scale
            del tok
            o = torch.empty_like(q_all)
            for q0 in range(0, q_all.shape[1], block):
                q = q_all[:, q0:q0 + block]
                m = torch.full(q.shape[:2] + (1,), -math.inf, device=q.device)
                l = torch.zeros_like(m)
                acc = torch.zeros_like(q)
                for rk in key_blocks:
                    kvt = store.buffers[kv].read(rk, ctx.device, ctx.dtype).flatten(2).transpose(1, 2).float()
                    k, v = kvt[..., :c], kvt[..., c:]
                    s = torch.bmm(q, k.transpose(1, 2))
                    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                    p = s.sub_(m_new).exp_()  # in place: one score block at a time
                    corr = torch.exp(m - m_new)
                    l = l * corr + p.sum(-1, keepdim=True)
                    acc = torch.baddbmm(acc * corr, p, v)
                    m = m_new
                    del s, p, kvt
                o[:, q0:q0 + block] = acc / l
            o = F.linear(o.to(ctx.dtype), attn.to_out[0].weight, attn.to_out[0].bias)
            y = o.transpose(1, 2).reshape(b, c, h, w) + xt
            ctx.stats[out] = merge_moments(ctx.stats.get(out), moments(y))
            store.buffers[out].write(r, y)
            ctx.tick()

    def work(ctx, tile_px, untiled=False):
        total = math.prod(ctx.hw(xbuf))
        if untiled:  # blocks.Attention: tokens, q, k, v, out, plus a BLOCK x all-keys score block (chunked_attention)
            return 4 * (total * c * 6 + min(total, BLOCK) * total)
        n = min(max(1, round(tile_px / xbuf.d)) ** 2, total)
        block = min(n, BLOCK)
        kb = min(total, max(block, ctx.hw(xbuf)[1]))
        return 4 * (n * c * 4 + kb * c * 4 + block * kb * 2)

    return Custom(run, lambda ctx: len(ctx.tiles(xbuf)), allocs=((out, xbuf),), work=work, inplace=x)


# ================================================================================================ KL / asym
def build_kl(model, direction: str, image=None, mask=None) -> Program:
    lat = model.latent_channels
    f = model.downscale
    if direction == "encode":
        enc = model.encoder
        b = Builder("x", Buf(enc.conv_in.in_channels, 1), "out", Buf(enc.conv_out.out_channels, f))
        b.sweep([Conv(enc.conv_in, inplace=True)], "conv_in", enc.conv_in.out_channels)
        for block in enc.down_blocks:
            for r in block.resnets:
                b.resnet(r)
            if block.downsamplers is not None:
                conv = block.downsamplers[0].conv
                b.sweep([Conv(conv, pad=(0, 1, 0, 1), inplace=True)], "down", conv.out_channels, scale=0.5)
        b.mid(enc.mid_block)
        final = [Conv(enc.conv_out, gn_act(enc.conv_norm_out, b.cur), inplace=True)]
        if getattr(model, "quant_conv", None) is not None:
            final.append(Conv(model.quant_conv))
        return b.finish(final)

    dec = model.decoder
    b = Builder("z", Buf(lat, f), "out", Buf(dec.conv_out.out_channels, 1))
    first = [Conv(model.post_quant_conv)] if getattr(model, "post_quant_conv", None) is not None else []
    b.sweep(first + [Conv(dec.conv_in, inplace=True)], "conv_in", dec.conv_in.out_channels)
    b.mid(dec.mid_block)
    blend = _asym_blend(b, dec) if image is not None and mask is not None else None
    if blend is not None:
        b.p.extra_inputs = {"masked": Buf(3, 1), "mask": Buf(1, 1)}
    for block in dec.up_blocks:
        if blend:
            blend()
        for r in block.resnets:
            b.resnet(r)
        if block.upsamplers is not None:
            conv = block.upsamplers[0].conv
            b.sweep([Up(2), Conv(conv, inplace=True)], "up", conv.out_channels, scale=2)
    if blend:
        blend()
    return b.finish([Conv(dec.conv_out, gn_act(dec.conv_norm_out, b.cur), inplace=True)])


def _asym_blend(b: Builder, dec):
    """asym.MaskConditionDecoder._blend as a sweep: x * m + feature * (1 - m), the feature recomputed per tile
    from the masked image by the (local) condition encoder, the mask subsampled (nearest) to x's size."""
    convs = list(dec.condition_encoder.layers)
    chains, d = {}, 1
    layers: list[Layer] = []
    for i, conv in enumerate(convs):
        if i:
            layers.append(Pointwise(lambda t, ctx: F.relu(t)))
        layers.append(Conv(conv))
        d *= conv.stride[0]
        chains[(conv.out_channels, d)] = Chain(list(layers))  # same shape twice: the later one wins (as dict)

    def combine(ys, r, ctx):
        x, feat, m = ys
        return x * m + feat * (1 - m)

    def blend():
        key = (b.buf.channels, round(b.buf.d))
        if key not in chains:
            raise VAEError(f"the condition encoder has no feature with {key[0]} channels at 1/{key[1]} resolution "
                           "for this decoder: its decoder and condition encoder do not fit")
        extra = [("masked", chains[key]), ("mask", Subsample(key[1]) if key[1] > 1 else identity())]
        b.sweep(identity(), "blend", b.buf.channels, extra=extra, combine=combine)

    return blend


# ================================================================================================ tiny (TAESD)
def _relu(t, ctx):
    return F.relu(t)


def _tiny_layer(m) -> Layer:
    from torch import nn
    if isinstance(m, nn.Conv2d):
        return Conv(m)
    if isinstance(m, nn.ReLU):
        return Pointwise(_relu)
    if isinstance(m, nn.Upsample):
        if m.mode != "nearest" or m.scale_factor != 2:
            raise VAEError(f"tiling a TAESD with {m.mode} x{m.scale_factor} upsampling is not supported; pass tile=False")
        return Up(2)
    if hasattr(m, "fuse"):  # AutoencoderTinyBlock: relu(conv(x) + skip(x))
        main = [_tiny_layer(c) for c in m.conv]
        skip = [Conv(m.skip)] if isinstance(m.skip, nn.Conv2d) else []
        return Residual(main, skip, post=_relu)
    raise VAEError(f"tiling does not know the TAESD layer {type(m).__name__}; pass tile=False")


def _scale_of(layers) -> float:
    s = 1.0
    for layer in layers:
        if isinstance(layer, Up):
            s *= layer.f
        elif isinstance(layer, Conv):
            s /= layer.s[0]
    return s


def build_tiny(model, direction: str, **kw) -> Program:
    """TAESD: conv/ReLU only, so local chains fuse into one sweep per resolution stage (halo = the stage's
    receptive field, ~10 px at that stage's resolution). taef2's pool branch ``x + 1x1(ReLU(GN(1x1(x))))`` needs
    GroupNorm statistics of ``1x1(x)`` over the whole map: the sweep writing x accumulates them (a 1x1 conv of
    the written tile), then the next sweep applies the branch with the exact statistics."""
    lat = model.latent_channels
    f = model.downscale
    if direction == "decode":
        net = model.decoder
        b = Builder("z", Buf(lat, f), "out", Buf(net.layers[-1].out_channels, 1))
        pending: list[Layer] = [Pointwise(lambda t, ctx: torch.tanh(t / 3.0) * 3.0)]
        cut_before = lambda m, first: type(m).__name__ == "Upsample"
        tail: list[Layer] = [Pointwise(lambda t, ctx: t * 2 - 1)]
    else:
        net = model.encoder
        b = Builder("x", Buf(3, 1), "out", Buf(lat, f))
        pending = [Pointwise(lambda t, ctx: (t + 1) / 2)]
        seen_stride = []

        def cut_before(m, first):  # before every stride-2 conv but the first
            if type(m).__name__ == "Conv2d" and m.stride[0] == 2:
                seen_stride.append(m)
                return len(seen_stride) > 1
            return False
        tail = []

    def flush(stats_fn=None):
        nonlocal pending
        c = Chain(pending).channels(b.buf.channels)
        b.sweep(pending, "stage", c, scale=_scale_of(pending), stats=stats_fn is not None, stats_fn=stats_fn)
        pending = []

    for i, m in enumerate(net.layers):
        pool = getattr(m, "pool", None)
        if pool is not None:
            p0, norm, p2 = pool[0], pool[1], pool[3]
            flush(stats_fn=lambda y, ctx, w=p0.weight: F.conv2d(y, w))
            key = b.cur
            pending += [Residual([Conv(p0), Pointwise(gn_act(norm, key, "relu")), Conv(p2)]), _tiny_layer(m)]
            continue
        if cut_before(m, i == 0) and pending:
            flush()
        pending.append(_tiny_layer(m))
    return b.finish(pending + tail)


# ================================================================================================ DC-AE
class UpConv(Layer):
    """dc.upsample_conv: conv3x3(nearest_x2(x)) computed at the low resolution (as the untiled DC-AE does)."""

    scale = 2.0

    def __init__(self, conv):
        self.conv = conv

    def size(self, hw):
        return hw[0] * 2, hw[1] * 2

    def need(self, r):
        return Region(r.y0 // 2 - 1, (r.y1 - 1) // 2 + 2, r.x0 // 2 - 1, (r.x1 - 1) // 2 + 2)

    def apply(self, x, have, r, hw_in, ctx):
        from .dc import upsample_conv
        n = self.need(r)
        x = zero_outside(crop(x, have, n), n, hw_in)
        # upsample_conv zero-pads by one: valid inside, and we keep only rows/cols whose inputs are all in n
        y = upsample_conv(x, self.conv.weight, self.conv.bias)
        return crop(y, Region(2 * n.y0, 2 * n.y1, 2 * n.x0, 2 * n.x1), r)

    def channels(self, c):
        return self.conv.out_channels


def _module_fn(m):
    return lambda t, ctx: m(t)


def _group_mean(group):
    return Pointwise(lambda t, ctx: t.unflatten(1, (-1, group)).mean(dim=2), lambda c: c // group)


def _repeat(n):
    return Pointwise(lambda t, ctx: t.repeat_interleave(n, dim=1), lambda c: c * n)


def _dc_layer(m) -> Layer:
    from . import dc
    if isinstance(m, dc.ResBlock):
        return Residual([Conv(m.conv1), Pointwise(lambda t, ctx, a=m.act: a(t)), Conv(m.conv2),
                         Pointwise(_module_fn(m.norm))])
    if isinstance(m, dc.DCDownBlock2d):
        main = [Conv(m.conv)] + ([PixelUnshuffle(2)] if m.pixel_unshuffle else [])
        skip = [PixelUnshuffle(2), _group_mean(m.group)] if m.shortcut else None
        return Residual(main, skip) if skip else Chain(main)
    if isinstance(m, dc.DCUpBlock2d):
        main = [UpConv(m.conv)] if m.interpolate else [Conv(m.conv), PixelShuffle(2)]
        skip = [_repeat(m.repeats), PixelShuffle(2)] if m.shortcut else None
        return Residual(main, skip) if skip else Chain(main)
    if isinstance(m, dc.GLUMBConv):
        def glu(t, ctx):
            h, gate = t.chunk(2, dim=1)
            return h * F.silu(gate)
        return Residual([Conv(m.conv_inverted), Pointwise(lambda t, ctx: F.silu(t)), Conv(m.conv_depth),
                         Pointwise(glu, lambda c: c // 2), Conv(m.conv_point), Pointwise(_module_fn(m.norm))])
    raise VAEError(f"tiling does not know the DC-AE layer {type(m).__name__}; pass tile=False")


class LinearAttention(Layer):
    """dc.MultiscaleLinearAttention with the global sums ``V K^T`` and ``sum K`` (per head) already reduced
    over the whole map (ctx.sums[key]); what is left is per pixel: out = ReLU(q) applied to those sums."""

    def __init__(self, attn, key: str | None):
        self.attn, self.key = attn, key
        self.halo = max((ms.proj_in.kernel_size[0] // 2 for ms in attn.to_qkv_multiscale), default=0)

    def need(self, r):
        h = self.halo
        return Region(r.y0 - h, r.y1 + h, r.x0 - h, r.x1 + h)

    def sources(self, x, have, r, hw_in):
        """[qkv, multiscale(qkv)...] over r, each (B, heads, 3d, n), float32."""
        from .dc import pointwise
        a = self.attn
        n = self.need(r)
        x = crop(x, have, n)
        qkv = pointwise(x, torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]))
        out = [crop(qkv, n, r)]
        if a.to_qkv_multiscale:
            qz = zero_outside(qkv, n, hw_in)
            for ms in a.to_qkv_multiscale:
                k = ms.proj_in.kernel_size[0] // 2
                inner = Region(n.y0 + self.halo - k, n.y1 - self.halo + k, n.x0 + self.halo - k, n.x1 - self.halo + k)
                t = crop(qz, n, inner)
                t = F.conv2d(t, ms.proj_in.weight, None, 1, 0, 1, ms.proj_in.groups)
                out.append(F.conv2d(t, ms.proj_out.weight, None, 1, 0, 1, ms.proj_out.groups))
        b = x.shape[0]
        d = a.head_dim
        return [t.reshape(b, -1, 3 * d, r.h * r.w).float() for t in out]

    def partial(self, x, have, r, hw_in) -> torch.Tensor:
        """This tile's share of the sums: (B, sources, heads, d+1, d) float64: rows 0..d-1 V K^T, row d sum K."""
        d = self.attn.head_dim
        parts = []
        for g in self.sources(x, have, r, hw_in):
            k = g[:, :, d:2 * d].relu()
            v = g[:, :, 2 * d:]
            kt = k.transpose(-1, -2)
            parts.append(torch.cat([torch.matmul(v, kt), kt.sum(-2, keepdim=True)], dim=2))
        return torch.stack(parts, 1).double()

    def apply(self, x, have, r, hw_in, ctx):
        a = self.attn
        d = a.head_dim
        vk = ctx.sums[self.key].float()
        outs = []
        for i, g in enumerate(self.sources(x, have, r, hw_in)):
            q = g[:, :, :d].relu()
            num_den = torch.matmul(vk[:, i], q)
            outs.append(num_den[:, :, :d] / (num_den[:, :, d:] + a.eps))
        b = x.shape[0]
        o = torch.cat([t.reshape(b, -1, r.h * r.w) for t in outs], 1).to(x.dtype).view(b, -1, r.h, r.w)
        from .dc import pointwise
        y = a.norm_out(pointwise(o, a.to_out.weight))
        return y + crop(x, have, r)

    def channels(self, c):
        return c


class _Partial(Layer):
    """Adapter: a sweep whose 'output' is the attention's per-tile partial sums (reduced, never stored)."""

    def __init__(self, la: LinearAttention):
        self.la = la

    def need(self, r):
        return self.la.need(r)

    def apply(self, x, have, r, hw_in, ctx):
        return self.la.partial(x, have, r, hw_in)


class DCBuilder(Builder):
    """Fuses local layers into one sweep while the halo stays small relative to the tile (<= ~6% per side)."""

    def __init__(self, *a, tile_px: int = 512):
        super().__init__(*a)
        self.pending: list[Layer] = []
        self.tile_px = tile_px

    def local(self, layer: Layer):
        trial = Chain(self.pending + [layer])
        t = max(4, round(self.tile_px / (self.buf.d / trial.scale)))
        r = Region(0, t, 0, t)
        halo = max(r.y0 - trial.need(r).y0 * trial.scale, 0)
        if self.pending and halo > max(2, 0.06 * t):
            self.flush()
        self.pending.append(layer)

    def flush(self):
        if self.pending:
            chain = Chain(self.pending)
            self.sweep(chain, "dc", chain.channels(self.buf.channels), scale=chain.scale, stats=False)
            self.pending = []

    def vit(self, block):
        from .dc import MultiscaleLinearAttention
        attn: MultiscaleLinearAttention = block.attn
        self.flush()
        key = self.name("vk")
        la = LinearAttention(attn, key)
        self.p.steps.append(Sweep([(self.cur, _Partial(la))], None, self.buf, reduce=lambda y, ctx: y,
                                  reduce_key=key))
        self.pending = [la, _dc_layer(block.conv_out)]


def build_dc(model, direction: str, tile_px: int = 512, **kw) -> Program:
    from . import dc
    f = model.downscale
    lat = model.latent_channels
    if direction == "encode":
        enc = model.encoder
        b = DCBuilder("x", Buf(3, 1), "out", Buf(lat, f), tile_px=tile_px)
        b.local(Conv(enc.conv_in) if isinstance(enc.conv_in, torch.nn.Conv2d) else _dc_layer(enc.conv_in))
        for stage in enc.down_blocks:
            for m in stage:
                b.vit(m) if isinstance(m, dc.EfficientViTBlock) else b.local(_dc_layer(m))
        final = Residual([Conv(enc.conv_out)], [_group_mean(enc.out_group)]) if enc.out_group else Conv(enc.conv_out)
        b.local(final)
    else:
        dec = model.decoder
        b = DCBuilder("z", Buf(lat, f), "out", Buf(3, 1), tile_px=tile_px)
        b.local(Residual([Conv(dec.conv_in)], [_repeat(dec.in_repeats)]) if dec.in_repeats else Conv(dec.conv_in))
        for stage in reversed(dec.up_blocks):
            for m in stage:
                b.vit(m) if isinstance(m, dc.EfficientViTBlock) else b.local(_dc_layer(m))
        pre = Pointwise(lambda t, ctx: dec.conv_act(dec.norm_out(t.clone())))
        b.local(pre)
        b.local(Conv(dec.conv_out) if isinstance(dec.conv_out, torch.nn.Conv2d) else _dc_layer(dec.conv_out))
    pending, b.pending = b.pending, []
    return b.finish(Chain(pending))


BUILDERS = {"kl": build_kl, "asym": build_kl, "tiny": build_tiny, "dc": build_dc}


def build(model, family: str, direction: str, **kw) -> Program:
    fn = BUILDERS.get(family)
    if fn is None:
        raise VAEError(f"tiled {direction} is not available for the {family!r} family yet; pass tile=False")
    return fn(model, direction, **kw)
