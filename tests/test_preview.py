"""TAESD Preview outside the host: the preview engine in vae_core (variant choice, latent mapping, size cap, rate
limit, decoder lookup and caching) without ComfyUI, its picture quality on the real TAEF2 weights, and the node's
sampler hook."""
from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from preview_models import taesd_decoder_state_dict


import vae_core.preview as pv  # noqa: E402


def _load_node_module():
    from pack import import_pack_module  # tests/pack.py: the pack as ComfyUI imports it

    return import_pack_module("nodes.preview")


node = _load_node_module()


# Stand-ins for ComfyUI's latent format classes: the node looks formats up by class name along the MRO.
class LatentFormat:
    scale_factor = 1.0
    shift = 0.0
    latent_channels = 4

    def process_in(self, z):
        return (z - self.shift) * self.scale_factor

    def process_out(self, z):
        return z / self.scale_factor + self.shift


class SD15(LatentFormat):
    scale_factor = 0.18215


class SD3(LatentFormat):
    scale_factor, shift, latent_channels = 1.5305, 0.0609, 16


class Flux(SD3):
    scale_factor, shift = 0.3611, 0.1159


class Chroma(Flux):  # a format derived from Flux's
    pass


class Flux2(LatentFormat):
    latent_channels = 128


class Mochi(LatentFormat):
    latent_channels = 12


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))  # identical pictures: 120 dB


def jpeg_roundtrip(img: Image.Image) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)  # what ComfyUI's server sends
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255


def to_hwc01(images: torch.Tensor) -> np.ndarray:
    return images[0].clamp(-1, 1).add(1).div(2).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------ real weights
@pytest.mark.slow
def test_taef2_preview_quality_matches_vae_core_decode(taesd_dir, photo):
    from vae_core import load_vae

    encoder = load_vae(str(taesd_dir / "taef2_encoder.pth"))
    decoder, src = pv.load_decoder("taef2", "cpu", ["taef2_decoder.pth"], lambda n: str(taesd_dir / n),
                                   allow_hub=False)
    assert decoder is not None and src.endswith("taef2_decoder.pth")
    z = encoder.encode(photo)  # TAEF2 latents [1,32,64,64] (FLUX.2's normalised space, unpatchified)
    assert z.shape == (1, 32, 64, 64)
    reference = psnr(to_hwc01(decoder.decode(z)), to_hwc01(photo))

    x0 = pv.pack_2x2(z)  # what a FLUX.2 sampler holds in ComfyUI: 2x2-patchified, 128 channels
    assert x0.shape == (1, 128, 32, 32)
    image = pv.render_preview(decoder, pv.x0_to_raw(x0, Flux2(), decoder.latent_channels), max_size=512)
    assert image.size == (512, 512)
    got = psnr(jpeg_roundtrip(image), to_hwc01(photo))
    print(f"TAEF2 PSNR vs photo: vae_core decode {reference:.2f} dB, preview (JPEG q95) {got:.2f} dB")
    assert reference >= 31.5
    assert abs(got - reference) <= 0.5, (got, reference)

    # The size cap: a trimmed decoder (last upsampling skipped) gives a 256 px preview close to the photo at 256 px
    # (an area-downscaled latent gives only about 20.6 dB here).
    photo_u8 = Image.fromarray((to_hwc01(photo) * 255).round().astype(np.uint8))
    for cap, floor_db in ((256, 30.0), (128, 28.0), (384, 33.0)):
        small = pv.render_preview(decoder, z, max_size=cap)
        assert small.size == (cap, cap)
        ref = np.asarray(photo_u8.resize((cap, cap), Image.BILINEAR), dtype=np.float32) / 255
        capped = psnr(np.asarray(small, dtype=np.float32) / 255, ref)
        print(f"TAEF2 preview capped at {cap} px: {capped:.2f} dB vs the photo resized to {cap} px")
        assert capped >= floor_db, (cap, capped)


