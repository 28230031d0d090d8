"""AsymmetricAutoencoderKL: parity with diffusers at both released configs, the inputs diffusers trips on,
the masked-region property on the real photo, and bad-input errors.

diffusers is the oracle only: models are built with seeded random weights (1-D parameters perturbed so the
GroupNorm affines and biases matter), saved in each format, loaded with vae_core and compared in fp32.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from vae_core import VAEError, load_vae
from vae_core import asym, kl

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
_ENC = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "down_block_out_channels": [128, 256, 512, 512], "layers_per_down_block": 2,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
        "sample_size": 256, "scaling_factor": 0.18215}
# The released configs, as in diffusers' scripts/convert_asymmetric_vqgan_to_diffusers.py (written out here,
# independently of vae_core.asym.VARIANTS).
RELEASED = {
    "x-1-5": {**_ENC, "up_block_out_channels": [192, 384, 768, 768], "layers_per_up_block": 3},
    "x-2": {**_ENC, "up_block_out_channels": [256, 512, 1024, 1024], "layers_per_up_block": 5},
}
# A small config with the same topology (condition-encoder shapes line up), for the input-handling tests.
SMALL = {**_ENC, "down_block_out_channels": [32, 32, 64, 64], "layers_per_down_block": 1,
         "up_block_out_channels": [32, 64, 64, 64], "layers_per_up_block": 1, "sample_size": 32}


def seeded_reference(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.AsymmetricAutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return model.requires_grad_(False)


def rand_inputs(b: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    mask = (torch.rand(b, 1, h, w, generator=g) > 0.5).float()
    return image, mask


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------- formats
def to_original(sd: dict) -> dict:
    """diffusers names -> the original Asymmetric_VQGAN (ldm) layout, with its extra keys (test-only inverse)."""
    n_up = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for k, v in sd.items():
        k2 = re.sub(r"^decoder\.condition_encoder\.", "decoder.encoder.", k)
        k2 = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.", k2)
        for a, b in ((".down_blocks.", ".down."), (".resnets.", ".block."), (".downsamplers.0.", ".downsample."),
                     (".upsamplers.0.", ".upsample."), (".conv_shortcut.", ".nin_shortcut."),
                     (".conv_norm_out.", ".norm_out."), (".mid_block.block.0.", ".mid.block_1."),
                     (".mid_block.block.1.", ".mid.block_2."), (".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm."),
                     (".mid_block.attentions.0.to_q.", ".mid.attn_1.q."), (".mid_block.attentions.0.to_k.", ".mid.attn_1.k."),
                     (".mid_block.attentions.0.to_v.", ".mid.attn_1.v."),
                     (".mid_block.attentions.0.to_out.0.", ".mid.attn_1.proj_out.")):
            k2 = k2.replace(a, b)
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", k2):
            v = v[:, :, None, None]
        out[k2] = v
    # Keys of the original training checkpoint that are not part of the model.
    out["decoder.up_layers.0.weight"] = torch.zeros(8, 8, 3, 3)
    out["loss.logvar"] = torch.zeros(())
    out["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    return out


def save_as(ref, fmt: str, tmp_path):
    """Write the reference model's weights in one format; -> what load_vae takes."""
    if fmt == "state_dict":
        return ref.state_dict()
    if fmt == "folder":
        ref.save_pretrained(tmp_path / "folder")
        return tmp_path / "folder"
    if fmt == "single_file":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "asym_vae.safetensors"))
        return tmp_path / "asym_vae.safetensors"
    if fmt == "original_ckpt":
        torch.save({"state_dict": to_original(ref.state_dict()), "global_step": 1}, tmp_path / "asym_vqgan.ckpt")
        return tmp_path / "asym_vqgan.ckpt"
    raise AssertionError(fmt)


# ---------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    ref = seeded_reference(SMALL, seed=3)
    folder = tmp_path_factory.mktemp("asym_small")
    ref.save_pretrained(folder)  # the folder's config carries norm_num_groups etc.
    return ref, load_vae(folder)


