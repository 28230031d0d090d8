"""AutoencoderKL: parity with diffusers at every released config, from every format; dtypes; bad input."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import save_file

from vae_core import VAEError, load_vae

diffusers = pytest.importorskip("diffusers")  # the test oracle: installed by the test command, so never skipped in CI

TOL = 1e-4
RELEASED = {
    "sd1": dict(latent_channels=4, scaling_factor=0.18215, sample_size=512),
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, sample_size=1024),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False, sample_size=1024),
    "flux1": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                  use_post_quant_conv=False, sample_size=1024),
}
SD_LAYOUT = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)

# diffusers -> ldm, only to *produce* ldm files for the tests; diffusers' own converter checks them (below).
TO_LDM = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.{rev:1}.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.{rev:1}.upsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", r".nin_shortcut."),
]


def to_ldm(sd: dict, n_up: int) -> dict:
    from vae_core.convert import rename_key

    out = {}
    for k, v in sd.items():
        nk = rename_key(k, TO_LDM, rev_count=n_up)
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", nk):
            v = v[:, :, None, None]
        out[nk] = v.clone()
    return out


def build_reference(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**config).eval()
    with torch.no_grad():  # random init leaves GN affine at 1/0; perturb so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def images(b=1, h=32, w=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def ref_encode(model, x):
    with torch.no_grad():
        return model.encode(x).latent_dist.mean


def ref_decode(model, z):
    with torch.no_grad():
        return model.decode(z).sample


def assert_close(a, b, tol=TOL):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"


@pytest.fixture(scope="module", params=list(RELEASED))
def released(request, tmp_path_factory):
    name = request.param
    config = {**SD_LAYOUT, **RELEASED[name]}
    model = build_reference(config)
    root = tmp_path_factory.mktemp("kl_released")  # neutral: generic file names take the folder as hint
    model.save_pretrained(root / "diffusers", safe_serialization=True)
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, root / "diffusers_vae.safetensors")
    ldm = to_ldm(sd, len(config["block_out_channels"]))
    # the oracle for the ldm layout: diffusers' own converter must map it back exactly
    back = diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint(ldm, dict(model.config))
    assert set(back) == set(sd) and all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in sd)
    save_file(ldm, root / "ae.safetensors")
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 1, 1)
    if name == "sd3":
        full["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"] = torch.zeros(3, 1)
    if name == "sdxl":
        full["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(4)
    torch.save({"state_dict": full, "global_step": 1000}, root / "full_checkpoint.ckpt")
    return name, model, root


def test_released_config_matches_diffusers_from_every_format(released):
    name, model, root = released
    x = images(2, 32, 40)
    z_ref = ref_encode(model, x)
    img_ref = ref_decode(model, z_ref)
    sources = [root / "diffusers", root / "diffusers_vae.safetensors", root / "ae.safetensors",
               root / "full_checkpoint.ckpt"]
    for src in sources:
        vae = load_vae(src)
        assert vae.family == "kl"
        assert vae.latent_channels == RELEASED[name]["latent_channels"] and vae.downscale == 8
        assert_close(vae.encode(x), z_ref)
        assert_close(vae.decode(z_ref), img_ref)
        # variant: the folder's config says it; single files need names or companions (SD1/SDXL share shapes)
        expected = name if src.name in ("diffusers", "full_checkpoint.ckpt") else {"sdxl": "sd1", "sd3": "flux1"}.get(name, name)
        assert vae.variant == expected, (src.name, vae.variant)
        assert vae.scaling_factor == pytest.approx(RELEASED[expected]["scaling_factor"])
    # the override wins where weights cannot tell
    vae = load_vae(root / "ae.safetensors", variant=name)
    assert vae.variant == name and vae.scaling_factor == pytest.approx(RELEASED[name]["scaling_factor"])
    # ... and so do file-name hints
    hinted = root / f"{name}_vae.safetensors"
    hinted.write_bytes((root / "ae.safetensors").read_bytes())
    vae = load_vae(hinted)
    assert vae.variant == name and vae.scaling_factor == pytest.approx(RELEASED[name]["scaling_factor"])
    assert vae.shift_factor == pytest.approx(RELEASED[name].get("shift_factor", 0.0))


def test_sample_matches_diffusers_with_same_generator(released):
    name, model, root = released
    x = images(1, 32, 32)
    with torch.no_grad():
        ref = model.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    ours = load_vae(root / "diffusers").encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    assert_close(ours, ref)


def test_diffusion_space_round_trip(released):
    name, _, root = released
    vae = load_vae(root / "diffusers")
    z = torch.randn(1, vae.latent_channels, 4, 4)
    d = vae.to_diffusion(z)
    assert torch.allclose(d, (z - RELEASED[name].get("shift_factor", 0.0)) * RELEASED[name]["scaling_factor"])
    assert torch.allclose(vae.from_diffusion(d), z, atol=1e-6)


# ------------------------------------------------------------------------------------------------ small configs
SMALL = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, latent_channels=4,
             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    model = build_reference(SMALL, seed=3)
    root = tmp_path_factory.mktemp("kl_small")
    model.save_pretrained(root / "vae")
    return model, root


def test_config_driven_fields(tmp_path):
    cfg = dict(SMALL, block_out_channels=[32, 64, 64], layers_per_block=2, latent_channels=8,
               mid_block_add_attention=False, use_quant_conv=False,
               down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    model = build_reference(cfg, seed=5)
    model.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    assert vae.downscale == 4 and vae.latent_channels == 8 and vae.model.quant_conv is None
    assert vae.model.post_quant_conv is not None and vae.model.decoder.mid_block.attentions is None
    x = images(1, 24, 24)
    z = ref_encode(model, x)
    assert_close(vae.encode(x), z)
    assert_close(vae.decode(z), ref_decode(model, z))


def test_legacy_attention_names_and_pipeline_folder(small, tmp_path):
    model, root = small
    legacy = {re.sub(r"to_q", "query", re.sub(r"to_k", "key", re.sub(r"to_v", "value", re.sub(r"to_out\.0", "proj_attn", k)))): v
              for k, v in model.state_dict().items()}
    pipe = tmp_path / "pipeline"
    (pipe / "vae").mkdir(parents=True)
    (pipe / "vae" / "config.json").write_text((root / "vae" / "config.json").read_text())
    save_file(legacy, pipe / "vae" / "diffusion_pytorch_model.safetensors")
    vae = load_vae(pipe)  # a whole pipeline folder: its vae/ subfolder is used
    x = images(1, 16, 16)
    assert_close(vae.encode(x), ref_encode(model, x))


def test_state_dict_pt_and_bin_sources(small, tmp_path):
    model, _ = small
    sd = model.state_dict()
    torch.save(sd, tmp_path / "vae.pt")
    torch.save({"model": sd}, tmp_path / "vae.bin")
    x = images(1, 16, 16)
    z = ref_encode(model, x)
    for src in (sd, tmp_path / "vae.pt", str(tmp_path / "vae.bin")):
        assert_close(load_vae(src).encode(x), z)


def test_sizes_not_multiple_of_downscale(small):
    model, root = small
    vae = load_vae(root / "vae")
    x = images(1, 17, 23)
    z = vae.encode(x)
    assert z.shape[-2:] == (9, 12)  # ceil(17/2), ceil(23/2): the padded image is covered
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="replicate")
    assert_close(z, ref_encode(model, padded))
    out = vae.decode(z)
    assert out.shape[-2:] == (18, 24)
    assert out[..., :17, :23].shape == x.shape


def test_dtypes_bf16_close_and_fp16_never_nan(small, tmp_path):
    model, root = small
    x = images(1, 16, 16)
    z = ref_encode(model, x)
    ref = ref_decode(model, z)
    bf = load_vae(root / "vae", dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    out = bf.decode(z)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.15
    # force_upcast (diffusers' default True) keeps fp16 requests in fp32
    up = load_vae(root / "vae", dtype=torch.float16)
    assert up.dtype == torch.float32 and "force_upcast" in up.upcast_reason
    # a VAE whose activations overflow fp16 (as the SDXL VAE does) with force_upcast off: recomputed in fp32
    big = {k: (v * 1e6 if k == "decoder.up_blocks.0.resnets.0.conv2.weight" else v) for k, v in model.state_dict().items()}
    cfg = dict(model.config)
    cfg["force_upcast"] = False
    hot = tmp_path / "hot"
    hot.mkdir()
    (hot / "config.json").write_text(__import__("json").dumps({k: v for k, v in cfg.items()}))
    save_file(big, hot / "diffusion_pytorch_model.safetensors")
    fp16 = load_vae(hot, dtype=torch.float16)
    assert fp16.dtype == torch.float16
    zz = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        raw = fp16.model.decode(zz.half())
    assert not torch.isfinite(raw).all(), "the test VAE should overflow in plain fp16"
    out = fp16.decode(zz)
    assert torch.isfinite(out).all()
    fp32 = load_vae(hot).decode(zz)
    assert (out - fp32).abs().max() < 1e-2  # the fallback runs the fp16-rounded weights in fp32


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_have_clear_errors(small, tmp_path):
    model, root = small
    vae = load_vae(root / "vae")
    with pytest.raises(VAEError, match="expects 4"):
        vae.decode(torch.randn(1, 16, 8, 8))
    with pytest.raises(VAEError, match="4-D"):
        vae.decode(torch.randn(1, 4, 8))
    with pytest.raises(VAEError, match=r"\[B,3,H,W\].*permute"):
        vae.encode(torch.rand(1, 32, 32, 3))
    with pytest.raises(VAEError, match="NaN"):
        vae.decode(torch.full((1, 4, 4, 4), float("nan")))
    with pytest.raises(VAEError, match="NaN"):
        vae.encode(torch.full((1, 3, 8, 8), float("inf")))
    with pytest.raises(VAEError, match="unknown kl variant"):
        load_vae(root / "vae", variant="sd9")
    with pytest.raises(VAEError, match="family"):
        load_vae(root / "vae", family="dc")


def test_wrong_files_have_clear_errors(small, tmp_path):
    model, root = small
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.time_embed.0.weight": torch.zeros(1280, 320)}
    save_file(unet, tmp_path / "unet.safetensors")
    with pytest.raises(VAEError, match="not a VAE.*diffusion model"):
        load_vae(tmp_path / "unet.safetensors")
    te = {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 4)}
    save_file(te, tmp_path / "clip_l.safetensors")
    with pytest.raises(VAEError, match="text encoder"):
        load_vae(tmp_path / "clip_l.safetensors")
    good = (root / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(VAEError, match="truncated or corrupt"):
        load_vae(tmp_path / "cut.safetensors")
    torch.save(model.state_dict(), tmp_path / "cut.ckpt")
    data = (tmp_path / "cut.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(VAEError, match="truncated or corrupt"):
        load_vae(tmp_path / "cut.ckpt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VAEError, match="unknown weights format"):
        load_vae(tmp_path / "notes.txt")
    with pytest.raises(VAEError, match="not found"):
        load_vae(tmp_path / "missing.safetensors")
    sd = dict(model.state_dict())
    sd.pop("decoder.conv_out.weight")
    with pytest.raises(VAEError, match="missing"):
        load_vae(sd)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    import pickle

    _Evil.marker = str(tmp_path / "pwned")
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"encoder.conv_in.weight": _Evil()}}, f)
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    for name in ("evil.ckpt", "evil.pt"):
        with pytest.raises(VAEError, match="refused.*weights_only"):
            load_vae(tmp_path / name)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ hub
def test_hub_reference_resolves_from_local_cache_offline(small, tmp_path, monkeypatch):
    """hf: sources go through huggingface_hub; here (no network) through its offline cache path."""
    model, root = small
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--acme--tiny-vae" / "snapshots" / commit / "vae"
    snap.mkdir(parents=True)
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):
        (snap / f).write_bytes((root / "vae" / f).read_bytes())
    (cache / "models--acme--tiny-vae" / "refs").mkdir()
    (cache / "models--acme--tiny-vae" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    x = images(1, 16, 16)
    vae = load_vae("hf:acme/tiny-vae/vae")
    assert_close(vae.encode(x), ref_encode(model, x))
    vae = load_vae(f"hf:acme/tiny-vae/vae/diffusion_pytorch_model.safetensors@{commit}")
    assert vae.family == "kl"
    with pytest.raises(VAEError, match="HF_HUB_OFFLINE|local Hugging Face cache"):
        load_vae("hf:acme/not-cached/vae")
    with pytest.raises(VAEError, match="bad Hub reference"):
        load_vae("hf:nonsense")


def test_generic_file_names_take_the_folder_name_as_hint(small, tmp_path):
    """`ae.safetensors` or `model.safetensors` say nothing; the folder holding them names the model."""
    _, root = small
    data = (root / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "sdxl-vae").mkdir()
    (tmp_path / "sdxl-vae" / "model.safetensors").write_bytes(data)
    (tmp_path / "xl_stuff").mkdir()
    (tmp_path / "xl_stuff" / "my_sd15_vae.safetensors").write_bytes(data)
    assert load_vae(tmp_path / "sdxl-vae" / "model.safetensors").variant == "sdxl"
    assert load_vae(tmp_path / "xl_stuff" / "my_sd15_vae.safetensors").variant == "sd1"  # a specific name wins


@pytest.mark.parametrize("band", [None, 2000])
def test_flat_maps_match_diffusers(band, monkeypatch):
    """A constant image makes feature maps whose variance is tiny against their mean: GroupNorm statistics must not
    cancel there (a one-pass E[x²] - E[x]² lost 0.06 on this case). ``band``: every norm -> conv pair runs fused in
    bands of rows (ops.norm_conv, on large maps only by default), here a few rows each with an uneven last band."""
    from diffusers import AutoencoderKL as Ref

    from vae_core import ops

    calls = []
    if band is not None:
        monkeypatch.setattr(ops, "BAND_ELEMENTS", band)
        monkeypatch.setattr(ops, "BAND_MACS", 1)  # these 32- and 64-channel convs are under the default
        real = ops.band_conv
        monkeypatch.setattr(ops, "band_conv", lambda *a, **k: calls.append(a[0].s) or real(*a, **k))
    torch.manual_seed(0)
    ref = Ref(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, layers_per_block=1).eval()
    from vae_core import kl
    ours = kl.build({**kl.infer_config(ref.state_dict()), "norm_num_groups": 32})
    ours.load_state_dict(ref.state_dict())
    # a flat map's GroupNorm multiplies rounding by 1/sqrt(eps): the other summation order of a band's conv shows
    # at 1e-4 in float32; in float64 the banded network equals diffusers'
    ref64, ours64 = copy.deepcopy(ref).double(), copy.deepcopy(ours).double()
    for x in (torch.zeros(1, 3, 32, 32), torch.rand(2, 3, 44, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1):
        with torch.no_grad():
            want = ref.decode(ref.encode(x).latent_dist.mean).sample
            got = ours.decode(ours.encode(x)[0])
            want64 = ref64.decode(ref64.encode(x.double()).latent_dist.mean).sample
            got64 = ours64.decode(ours64.encode(x.double())[0])
        assert (got - want).abs().max().item() < (2e-4 if band else 1e-4)
        assert (got64 - want64).abs().max().item() < 1e-9
    if band is not None:
        assert ops.band_rows(torch.zeros(1, 32, 44, 28)) < 44  # the fused path really ran in several bands
        assert (1, 1) in calls and (2, 2) in calls  # plain and strided (the downsampler's right/bottom padding)
