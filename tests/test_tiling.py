"""Tiled encode/decode equals untiled (exact streaming, vae_core.stream) for every family; progress, cancel,
auto mode and the memory estimate. Small configs, sizes of several tiles that are not multiples of the tile."""
from __future__ import annotations

import math

import pytest
import torch

from vae_core import VAEInterrupted, tiling
from vae_core.errors import VAEError
from vae_core.vae import VAE

TOL = 1e-3


def _randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".weight") and ("norm" in name):
            p.data = 1 + 0.2 * torch.randn(p.shape, generator=g)
        else:
            p.data = std * torch.randn(p.shape, generator=g)
    return model


def _kl_vae(**over):
    from vae_core import kl
    cfg = {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4}
    cfg.update(over)
    return VAE(_randomize(kl.build(cfg)), "kl", "test", cfg)


def _asym_vae():
    from vae_core import asym
    cfg = {"down_block_out_channels": [16, 32, 32], "layers_per_down_block": 1, "up_block_out_channels": [24, 48, 48],
           "layers_per_up_block": 1, "norm_num_groups": 8, "latent_channels": 4}
    return VAE(_randomize(asym.build(cfg), seed=1), "asym", "test", cfg)


def _close(a, b):
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"tiled vs untiled max abs diff {diff:.3g} > {TOL}"
    return diff


class Counter:
    def __init__(self):
        self.calls = []

    def __call__(self, done, total):
        self.calls.append((done, total))


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_kl_decode_tiled_equals_untiled(store):
    vae = _kl_vae()
    z = torch.randn(2, 4, 15, 19, generator=torch.Generator().manual_seed(3))  # 60x76 px, tiles of 40 px
    ref = vae.decode(z, tile=False)
    prog = Counter()
    out = vae.decode(z, tile=tiling.Tiling(40, 8, store=store), progress=prog)
    _close(out, ref)
    # it really tiled: many tiles per sweep, progress once per tile, ending at (total, total)
    total = prog.calls[-1][1]
    assert prog.calls == [(i + 1, total) for i in range(total)]
    assert total > 40


def test_kl_encode_tiled_equals_untiled():
    vae = _kl_vae(use_quant_conv=False, use_post_quant_conv=False, latent_channels=16, norm_num_groups=4)
    x = torch.rand(1, 3, 68, 84, generator=torch.Generator().manual_seed(4)) * 2 - 1
    _close(vae.encode(x, tile={"tile_size": 40, "overlap": 0}), vae.encode(x, tile=False))


def test_kl_without_attention():
    vae = _kl_vae(mid_block_add_attention=False)
    z = torch.randn(1, 4, 17, 11)
    _close(vae.decode(z, tile=tiling.Tiling(32)), vae.decode(z, tile=False))


def test_asym_decode_with_condition_tiled_equals_untiled():
    vae = _asym_vae()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 13, 17, generator=g)
    image = torch.rand(1, 3, 50, 66, generator=g) * 2 - 1  # not a multiple of 8: padded and cropped
    mask = (torch.rand(1, 1, 50, 66, generator=g) > 0.5).float()
    ref = vae.decode(z, image=image, mask=mask, tile=False)
    _close(vae.decode(z, image=image, mask=mask, tile={"tile_size": 40, "overlap": 16}), ref)
    _close(vae.decode(z, tile=tiling.Tiling(40)), vae.decode(z, tile=False))
    x = torch.rand(1, 3, 60, 44, generator=g) * 2 - 1
    _close(vae.encode(x, tile=tiling.Tiling(32)), vae.encode(x, tile=False))


def test_should_stop_interrupts_between_tiles():
    vae = _kl_vae()
    z = torch.randn(1, 4, 16, 16)
    seen = Counter()
    with pytest.raises(VAEInterrupted):
        vae.decode(z, tile=tiling.Tiling(32), progress=seen, should_stop=lambda: len(seen.calls) >= 3)
    assert len(seen.calls) == 3


