"""FLUX.2 VAE (AutoencoderKLFlux2): parity with diffusers at the released config, the pipeline's patchify +
BatchNorm stage, every format (diffusers folder/single file, BFL ldm ae.safetensors through ComfyUI core's loader,
full checkpoints), detection against FLUX.1/SD3, exact tiling, and the TAEF2 preview of a FLUX.2 LATENT."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vae_core import VAEError, load_vae
from vae_core import preview as pv
from vae_core import tiling

diffusers = pytest.importorskip("diffusers")  # the test oracle: installed by the test command, so never skipped in CI

from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline  # noqa: E402
from ldm_layout import core_oracle, to_ldm_flux2  # noqa: E402

TOL = 1e-4
SMALL = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def perturbed(model, seed: int):
    """Seeded weights where every parameter matters: GN affine off 1/0, BN statistics far from 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        n = model.bn.running_mean.numel()
        model.bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
        model.bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.2)
        model.bn.num_batches_tracked.fill_(1000)
    return model.eval()


def flux2_reference(seed: int = 0, **config):
    torch.manual_seed(seed)
    return perturbed(diffusers.AutoencoderKLFlux2(**config), seed)


def images(b=1, h=64, w=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def pipeline_to_diffusion(ref, z):
    """What Flux2Pipeline does to the VAE's raw latent (its prepare_image_latents)."""
    x = Flux2Pipeline._patchify_latents(z)
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return (x - mean) / std


def pipeline_from_diffusion(ref, z):
    """What Flux2Pipeline does before vae.decode."""
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return Flux2Pipeline._unpatchify_latents(z * std + mean)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """diffusers' AutoencoderKLFlux2 at its released (default) config, seeded, saved as a diffusers folder."""
    ref = flux2_reference(0)
    folder = tmp_path_factory.mktemp("flux2") / "vae"
    ref.save_pretrained(folder)
    x = images()
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mean
        y = ref.decode(z).sample
    return {"ref": ref, "folder": folder, "x": x, "z": z, "y": y}


def test_released_config_is_diffusers_default(released):
    cfg = released["ref"].config
    assert list(cfg.block_out_channels) == [128, 256, 512, 512] and cfg.latent_channels == 32
    assert cfg.batch_norm_eps == 1e-4 and tuple(cfg.patch_size) == (2, 2)
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention


def test_raw_encode_decode_match_diffusers_from_folder(released):
    vae = load_vae(str(released["folder"]))
    assert (vae.family, vae.variant, vae.latent_channels, vae.downscale) == ("flux2", "flux2", 32, 8)
    assert (vae.diffusion_channels, vae.diffusion_downscale, vae.comfy_latent) == (128, 16, "diffusion")
    z = vae.encode(released["x"])
    assert z.shape == (1, 32, 8, 6)
    assert maxdiff(z, released["z"]) <= TOL
    assert maxdiff(vae.decode(released["z"]), released["y"]) <= TOL


def test_diffusion_space_is_the_pipelines_stage_and_exact_inverse(released):
    vae = load_vae(str(released["folder"]))
    ref, z = released["ref"], released["z"]
    d = vae.to_diffusion(z)
    assert d.shape == (1, 128, 4, 3)
    assert maxdiff(d, pipeline_to_diffusion(ref, z)) <= 1e-5
    assert maxdiff(vae.from_diffusion(d), z) <= 1e-5
    assert maxdiff(vae.from_diffusion(d), pipeline_from_diffusion(ref, d)) <= 1e-5
    # the pipeline's image-to-latent and latent-to-image, in one call each
    assert maxdiff(vae.encode_diffusion(released["x"]), pipeline_to_diffusion(ref, released["z"])) <= TOL
    assert maxdiff(vae.decode_diffusion(d), released["y"]) <= TOL
    with pytest.raises(VAEError, match="128 channels"):
        vae.decode(d)
    with pytest.raises(VAEError, match="decode it with decode\\(\\)"):
        vae.decode_diffusion(z)
    with pytest.raises(VAEError, match="even size"):
        vae.to_diffusion(z[..., :5])


def test_diffusers_single_file(released, tmp_path):
    f = tmp_path / "flux2-vae.safetensors"
    save_file({k: v.contiguous() for k, v in released["ref"].state_dict().items()}, str(f))
    vae = load_vae(str(f))
    assert (vae.family, vae.variant) == ("flux2", "flux2")
    assert maxdiff(vae.encode(released["x"]), released["z"]) <= TOL
    assert maxdiff(vae.decode(released["z"]), released["y"]) <= TOL


def test_bfl_ldm_file_matches_comfyui_core(released, tmp_path):
    """The original ae.safetensors layout: ComfyUI core reads it (diffusers cannot); ours equals core's VAE."""
    ldm = to_ldm_flux2(released["ref"].state_dict())
    assert "bn.running_mean" in ldm and "encoder.down.0.block.0.norm1.weight" in ldm
    f = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(f))
    vae = load_vae(str(f))
    assert (vae.family, vae.variant) == ("flux2", "flux2")
    assert maxdiff(vae.encode(released["x"]), released["z"]) <= TOL  # the same weights as the diffusers model
    d = vae.to_diffusion(released["z"])
    core = core_oracle(f, released["x"], d, tmp_path)
    assert (core["latent_channels"], core["downscale"]) == (128, 16)
    assert maxdiff(vae.encode_diffusion(released["x"]), core["latent"]) <= TOL
    assert maxdiff(vae.decode_diffusion(d), core["image"]) <= TOL


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_full_checkpoint(released, tmp_path, prefix):
    ldm = to_ldm_flux2(released["ref"].state_dict())
    sd = {prefix + k: v.contiguous() for k, v in ldm.items()}
    sd["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"] = torch.zeros(8, 8)  # a companion
    f = tmp_path / "flux2-dev-full.safetensors"
    save_file(sd, str(f))
    vae = load_vae(str(f))
    assert (vae.family, vae.variant) == ("flux2", "flux2")
    assert maxdiff(vae.decode(released["z"]), released["y"]) <= TOL


