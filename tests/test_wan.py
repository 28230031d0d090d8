"""The Wan 2.1 / Qwen-Image VAE (vae_core/wan.py, vae_core/video.py) against diffusers 0.42.1 and the formulas of
diffusers' pipelines and ComfyUI's Wan21 latent format: every format, images and videos, tiled in space and time.

Most cases use a reduced config (base_dim 16 or 8: the released layout with fewer channels); the released config
(base_dim 96) is checked on one frame and five frames at 16x16."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vae_core import VAEError, load_vae
from wan_layout import to_original

diffusers = pytest.importorskip("diffusers")
TOL = 1e-4


def _seeded(cls, seed=0, **cfg):
    torch.manual_seed(seed)
    ref = cls(**cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):  # RMS-norm gains away from 1, so a wrong axis or scale shows
                p.mul_(1 + 0.5 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def small():
    return _seeded(diffusers.AutoencoderKLWan, base_dim=16)


def _ref_encode(ref, x):
    with torch.no_grad():
        return ref.encode(x).latent_dist.mean


def _ref_decode(ref, z):
    with torch.no_grad():
        return ref.decode(z).sample


def _check(vae, ref, frames, hw=(32, 32), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, frames, *hw, generator=g) * 2 - 1
    z = torch.randn(1, 16, 1 + (frames - 1) // 4, hw[0] // 8, hw[1] // 8, generator=g)
    enc = vae.encode(x, tile=False)
    assert enc.shape == (1, 16, 1 + (frames - 1) // 4, hw[0] // 8, hw[1] // 8)
    assert (enc - _ref_encode(ref, x)).abs().max().item() < TOL
    dec = vae.decode(z, tile=False)
    assert dec.shape == x.shape
    assert (dec - _ref_decode(ref, z)).abs().max().item() < TOL


@pytest.mark.parametrize("frames", [1, 9])
def test_parity_diffusers_folder(small, tmp_path, frames):
    small.save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    assert (vae.family, vae.variant, vae.latent_channels, vae.downscale) == ("wan", "wan2.1", 16, 8)
    _check(vae, small, frames)


def test_parity_qwen_image_class(tmp_path):
    ref = _seeded(diffusers.AutoencoderKLQwenImage, seed=3, base_dim=16)
    ref.save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    assert (vae.family, vae.variant) == ("wan", "qwen-image")
    _check(vae, ref, 5, hw=(24, 40))


def test_parity_released_config():
    ref = _seeded(diffusers.AutoencoderKLWan, seed=5)  # base_dim 96: the released Wan 2.1 / Qwen-Image VAE
    vae = load_vae(ref.state_dict())
    assert vae.model.config["base_dim"] == 96
    _check(vae, ref, 1, hw=(16, 16))
    _check(vae, ref, 5, hw=(16, 16))


def test_images_keep_their_rank(small):
    vae = load_vae(small.state_dict())
    x = torch.rand(2, 3, 24, 32) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 16, 3, 4)
    assert (z - _ref_encode(small, x.unsqueeze(2)).squeeze(2)).abs().max().item() < TOL
    out = vae.decode(z)
    assert out.shape == (2, 3, 24, 32)
    assert (out - _ref_decode(small, z.unsqueeze(2)).squeeze(2)).abs().max().item() < TOL


def test_original_layout_and_checkpoints(small, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = small.state_dict()
    orig = to_original(sd)
    assert "decoder.middle.0.residual.0.gamma" in orig and "decoder.upsamples.4.shortcut.weight" in orig
    back = convert_wan_vae_to_diffusers(orig)  # the oracle for the original layout
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    save_file({k: v.contiguous() for k, v in orig.items()}, tmp_path / "wan_2.1_vae.safetensors")
    torch.save(orig, tmp_path / "Wan2.1_VAE.pth")
    save_file({k: v.contiguous() for k, v in orig.items()}, tmp_path / "qwen_image_vae.safetensors")
    embedded = {**{f"vae.{k}": v for k, v in sd.items()}, "model.diffusion_model.head.modulation": torch.zeros(1, 2, 8)}
    sources = {"wan_2.1_vae.safetensors": "wan2.1", "Wan2.1_VAE.pth": "wan2.1", "qwen_image_vae.safetensors": "qwen-image"}
    for name, variant in sources.items():
        vae = load_vae(tmp_path / name)
        assert (vae.family, vae.variant) == ("wan", variant)
        _check(vae, small, 5, hw=(16, 24))
    _check(load_vae(embedded), small, 1, hw=(16, 24))


def test_diffusion_space_matches_pipelines_and_comfy(small):
    vae = load_vae(small.state_dict())
    z = torch.randn(1, 16, 2, 3, 4)
    mean = torch.tensor(small.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(small.config.latents_std).view(1, 16, 1, 1, 1)
    # diffusers' WanPipeline / QwenImagePipeline: (z - mean) * (1 / std); decode: z / (1 / std) + mean
    assert torch.allclose(vae.to_diffusion(z), (z - mean) * (1.0 / std), atol=1e-6)
    assert torch.allclose(vae.from_diffusion(z), z / (1.0 / std) + mean, atol=1e-6)
    # ComfyUI's Wan21 latent format: process_in (z - mean) * scale_factor / std, scale_factor 1.0
    assert torch.allclose(vae.to_diffusion(z[:, :, 0]), ((z - mean) / std)[:, :, 0], atol=1e-6)
    assert torch.allclose(vae.from_diffusion(vae.to_diffusion(z)), z, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return load_vae(_seeded(diffusers.AutoencoderKLWan, seed=7, base_dim=4).state_dict())


@pytest.mark.parametrize("frames,tile", [(9, {"tile_size": 32, "time_chunk": 1}),
                                         (5, {"tile_size": 512, "time_chunk": 1}), (5, {"tile_size": 40, "time_chunk": 0})])
def test_tiled_equals_untiled_in_space_and_time(tiny, frames, tile):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, frames, 40, 56, generator=g) * 2 - 1
    z = torch.randn(1, 16, 1 + (frames - 1) // 4, 5, 7, generator=g)
    seen = []
    enc = tiny.encode(x, tile=tile, progress=lambda d, t: seen.append((d, t)))
    assert (enc - tiny.encode(x, tile=False)).abs().max().item() < 1e-3
    assert len(seen) > 2 and seen[-1][0] == seen[-1][1]
    dec = tiny.decode(z, tile=tile)
    assert (dec - tiny.decode(z, tile=False)).abs().max().item() < 1e-3


def test_cancel_stops_within_one_tile(tiny):
    from vae_core import VAEInterrupted

    calls = []
    with pytest.raises(VAEInterrupted):
        tiny.decode(torch.randn(1, 16, 3, 6, 8), tile={"tile_size": 32}, progress=lambda d, t: calls.append(d),
                    should_stop=lambda: len(calls) >= 2)
    assert len(calls) == 2


def test_wan22_and_bad_inputs_refused(small):
    sd = to_original(small.state_dict())
    wan22 = {**sd, "decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(1)}
    with pytest.raises(VAEError, match="Wan 2.2"):
        load_vae(wan22)
    vae = load_vae(sd)
    with pytest.raises(VAEError, match="1 \\+ 4k frames"):
        vae.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(VAEError, match="16"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))


def test_preview_names_the_decoder_wan_latents_need():
    from vae_core.preview import decoder_needed_for_format, variant_for_format

    class Wan21:  # ComfyUI's latent format class name for Wan 2.1 / Qwen-Image models
        latent_channels = 16

    assert variant_for_format(Wan21) is None
    need = decoder_needed_for_format(Wan21())
    assert need is not None and "wan" in need and "taew2_1" in need and "TAEHV" in need


def test_out_of_memory_fallback_retries_a_video_in_tiles_and_chunks(tiny, monkeypatch, caplog):
    z = torch.randn(1, 16, 2, 5, 7, generator=torch.Generator().manual_seed(4))
    want = tiny.decode(z, tile=False)
    model = tiny.model
    real = type(model).decode

    def fails(self, x):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    monkeypatch.setattr(type(model), "decode", fails)
    got = tiny.decode(z, tile=False)  # untiled fails: retried in exact tiles and one-frame chunks
    monkeypatch.setattr(type(model), "decode", real)
    assert (got - want).abs().max().item() < 1e-3
    assert "ran out of memory" in caplog.text


def test_estimates_widget_and_bounded_peak_model():
    from vae_core import video, wan
    from vae_core.tiling import plan_grid

    plan = plan_grid(1024, 1024, 512, 64, mode="decode", family="wan", tiling="always")
    assert plan["count"] == 4 and 0 < plan["memory"]["per_tile_bytes"] < plan["memory"]["untiled_bytes"]
    with torch.device("meta"):
        model = wan.build({})
    untiled = [video.estimate(model, "decode", (1, 16, t, 60, 104), None, 0)["device_bytes"] for t in (5, 21)]
    tiled = [video.estimate(model, "decode", (1, 16, t, 60, 104), 256, 1)["device_bytes"] for t in (5, 21)]
    assert untiled[1] > 3 * untiled[0] and tiled[1] == tiled[0] and tiled[1] < untiled[1] / 4