def test_auto_mode_untiled_when_small_tiled_when_over_budget(monkeypatch):
    vae = _kl_vae()
    assert tiling.resolve(vae, "decode", (1, 4, 16, 16), None, torch.float32) is None
    assert tiling.resolve(vae, "decode", (1, 4, 16, 16), False, torch.float32) is None
    # a single tile covers the image: nothing to tile even when asked
    assert tiling.resolve(vae, "decode", (1, 4, 16, 16), True, torch.float32) is None
    monkeypatch.setattr(tiling, "_free_bytes", lambda device: 4 << 20)  # 4 MiB free: must tile
    plan = tiling.resolve(vae, "decode", (1, 4, 40, 36), None, torch.float32)
    assert plan is not None and plan.tiling.tile_size <= 512
    z = torch.randn(1, 4, 40, 36)
    prog = Counter()
    _close(vae.decode(z, progress=prog), vae.decode(z, tile=False))
    assert prog.calls[-1][1] > 1  # auto mode did tile


def test_memory_estimate_grows_with_tile_not_image():
    vae = _kl_vae()
    est = lambda hw, t: tiling.estimate_memory(vae, "decode", hw, t, torch.float32)
    t = tiling.Tiling(128)
    small, big = est((1024, 1024), t), est((4096, 4096), t)
    assert small == big  # bounded by the tile: the same for a 16x larger image
    assert est((4096, 4096), tiling.Tiling(512)) > 3 * big  # grows with the tile area (16x here)
    untiled_1k, untiled_4k = est((1024, 1024), None), est((4096, 4096), None)
    assert untiled_4k > 10 * untiled_1k and untiled_1k > 3 * small
    info = tiling.estimate(vae, "decode", (1024, 1024), t)
    assert info["store_bytes"] > 0 and info["tiles"] > 16


def test_tile_option_validation():
    with pytest.raises(VAEError, match="tile_size"):
        tiling.Tiling(8)
    with pytest.raises(VAEError, match="unknown keys"):
        tiling.as_tiling({"tile": 3})
    with pytest.raises(VAEError, match="store"):
        tiling.Tiling(512, 64, "cloud")
    assert tiling.as_tiling({"tile_size": 256, "overlap": 32}) == tiling.Tiling(256, 32)


def test_plan_grid_covers_image():
    plan = tiling.plan_grid(width=1000, height=700, tile_size=512, overlap=64, family="kl")
    assert plan["tiled"] and plan["rows"] == 2 and plan["cols"] == 2
    covered = torch.zeros(700, 1000, dtype=torch.int32)
    for x0, y0, x1, y1 in plan["tiles"]:
        covered[y0:y1, x0:x1] += 1
    assert bool((covered == 1).all())
    m = plan["memory"]
    assert m["untiled_bytes"] > m["per_tile_bytes"] > 0  # 4 tiles of 512 px: each holds about half the untiled peak
    assert not tiling.plan_grid(width=300, height=200, tile_size=512)["tiled"]


# ------------------------------------------------------------------------------------------------ tiny (TAESD)
def _tiny_vae(variant, seed=2, **over):
    from vae_core import tiny
    cfg = {**tiny.VARIANTS[variant], **over}
    return VAE(_randomize(tiny.build(cfg), seed=seed, std=0.05), "tiny", variant, cfg)


@pytest.mark.parametrize("variant", ["taesd", "taef2"])
def test_tiny_tiled_equals_untiled(variant):
    vae = _tiny_vae(variant)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(1, vae.latent_channels, 13, 11, generator=g)
    prog = Counter()
    _close(vae.decode(z, tile=tiling.Tiling(32), progress=prog), vae.decode(z, tile=False))
    assert prog.calls[-1][1] >= 4 * 4
    x = torch.rand(1, 3, 72, 56, generator=g) * 2 - 1
    _close(vae.encode(x, tile=tiling.Tiling(32)), vae.encode(x, tile=False))