# -------------------------------------------------------------------------------------------- detection
def _kl16(seed=0):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **SMALL)


@pytest.mark.parametrize("name,layout", [("ae.safetensors", "ldm"), ("flux1-vae.safetensors", "diffusers"),
                                         ("sd3_vae.safetensors", "ldm"), ("flux2-ae.safetensors", "ldm")])
def test_flux1_and_sd3_are_never_flux2(tmp_path, name, layout):
    """Names say nothing here: FLUX.1/SD3 (16 channels, no bn.*) stay kl, even under a FLUX.2 name."""
    sd = _kl16().state_dict()
    if layout == "ldm":
        from test_kl import to_ldm
        sd = to_ldm(sd, 4)
    f = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    vae = load_vae(str(f))
    assert vae.family == "kl" and vae.variant in ("flux1", "sd3") and vae.latent_channels == 16
    with pytest.raises(VAEError, match="flux2"):
        load_vae(str(f), family="flux2")


@pytest.mark.parametrize("name", ["ae.safetensors", "flux1-dev-vae.safetensors", "sd3_vae.safetensors"])
def test_flux2_is_never_kl(tmp_path, name):
    ref = flux2_reference(3, **SMALL)
    for i, sd in enumerate((ref.state_dict(), to_ldm_flux2(ref.state_dict()))):
        f = tmp_path / f"{i}_{name}"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
        vae = load_vae(str(f))
        assert vae.family == "flux2" and vae.latent_channels == 32 and vae.diffusion_channels == 128
        with pytest.raises(VAEError, match="'flux2'"):
            load_vae(str(f), family="kl")


def test_broken_batchnorm_is_a_clear_error(tmp_path):
    sd = flux2_reference(4, **SMALL).state_dict()
    sd["bn.running_mean"] = sd["bn.running_mean"][:64]
    sd["bn.running_var"] = sd["bn.running_var"][:64]
    with pytest.raises(VAEError):
        load_vae(sd, family="flux2")