# ------------------------------------------------------------------------------------------------ pure parts
def test_variant_follows_the_latent_format():
    assert pv.variant_for_format(SD15()) == "taesd"
    assert pv.variant_for_format(SD3()) == "taesd3"
    assert pv.variant_for_format(Flux()) == "taef1"  # not taesd3, although Flux derives from SD3
    assert pv.variant_for_format(Chroma()) == "taef1"
    assert pv.variant_for_format(Flux2()) == "taef2"
    assert pv.variant_for_format(type("SDXL", (LatentFormat,), {})()) == "taesdxl"
    assert pv.variant_for_format(type("SDXL_Playground_2_5", (LatentFormat,), {})()) == "taesdxl"
    assert pv.variant_for_format(Mochi()) is None


def test_x0_maps_back_to_raw_latents_once():
    raw = torch.randn(2, 16, 8, 8)
    fmt = Flux()
    back = pv.x0_to_raw(fmt.process_in(raw), fmt, 16)
    assert back.shape == (1, 16, 8, 8)  # first batch item only
    torch.testing.assert_close(back, raw[:1])


def test_flux2_patchify_layout():
    z = torch.randn(1, 32, 8, 6)
    packed = pv.pack_2x2(z)
    assert packed.shape == (1, 128, 4, 3)
    # channel c*4 + 2*row + col of the packed latent at (h, w) is pixel (2h+row, 2w+col) of channel c
    for c, row, col, h, w in ((0, 0, 0, 0, 0), (5, 1, 0, 2, 1), (31, 1, 1, 3, 2)):
        assert packed[0, c * 4 + 2 * row + col, h, w] == z[0, c, 2 * h + row, 2 * w + col]
    torch.testing.assert_close(pv.unpack_2x2(packed), z)
    assert pv.x0_to_raw(packed, Flux2(), 32).shape == (1, 32, 8, 6)


def test_size_cap_downscales_the_latent():
    z = torch.randn(1, 4, 128, 96)  # a 1024x768 image
    assert pv.cap_latent(z, 8, 512).shape == (1, 4, 64, 48)
    assert pv.cap_latent(z, 8, 1024) is z
    assert pv.cap_latent(z, 8, 4096) is z
    assert pv.cap_latent(torch.randn(1, 4, 100, 10), 8, 400).shape == (1, 4, 50, 5)
    flat = torch.full((1, 4, 64, 64), 0.7)
    torch.testing.assert_close(pv.cap_latent(flat, 8, 128), torch.full((1, 4, 16, 16), 0.7))  # area average


def test_halvings_keep_the_preview_at_least_the_cap():
    assert pv.halvings(1024, 512, 3) == 1
    assert pv.halvings(1024, 256, 3) == 2
    assert pv.halvings(1024, 64, 3) == 3  # no more upsamplings to skip: the picture is scaled down after
    assert pv.halvings(768, 512, 3) == 0  # 384 would be below the cap: decode 768, scale to 512
    assert pv.halvings(512, 512, 3) == 0
    assert pv.halvings(4096, 0, 3) == 0  # no cap


def test_size_capped_decode_is_a_tiny_capability(tmp_path):
    from safetensors.torch import save_file

    save_file(taesd_decoder_state_dict(4, seed=5), str(tmp_path / "taesd_decoder.safetensors"))
    dec, _ = pv.load_decoder("taesd", "cpu", ["taesd_decoder.safetensors"], lambda n: str(tmp_path / n), False)
    assert dec.model.decoder.upsamples == 3
    z = torch.randn(1, 4, 8, 6)
    full = dec.decode(z, tile=False)
    zd = dec.to_diffusion(z)
    with torch.inference_mode():
        half = dec.model.decode(zd, skip_upsamples=1)
        torch.testing.assert_close(dec.model.decode(zd, skip_upsamples=0), full)
    assert half.shape == (1, 3, 32, 24) and dec.downscale == 8  # the VAE itself is untouched
    torch.testing.assert_close(dec.decode(z, tile=False), full)
    with pytest.raises(ValueError, match="cannot skip 4"):
        dec.model.decode(zd, skip_upsamples=4)
    assert pv.render_preview(dec, z, max_size=32).size == (24, 32)  # 64 px tall -> decoded at 32 (PIL: w, h)
    assert max(pv.render_preview(dec, z, max_size=50).size) == 50  # 64 decoded, then scaled down