def test_taesana_encoder_tiled_equals_untiled():
    vae = _tiny_vae("taesana", has_decoder=False)
    x = torch.rand(1, 3, 160, 96, generator=torch.Generator().manual_seed(7)) * 2 - 1
    _close(vae.encode(x, tile=tiling.Tiling(64)), vae.encode(x, tile=False))


def _psnr(a, b):
    a, b = ((t.clamp(-1, 1) + 1) / 2 for t in (a, b))
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@pytest.mark.slow
def test_taef2_real_weights_photo_tiled_psnr(taesd_dir, photo):
    from vae_core import load_vae
    vae = load_vae((taesd_dir / "taef2_encoder.pth", taesd_dir / "taef2_decoder.pth"))
    t = tiling.Tiling(192, 0)  # 3x3 tiles on the 512 px photo, edges not on multiples of the tile
    z = vae.encode(photo, tile=False)
    z_tiled = vae.encode(photo, tile=t)
    assert (z_tiled - z).abs().max().item() <= TOL
    ref = vae.decode(z, tile=False)
    out = vae.decode(z, tile=t)
    psnr = _psnr(out, ref)
    print(f"TAEF2 photo tiled vs untiled decode: PSNR {psnr:.2f} dB, max abs diff {(out - ref).abs().max().item():.3g}")
    assert psnr >= 60
    assert _psnr(ref, photo) > 30  # and the untiled reference is a real reconstruction of the photo


# ------------------------------------------------------------------------------------------------ DC-AE
def _dc_vae(kind):
    from vae_core import dc
    R, V = "ResBlock", "EfficientViTBlock"
    ch = [16, 32, 64, 64]
    cfg = {"latent_channels": 8, "attention_head_dim": 8, "encoder_block_types": [R, R, V, V],
           "decoder_block_types": [R, R, V, V], "encoder_block_out_channels": ch, "decoder_block_out_channels": ch,
           "scaling_factor": 0.4}
    if kind == "sana":  # conv down / interpolate up, multiscale (5x5) attention, RMSNorm
        cfg.update(encoder_layers_per_block=[1, 1, 1, 1], decoder_layers_per_block=[1, 2, 1, 1],
                   encoder_qkv_multiscales=[[], [], [5], [5]], decoder_qkv_multiscales=[[], [], [5], [5]],
                   downsample_block_type="Conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
                   decoder_act_fns="silu")
    else:  # in/mix: pixel (un)shuffle, no stem stage, BatchNorm + ReLU in the high-resolution decoder stages
        cfg.update(encoder_layers_per_block=[0, 2, 1, 1], decoder_layers_per_block=[0, 2, 1, 1],
                   encoder_qkv_multiscales=[[]] * 4, decoder_qkv_multiscales=[[]] * 4,
                   downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
                   decoder_norm_types=["batch_norm"] * 2 + ["rms_norm"] * 2, decoder_act_fns=["relu"] * 2 + ["silu"] * 2)
    model = _randomize(dc.build(cfg), seed=3, std=0.1)
    g = torch.Generator().manual_seed(9)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return VAE(model, "dc", kind, cfg)


@pytest.mark.parametrize("kind", ["sana", "in"])
def test_dc_tiled_equals_untiled(kind):
    vae = _dc_vae(kind)
    g = torch.Generator().manual_seed(8)
    z = torch.randn(1, 8, 11, 9, generator=g)
    prog = Counter()
    ref = vae.decode(z, tile=False)
    _close(vae.decode(z, tile=tiling.Tiling(32), progress=prog), ref)
    assert prog.calls[-1][1] > 20
    x = torch.rand(1, 3, 104, 80, generator=g) * 2 - 1
    _close(vae.encode(x, tile=tiling.Tiling(32)), vae.encode(x, tile=False))


def test_untiled_forward_keeps_autograd():
    """A library caller may differentiate through the decoder (latent optimisation)."""
    vae = _kl_vae()
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    vae.model.decode(z).square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