# -------------------------------------------------------------------------------------------- tiling
def test_tiled_equals_untiled_off_grid(tmp_path):
    """Tile edges fall off the latent grid (image 232x168, 64/72 px tiles); through the same engine as kl."""
    ref = flux2_reference(5, **SMALL)
    ref.save_pretrained(tmp_path / "small")
    vae = load_vae(str(tmp_path / "small"))
    x = images(1, 232, 168, seed=7)
    z_full = vae.encode(x, tile=False)
    assert z_full.shape[-2:] == (29, 21)
    assert maxdiff(vae.encode(x, tile=tiling.Tiling(64, 8)), z_full) <= 1e-3
    with torch.no_grad():
        assert maxdiff(z_full, ref.encode(x).latent_dist.mean) <= TOL
    d = vae.encode_diffusion(x, tile=False)  # the image is padded to 240x176: [1,128,15,11]
    assert d.shape[1:] == (128, 15, 11)
    assert maxdiff(vae.encode_diffusion(x, tile=tiling.Tiling(64, 8)), d) <= 1e-3
    full = vae.decode_diffusion(d, tile=False)
    tiled = vae.decode_diffusion(d, tile=tiling.Tiling(72, 8))
    assert full.shape[-2:] == (240, 176)
    assert maxdiff(tiled, full) <= 1e-3
    assert maxdiff(vae.decode_diffusion(d), full) <= 1e-3  # auto mode (the memory estimate) runs for flux2 too


def test_out_of_memory_retries_in_exact_tiles(tmp_path, monkeypatch, caplog):
    """An allocation failure in the untiled decode of a FLUX.2 LATENT is retried in exact tiles (tiling.execute)."""
    ref = flux2_reference(6, **SMALL)
    ref.save_pretrained(tmp_path / "small")
    vae = load_vae(str(tmp_path / "small"))
    d = vae.encode_diffusion(images(1, 240, 176, seed=8), tile=False)
    want = vae.decode_diffusion(d, tile=False)
    real, plans = tiling._sliced, []

    def failing(vae_, model, fn_name, x, plan, *a):
        plans.append(plan)
        if plan is None:
            raise MemoryError("simulated: the untiled decode does not fit")
        return real(vae_, model, fn_name, x, plan, *a)

    monkeypatch.setattr(tiling, "_sliced", failing)
    got = vae.decode_diffusion(d, tile=False)
    assert plans[0] is None and plans[-1] is not None and "ran out of memory" in caplog.text
    assert maxdiff(got, want) <= 1e-3


# -------------------------------------------------------------------------------------------- preview
def psnr(a, b) -> float:
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def test_taef2_works_in_the_normalised_space(taesd_dir, photo):
    """TAEF2's 32-channel latent is the FLUX.2 diffusion-space latent unpatchified (BatchNorm-normalised), not the
    VAE's raw latent: patchified, the photo's latents (and their flips) have per-channel means near 0 and standard
    deviations near 1, as latents normalised by dataset statistics do for one image."""
    from vae_core.flux2 import patchify

    enc = load_vae(str(taesd_dir / "taef2_encoder.pth"))
    x = torch.cat([photo, photo.flip(-1), photo.flip(-2)])
    p = patchify(enc.encode(x))
    mean, std = p.mean((0, 2, 3)), p.std((0, 2, 3))
    print(f"TAEF2 patchified: |mean| avg {mean.abs().mean():.3f} max {mean.abs().max():.3f}; "
          f"std {std.min():.3f}..{std.max():.3f} (median {std.median():.3f})")
    assert mean.abs().mean() < 0.25 and mean.abs().max() < 0.6
    assert 0.4 < std.min() and std.max() < 1.6 and 0.6 < std.median() < 1.2


def test_taef2_preview_of_a_flux2_latent(taesd_dir, photo):
    """A FLUX.2 LATENT as a sampler holds it (ComfyUI: 128 channels, normalised; process_out is the identity)
    previews through TAEF2 as well as TAEF2's own round trip."""
    import numpy as np

    enc = load_vae(str(taesd_dir / "taef2_encoder.pth"))
    dec = load_vae(str(taesd_dir / "taef2_decoder.pth"))
    z = enc.encode(photo)
    own = psnr(dec.decode(z), photo)
    x0 = pv.pack_2x2(z)  # ComfyUI's FLUX.2 LATENT
    fmt = type("Flux2", (), {"latent_channels": 128, "process_out": staticmethod(lambda t: t)})()
    assert pv.variant_for_format(fmt) == "taef2"  # owned by the flux2 family's record
    shown = pv.render_preview(dec, pv.x0_to_raw(x0, fmt, 32), max_size=512)
    got = torch.from_numpy(np.asarray(shown.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    preview = psnr(got, photo)
    print(f"TAEF2 own round trip {own:.2f} dB, preview of the FLUX.2 LATENT {preview:.2f} dB")
    assert shown.size == (512, 512)
    assert own >= 31.5 and preview >= own - 0.3