def test_rate_limit():
    now = [0.0]
    limit = pv.RateLimit(2.0, clock=lambda: now[0])  # at most one preview per 0.5 s
    due = []
    for step in range(10):
        due.append(limit.due(step, 10))
        now[0] += 0.2
    # t = 0 (first), 0.6, 1.2, 1.8 (>= 0.5 s since the last), and step 9 (the last step always)
    assert [i for i, d in enumerate(due) if d] == [0, 3, 6, 9]
    every = pv.RateLimit(0.0, clock=lambda: 0.0)
    assert all(every.due(i, 5) for i in range(5))


def test_decoder_file_lookup():
    files = ["taesdxl_decoder.pth", "taesd_encoder.pth", "sub/taesd_decoder.pth", "taesd_decoder.safetensors",
             "taef1_decoder.pth"]
    assert pv.find_decoder_file("taesd", files) == "taesd_decoder.safetensors"
    assert pv.find_decoder_file("taesdxl", files) == "taesdxl_decoder.pth"
    assert pv.find_decoder_file("taesd3", files) is None
    msg = pv.missing_message("taesd3", ["/models/vae_approx"])
    for part in ("taesd3_decoder.safetensors", "taesd3_decoder.pth", "/models/vae_approx", "hf:madebyollin/taesd3"):
        assert part in msg


def test_decoder_is_loaded_once_and_bad_files_do_not_raise(tmp_path, caplog):
    from safetensors.torch import save_file

    save_file(taesd_decoder_state_dict(4, seed=3), str(tmp_path / "taesd_decoder.safetensors"))
    full = lambda n: str(tmp_path / n)  # noqa: E731
    a, src = pv.load_decoder("taesd", "cpu", ["taesd_decoder.safetensors"], full, allow_hub=False)
    b, _ = pv.load_decoder("taesd", "cpu", ["taesd_decoder.safetensors"], full, allow_hub=False)
    assert a is not None and a is b  # cached across prompts
    assert (a.variant, a.latent_channels, a.can_decode) == ("taesd", 4, True)
    image = pv.render_preview(a, torch.randn(1, 4, 8, 8), max_size=512)
    assert image.size == (64, 64)

    assert pv.load_decoder("taesd3", "cpu", [], full, allow_hub=False) == (None, None)
    (tmp_path / "taesdxl_decoder.pth").write_bytes(b"not a checkpoint")
    with caplog.at_level("WARNING", logger="vae_suite"):
        for _ in range(2):
            assert pv.load_decoder("taesdxl", "cpu", ["taesdxl_decoder.pth"], full, allow_hub=False) == (None, None)
    warnings = [r for r in caplog.records if "taesdxl_decoder.pth" in r.getMessage()]
    assert len(warnings) == 1  # said once


def test_server_previewer_is_muted_for_one_call_only(monkeypatch):
    # Stand-in for ComfyUI's latent_preview: prepare_callback returns a closure over ``previewer``.
    fake = types.ModuleType("latent_preview")

    class LatentPreviewer:
        def decode_latent_to_preview_image(self, fmt, x0):
            return ("JPEG", "server picture", 512)

    fake.LatentPreviewer = LatentPreviewer
    monkeypatch.setitem(sys.modules, "latent_preview", fake)

    def prepare_callback(sent):
        previewer = LatentPreviewer()

        def callback(step, x0, x, total_steps):
            sent.append(previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None)
        return callback

    sent: list = []
    cb = prepare_callback(sent)
    restore = node._mute_server_previewer(cb)
    cb(0, None, None, 1)
    restore()
    cb(0, None, None, 1)
    assert sent == [None, ("JPEG", "server picture", 512)]
    assert node._mute_server_previewer(lambda *a: None)() is None  # anything else is left alone
