"""AutoencoderTiny (TAESD family): parity with diffusers' AutoencoderTiny (seeded random weights, saved in every
format we read), real TAEF2/TAESANA weights, variant detection and errors."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from vae_core import VAEError, load_vae
from vae_core import tiny

diffusers = pytest.importorskip("diffusers")


def _reference(latent_channels: int = 4, seed: int = 0):
    """A diffusers AutoencoderTiny at the released layout, with seeded random weights (biases too)."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderTiny(latent_channels=latent_channels).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def _image(b=1, h=64, w=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def _original_files(ref) -> tuple[dict, dict]:
    """diffusers keys -> madebyollin's split files (bare Sequential indices; the decoder's 0 is the clamp)."""
    enc, dec = {}, {}
    for k, v in ref.state_dict().items():
        if m := re.match(r"encoder\.layers\.(\d+)\.(.*)", k):
            enc[f"{m.group(1)}.{m.group(2)}"] = v.clone()
        elif m := re.match(r"decoder\.layers\.(\d+)\.(.*)", k):
            dec[f"{int(m.group(1)) + 1}.{m.group(2)}"] = v.clone()
    return enc, dec


def _comfy_dict(ref, scale: float, shift: float) -> dict:
    enc, dec = _original_files(ref)
    sd = {f"taesd_encoder.{k}": v for k, v in enc.items()}
    sd.update({f"taesd_decoder.{k}": v for k, v in dec.items()})
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(scale), torch.tensor(shift)
    return sd


def _assert_parity(vae, ref, x, tol=1e-5):
    """Our networks vs diffusers on the same input; then the VAE API's raw-latent convention around them."""
    with torch.no_grad():
        lat_ref = ref.encode(x).latents
        img_ref = ref.decode(lat_ref).sample
    lat = vae.model.encode(x)[0]
    assert (lat - lat_ref).abs().max().item() < tol
    img = vae.model.decode(lat_ref)
    assert (img - img_ref).abs().max().item() < tol
    # public API: raw latents = diffusion latents / scale + shift (ComfyUI's vae_scale / vae_shift)
    raw = vae.encode(x)
    assert torch.allclose(raw, lat_ref / vae.scaling_factor + vae.shift_factor, atol=tol, rtol=1e-5)
    assert torch.allclose(vae.to_diffusion(raw), lat_ref, atol=tol)
    assert (vae.decode(raw) - img_ref).abs().max().item() < 10 * tol


# ------------------------------------------------------------------------------------------- diffusers
@pytest.mark.parametrize("latent_channels, name, variant, scale, shift", [
    (4, "taesdxl", "taesdxl", 0.13025, 0.0),
    (16, "taef1", "taef1", 0.3611, 0.1159),
])
def test_diffusers_folder_parity(tmp_path, latent_channels, name, variant, scale, shift):
    ref = _reference(latent_channels)
    ref.save_pretrained(tmp_path / name)
    vae = load_vae(tmp_path / name)
    assert (vae.family, vae.variant, vae.latent_channels, vae.downscale) == ("tiny", variant, latent_channels, 8)
    # diffusers' config says scaling 1.0 (its latents are already diffusion-space); the variant's space wins
    assert (vae.scaling_factor, vae.shift_factor) == (scale, shift)
    assert vae.native_space == "diffusion" and vae.config["force_upcast"] is False
    assert list(vae.model.state_dict()) == list(ref.state_dict())  # our names are diffusers' names
    _assert_parity(vae, ref, _image(b=2))


def test_diffusers_forward_quantization_matches(tmp_path):
    """diffusers' forward() stores the latent in 8 bits before decoding; scale/unscale_latents reproduce it."""
    ref = _reference(4, seed=3)
    ref.save_pretrained(tmp_path / "taesd")
    model = load_vae(tmp_path / "taesd").model
    x = _image(seed=4)
    with torch.no_grad():
        want = ref(x).sample
    lat = model.encode(x)[0]
    got = model.decode(model.unscale_latents(model.scale_latents(lat).mul(255).round().div(255)))
    assert (got - want).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------- original files
@pytest.mark.parametrize("reverse", [False, True])
def test_original_split_files_parity(tmp_path, reverse):
    ref = _reference(4, seed=5)
    enc, dec = _original_files(ref)
    torch.save(enc, tmp_path / "taesd_encoder.pth")
    save_file(dec, str(tmp_path / "taesd_decoder.safetensors"))
    if reverse:  # a pair given as (decoder, encoder) is sorted out by its keys
        vae = load_vae((tmp_path / "taesd_decoder.safetensors", tmp_path / "taesd_encoder.pth"))
    else:  # a folder holding one *_encoder and one *_decoder file
        vae = load_vae(tmp_path)
    assert (vae.variant, vae.scaling_factor, vae.can_encode, vae.can_decode) == ("taesd", 0.18215, True, True)
    _assert_parity(vae, ref, _image(h=48, w=80, seed=6))


def test_comfy_merged_dict_scale_picks_variant():
    ref = _reference(16, seed=7)
    vae = load_vae(_comfy_dict(ref, 1.5305, 0.0609))  # ComfyUI's taesd3 entry
    assert (vae.variant, vae.scaling_factor, vae.shift_factor) == ("taesd3", 1.5305, 0.0609)
    _assert_parity(vae, ref, _image(seed=8))
    ref4 = _reference(4, seed=9)
    assert load_vae(_comfy_dict(ref4, 0.13025, 0.0)).variant == "taesdxl"