def test_detection_and_variants(small):
    ref, _ = small
    sd = ref.state_dict()
    assert asym.matches(sd) and not kl.matches(sd)
    original = to_original(sd)
    assert asym.matches(original) and not kl.matches(original)
    assert load_vae(sd).family == "asym"
    assert load_vae(sd).variant == "custom"  # not a released architecture
    converted = asym.convert(original)
    assert set(converted) == set(sd)  # up_layers / loss keys dropped, everything else renamed
    assert all(torch.equal(converted[k], sd[k]) for k in sd)
    # a KL state dict is not taken for an asymmetric one
    kl_ref = diffusers.AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                                     up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32)
    assert not asym.matches(kl_ref.state_dict()) and load_vae(kl_ref.state_dict()).family == "kl"
    # short and long variant names for the released architectures
    assert asym.guess_variant({}, {**asym.DEFAULT_CONFIG, **RELEASED["x-2"]}, {}) == "x-2"
    assert asym.guess_variant({}, {**asym.DEFAULT_CONFIG, **RELEASED["x-1-5"]}, {}) == "x-1-5"
    assert "asymmetric-autoencoder-kl-x-1-5" in asym.VARIANTS and "asymmetric-autoencoder-kl-x-2" in asym.VARIANTS
    with pytest.raises(VAEError, match="does not fit these weights"):  # a variant must fit the weights' architecture
        load_vae(sd, variant="asymmetric-autoencoder-kl-x-1-5")
    with pytest.raises(VAEError, match="unknown asym variant"):
        load_vae(sd, variant="x-3")


# ---------------------------------------------------------------------------------------------- inputs diffusers trips on
def test_size_not_multiple_of_8(small):
    ref, vae = small
    image, mask = rand_inputs(2, 36, 44)
    z = vae.encode(image)
    assert z.shape == (2, 4, 5, 6)  # ceil(36/8), ceil(44/8)
    with pytest.raises(KeyError):  # diffusers cannot look up the condition features
        ref.decode(z, image=image, mask=mask)
    out = vae.decode(z, image=image, mask=mask)
    assert out.shape == (2, 3, 36, 44)

    def pad(t):
        return F.pad(t, (0, 4, 0, 4), mode="replicate")

    with torch.no_grad():
        expect = ref.decode(z, image=pad(image), mask=pad(mask)).sample[..., :36, :44]
    assert maxdiff(out, expect) <= TOL
    # a mask already at the decoded (padded) size is taken as is
    assert maxdiff(vae.decode(z, image=image, mask=pad(mask)), expect) <= TOL
    # a latent-size mask with an odd-sized image: upsampled to the decoded size, no padding needed
    cells = (torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    with torch.no_grad():
        expect_cells = ref.decode(z, image=pad(image), mask=cells.repeat_interleave(8, 2).repeat_interleave(8, 3))
    assert maxdiff(vae.decode(z, image=image, mask=cells), expect_cells.sample[..., :36, :44]) <= TOL


def test_single_mask_and_single_image_for_a_batch(small):
    ref, vae = small
    image, mask = rand_inputs(3, 32, 32)
    z = vae.encode(image)
    with torch.no_grad():
        expect_one_mask = ref.decode(z, image=image, mask=mask[:1].expand(3, -1, -1, -1)).sample
        expect_one_image = ref.decode(z, image=image[:1].expand(3, -1, -1, -1), mask=mask).sample
    assert maxdiff(vae.decode(z, image=image, mask=mask[:1]), expect_one_mask) <= TOL
    assert maxdiff(vae.decode(z, image=image[:1], mask=mask), expect_one_image) <= TOL
    with pytest.raises(KeyError):  # diffusers keys the condition features by batch size too
        ref.decode(z, image=image[:1], mask=mask[:1])
    with torch.no_grad():
        expect_both = ref.decode(z, image=image[:1].expand(3, -1, -1, -1), mask=mask[:1].expand(3, -1, -1, -1)).sample
    assert maxdiff(vae.decode(z, image=image[:1], mask=mask[:1]), expect_both) <= TOL


def test_mask_layouts(small):
    ref, vae = small
    image, mask = rand_inputs(2, 32, 32)
    z = vae.encode(image)
    with torch.no_grad():
        expect = ref.decode(z, image=image, mask=mask).sample
    with pytest.raises(Exception):  # diffusers needs [B,1,H,W]
        ref.decode(z, image=image, mask=mask[:, 0])
    assert maxdiff(vae.decode(z, image=image, mask=mask[:, 0]), expect) <= TOL  # [B,H,W]
    assert maxdiff(vae.decode(z, image=image, mask=mask.bool()), expect) <= TOL  # bool
    # [H,W] mask and [3,H,W] image for one latent
    one = vae.decode(z[:1], image=image[0], mask=mask[0, 0])
    assert maxdiff(one, expect[:1]) <= TOL
    # a mask at latent size is resized (nearest) to the image: each latent cell covers an 8x8 block
    small_mask = (torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    with pytest.raises(Exception):  # diffusers needs the mask at image size
        ref.decode(z, image=image, mask=small_mask)
    with torch.no_grad():
        expect_small = ref.decode(z, image=image, mask=small_mask.repeat_interleave(8, 2).repeat_interleave(8, 3)).sample
    assert maxdiff(vae.decode(z, image=image, mask=small_mask), expect_small) <= TOL


def test_low_precision_decode_runs(small):
    ref, _ = small
    image, mask = rand_inputs(1, 32, 32)
    vae32 = load_vae(ref.state_dict())
    vae16 = load_vae(ref.state_dict(), dtype=torch.bfloat16)
    z = vae32.encode(image)
    out16 = vae16.decode(z.bfloat16(), image=image.bfloat16(), mask=mask.bfloat16())
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    assert maxdiff(out16.float(), vae32.decode(z, image=image, mask=mask)) < 0.2


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(small):
    _, vae = small
    image, mask = rand_inputs(2, 32, 32)
    z = vae.encode(image)
    with pytest.raises(VAEError, match=r"image is 48x48 but the latents are 4x4"):
        vae.decode(z, image=F.pad(image, (0, 16, 0, 16)), mask=F.pad(mask, (0, 16, 0, 16)))
    with pytest.raises(VAEError, match=r"image is 24x24 .* 4x4"):
        vae.decode(z, image=image[..., :24, :24], mask=mask[..., :24, :24])
    with pytest.raises(VAEError, match="mask must have one channel, got 3"):
        vae.decode(z, image=image, mask=mask.expand(-1, 3, -1, -1))
    with pytest.raises(VAEError, match="mask is 16x16"):
        vae.decode(z, image=image, mask=mask[..., :16, :16])
    with pytest.raises(VAEError, match="mask is missing"):
        vae.decode(z, image=image)
    with pytest.raises(VAEError, match="image is missing"):
        vae.decode(z, mask=mask)
    with pytest.raises(VAEError, match="image has batch 3 but the latents have batch 2"):
        vae.decode(z, image=torch.cat([image, image[:1]]), mask=mask)
    with pytest.raises(VAEError, match="mask has batch 3"):
        vae.decode(z, image=image, mask=torch.cat([mask, mask[:1]]))
    with pytest.raises(VAEError, match="mask contains NaN"):
        vae.decode(z, image=image, mask=mask.masked_fill(mask > 0, float("nan")))
    with pytest.raises(VAEError, match="NaN or Inf values in image"):
        vae.decode(z, image=image.masked_fill(image > 0.9, float("nan")), mask=mask)
    with pytest.raises(VAEError, match=r"mask values must be in \[0, 1\]"):
        vae.decode(z, image=image, mask=mask * 255)
    with pytest.raises(VAEError, match=r"\[0, 255\] image"):
        vae.decode(z, image=(image + 1) * 127.5, mask=mask)
    with pytest.raises(VAEError, match=r"\[B,H,W,C\] layout"):
        vae.decode(z, image=image.permute(0, 2, 3, 1), mask=mask)


def test_image_and_mask_rejected_by_other_families():
    torch.manual_seed(0)
    kl_ref = diffusers.AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                                     up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32)
    vae = load_vae(kl_ref.state_dict())
    assert vae.family == "kl"
    z = torch.zeros(1, 4, 4, 4)
    image, mask = rand_inputs(1, 8, 8)
    for kw in ({"image": image, "mask": mask}, {"mask": mask}, {"image": image}):
        with pytest.raises(VAEError, match="asymmetric"):
            vae.decode(z, **kw)


def test_unsupported_config_is_refused():
    with pytest.raises(VAEError, match="act_fn"):
        asym.build({**SMALL, "act_fn": "gelu"})
    with pytest.raises(VAEError, match="4 down blocks but 3 up blocks"):
        asym.build({**SMALL, "up_block_out_channels": [32, 64, 64]})


# ---------------------------------------------------------------------------------------------- parity
# Small images keep the 194M / 406M parameter models cheap on CPU; (1, 24, 40) is not square.
CASES = {"x-1-5": [(2, 16, 16), (1, 24, 40)], "x-2": [(1, 16, 24)]}


def check_parity(vae, ref, name: str) -> dict:
    diffs = {}
    with torch.no_grad():
        for b, h, w in CASES[name]:
            image, mask = rand_inputs(b, h, w)
            z = vae.encode(image)
            diffs[f"encode {b}x{h}x{w}"] = maxdiff(z, ref.encode(image).latent_dist.mean)
            plain = vae.decode(z)
            diffs[f"decode {b}x{h}x{w}"] = maxdiff(plain, ref.decode(z).sample)
            cond = vae.decode(z, image=image, mask=mask)
            diffs[f"decode+image+mask {b}x{h}x{w}"] = maxdiff(cond, ref.decode(z, image=image, mask=mask).sample)
            assert maxdiff(cond, plain) > 1e-2  # the conditioning is live, not a plain decode twice
    print(f"\n{name} max abs diff vs diffusers (fp32): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return diffs


@pytest.fixture(scope="class")
def x15(tmp_path_factory):
    """x-1-5 reference with seeded weights, saved as a diffusers folder and loaded from it."""
    ref = seeded_reference(RELEASED["x-1-5"])
    tmp = tmp_path_factory.mktemp("asym_x15")
    return ref, load_vae(save_as(ref, "folder", tmp)), tmp


@pytest.mark.slow
class TestReleasedX15:
    """One x-1-5 model (194M parameters) for these tests, freed when they end."""

    def test_parity_x_1_5(self, x15):
        ref, vae, _ = x15
        assert (vae.family, vae.variant, vae.downscale) == ("asym", "x-1-5", 8)
        assert vae.scaling_factor == pytest.approx(0.18215) and vae.config["force_upcast"] is False
        diffs = check_parity(vae, ref, "x-1-5")
        assert max(diffs.values()) <= TOL, diffs

    @pytest.mark.parametrize("fmt", ["single_file", "original_ckpt"])
    def test_other_formats_load_the_same_weights(self, x15, fmt):
        """The numerics are proven on the folder-loaded model; other formats must load bit-identical weights."""
        ref, from_folder, tmp = x15
        vae = load_vae(save_as(ref, fmt, tmp))
        assert (vae.family, vae.variant) == ("asym", "x-1-5")
        ours, expect = vae.model.state_dict(), from_folder.model.state_dict()
        assert ours.keys() == expect.keys()
        assert all(torch.equal(ours[k], expect[k]) for k in expect)
        image, mask = rand_inputs(1, 16, 16)
        z = vae.encode(image)
        with torch.no_grad():
            assert maxdiff(vae.decode(z, image=image, mask=mask), ref.decode(z, image=image, mask=mask).sample) <= TOL

    def test_masked_region_ignores_original_inside_mask(self, photo, x15):
        _, vae, _ = x15  # released x-1-5 architecture, seeded random weights
        original = F.interpolate(photo, size=(32, 40), mode="area")
        mask = torch.zeros(1, 1, 32, 40)
        mask[..., 5:22, 11:30] = 1  # not aligned to the 8-pixel latent grid
        inside, outside = mask.bool().expand_as(original), ~mask.bool().expand_as(original)
        z = vae.encode(original)
        base = vae.decode(z, image=original, mask=mask)

        changed_inside = torch.where(inside, -original, original)
        assert torch.equal(vae.decode(z, image=changed_inside, mask=mask), base)

        changed_outside = torch.where(outside, -original, original)
        moved = (vae.decode(z, image=changed_outside, mask=mask) - base).abs()
        assert float(moved.max()) > 0.05
        assert float(moved[outside].mean()) > 1e-2


@pytest.mark.slow
def test_parity_x_2():
    ref = seeded_reference(RELEASED["x-2"])
    vae = load_vae(ref.state_dict())  # no config: architecture and variant from the weights alone
    assert (vae.family, vae.variant) == ("asym", "x-2")
    assert vae.config["up_block_out_channels"] == [256, 512, 1024, 1024]
    assert vae.config["layers_per_up_block"] == 5
    diffs = check_parity(vae, ref, "x-2")
    assert max(diffs.values()) <= TOL, diffs