def test_single_decoder_file(tmp_path):
    ref = _reference(16, seed=10)
    _, dec = _original_files(ref)
    path = tmp_path / "taef1_decoder.pth"
    torch.save(dec, path)
    assert tiny.matches(dec) and not tiny.matches({k: v for k, v in dec.items() if ".conv." not in k})
    vae = load_vae(path)  # family detected from a bare decoder file
    assert (vae.family, vae.variant, vae.can_encode, vae.can_decode) == ("tiny", "taef1", False, True)
    assert vae.model.encoder is None
    with pytest.raises(VAEError, match="without an encoder"):
        vae.encode(_image())
    z = torch.randn(1, 16, 6, 5)
    with torch.no_grad():
        want = ref.decode(z).sample
    assert (vae.decode_diffusion(z) - want).abs().max().item() < 1e-4
    assert vae.decode(z).shape == (1, 3, 48, 40)


def test_odd_image_sizes_pad_to_multiple_of_8(tmp_path):
    ref = _reference(4, seed=11)
    ref.save_pretrained(tmp_path / "taesd")
    vae = load_vae(tmp_path / "taesd")
    assert vae.encode(_image(h=70, w=50)).shape == (1, 4, 9, 7)


# ------------------------------------------------------------------------------------------- errors
def test_mismatched_pair_is_refused(tmp_path):
    enc4, _ = _original_files(_reference(4, seed=12))
    _, dec16 = _original_files(_reference(16, seed=13))
    with pytest.raises(VAEError, match="different TAESD models"):
        load_vae((enc4, dec16))
    with pytest.raises(VAEError, match="two encoders"):
        load_vae((enc4, enc4))
    kl_like = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}
    with pytest.raises(VAEError, match="not a TAESD file"):
        load_vae((enc4, kl_like))


def test_not_tiny_is_not_matched():
    assert not tiny.matches({"0.weight": torch.zeros(4, 3, 3, 3), "1.weight": torch.zeros(4, 4)})
    assert not tiny.matches({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(VAEError):
        load_vae({"0.weight": torch.zeros(4, 3, 3, 3), "1.weight": torch.zeros(4, 4)})


def test_truncated_file_names_what_is_missing(tmp_path):
    enc, dec = _original_files(_reference(4, seed=14))
    dec.pop("4.conv.2.bias")
    with pytest.raises(VAEError, match="missing"):
        load_vae((enc, dec))


# ------------------------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_taef2_real_roundtrip(taesd_dir, photo):
    """Real TAEF2 (FLUX.2, GroupNorm "pool" blocks): the README measured 31.87 dB and latents in ~[-3.9, 5.1]."""
    vae = load_vae((taesd_dir / "taef2_encoder.pth", taesd_dir / "taef2_decoder.pth"))
    assert (vae.variant, vae.latent_channels, vae.downscale, vae.scaling_factor) == ("taef2", 32, 8, 1.0)
    assert vae.config["midblock_group_norm"] is True
    z = vae.encode(photo)
    assert z.shape == (1, 32, 64, 64)
    assert abs(z.min().item() + 3.9) < 0.06 and abs(z.max().item() - 5.1) < 0.06
    out = vae.decode(z).clamp(-1, 1)
    psnr = 10 * torch.log10(4 / (out - photo).pow(2).mean()).item()
    assert psnr > 31.5, psnr


@pytest.mark.slow
def test_taef2_real_half_precision_close_to_fp32(taesd_dir, photo):
    """bf16 and fp16 weights give the fp32 result closely (the pool GroupNorm included). Small crop: CPU half
    convs are slow."""
    files = (taesd_dir / "taef2_encoder.pth", taesd_dir / "taef2_decoder.pth")
    x = photo[..., 240:288, 240:288]
    full = load_vae(files)
    z32 = full.encode(x)
    y32 = full.decode(z32)
    for dtype in (torch.bfloat16, torch.float16):
        half = load_vae(files, dtype=dtype)
        assert half.dtype == dtype and next(half.model.parameters()).dtype == dtype
        z16 = half.encode(x)
        assert z16.dtype == torch.float32  # outputs come back in the input's dtype
        assert (z16 - z32).abs().max().item() < 0.1 and (z16 - z32).abs().mean().item() < 0.02
        psnr = 10 * torch.log10(4 / (half.decode(z32) - y32).pow(2).mean()).item()
        assert psnr > 45, (dtype, psnr)


def test_taesana_real_encoder(taesd_dir, photo):
    """Real TAESANA encoder alone (32x, two stride-2 stem convs): README range about [-3.5, 3.4]."""
    vae = load_vae(taesd_dir / "taesana_encoder.pth")
    assert (vae.variant, vae.downscale, vae.latent_channels, vae.can_decode) == ("taesana", 32, 32, False)
    assert vae.config["encoder_stem_channels"] == [32, 64] and vae.scaling_factor == 0.41407
    z = vae.to_diffusion(vae.encode(photo))
    assert z.shape == (1, 32, 16, 16)
    assert abs(z.min().item() + 3.5) < 0.06 and abs(z.max().item() - 3.4) < 0.06
    assert vae.encode(photo[..., :100, :70]).shape == (1, 32, 4, 3)
    with pytest.raises(VAEError, match="without a decoder"):
        vae.decode(z)
