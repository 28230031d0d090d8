"""AutoencoderDC (DC-AE / SANA): parity with diffusers at every released architecture, from both formats.

The four released architectures (sana f32c32; in/mix f32c32, f64c128, f128c512: in and mix share one
architecture, sana-1.0 and 1.1 too) are built in diffusers at their real configs with deterministic weights
(norms and BatchNorm statistics perturbed too), run on tiny images that still reach both the linear
(> 32 tokens) and the quadratic attention paths, then loaded with vae_core:
- diffusers format: folder (config.json), single file, in-memory state dict;
- original mit-han-lab format: made from the diffusers weights by the inverse key map below, which is checked
  against diffusers' own single-file converter (it must give back the diffusers state dict exactly).
"""
from __future__ import annotations

import copy
import gc
import re

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderDC as DiffusersDC  # noqa: E402
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers  # noqa: E402

from vae_core import VAEError, load_vae  # noqa: E402
from vae_core import dc, ops  # noqa: E402

# architecture -> (variant diffusers' single-file loader assumes, image size)
ARCHS = {
    "sana": ("dc-ae-f32c32-sana-1.0", (64, 96)),  # stage 3: 8x12 tokens (linear), stages 4-5 quadratic
    "f32": ("dc-ae-f32c32-mix-1.0", (64, 64)),
    "f64": ("dc-ae-f64c128-mix-1.0", (128, 64)),
    "f128": ("dc-ae-f128c512-mix-1.0", (128, 128)),  # stages 3-4 linear, 5-7 quadratic
}
BATCH = {"sana": 1, "f32": 2, "f64": 1, "f128": 1}
TOL = 1e-4


def diffusers_config(variant: str) -> dict:
    return {k: v for k, v in dc.VARIANTS[variant].items() if k != "force_upcast"}


def meta_model(variant: str) -> DiffusersDC:
    with torch.device("meta"):
        return DiffusersDC(**diffusers_config(variant))


_P = 1_000_003  # prime period of the fill pattern: no two rows of a weight get the same values


def deterministic_model(variant: str, seed: int = 0) -> DiffusersDC:
    """diffusers' model at the released config with seeded weights, filled fast (no random init of 1B params)."""
    model = meta_model(variant).to_empty(device="cpu").eval()
    pattern = torch.rand(_P, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        for i, (key, t) in enumerate(model.state_dict().items()):
            if not t.is_floating_point():
                t.zero_()
                continue
            flat, pos, off = t.view(-1), 0, (i * 7919) % _P
            while pos < flat.numel():
                m = min(flat.numel() - pos, _P - off)
                flat[pos:pos + m] = pattern[off:off + m]
                pos, off = pos + m, 0
            if key.endswith("running_var"):
                t.mul_(0.25).add_(1.0)
            elif "norm" in key and key.endswith("weight"):
                t.mul_(0.2).add_(1.0)
            elif t.ndim == 1:
                t.mul_(0.1)
            else:
                t.mul_(t[0].numel() ** -0.5)  # the bound of PyTorch's default init
    return model


# ------------------------------------------------------------------------------------------------ original format
def to_original(sd: dict[str, torch.Tensor], conv_stem: bool) -> dict[str, torch.Tensor]:
    """diffusers names -> mit-han-lab (efficientvit DCAE) names; the fused qkv conv is rebuilt from to_q/k/v."""
    block = [
        (r"^\.conv1\.(weight|bias)$", r".main.conv1.conv.\1"),
        (r"^\.conv2\.weight$", r".main.conv2.conv.weight"),
        (r"^\.norm\.(\w+)$", r".main.conv2.norm.\1"),
        (r"^\.attn\.to_qkv_multiscale\.0\.proj_in\.weight$", r".context_module.main.aggreg.0.0.weight"),
        (r"^\.attn\.to_qkv_multiscale\.0\.proj_out\.weight$", r".context_module.main.aggreg.0.1.weight"),
        (r"^\.attn\.to_out\.weight$", r".context_module.main.proj.conv.weight"),
        (r"^\.attn\.norm_out\.(\w+)$", r".context_module.main.proj.norm.\1"),
        (r"^\.conv_out\.conv_inverted\.(\w+)$", r".local_module.main.inverted_conv.conv.\1"),
        (r"^\.conv_out\.conv_depth\.(\w+)$", r".local_module.main.depth_conv.conv.\1"),
        (r"^\.conv_out\.conv_point\.weight$", r".local_module.main.point_conv.conv.weight"),
        (r"^\.conv_out\.norm\.(\w+)$", r".local_module.main.point_conv.norm.\1"),
        # resamplers: stride conv = ConvLayer; pixel (un)shuffle / interpolate layers wrap a ConvLayer
        (r"^\.conv\.(weight|bias)$", r".main.conv.conv.\1" if not conv_stem else r".main.conv.\1"),
    ]
    out = {}
    for key, t in sd.items():
        if re.search(r"\.attn\.to_[kv]\.weight$", key):
            continue
        if m := re.match(r"(.*)\.attn\.to_q\.weight$", key):
            out[_stage_key(m.group(1)) + ".context_module.main.qkv.conv.weight"] = torch.cat(
                [t, sd[key.replace("to_q", "to_k")], sd[key.replace("to_q", "to_v")]])[:, :, None, None]
            continue
        if key.endswith("attn.to_out.weight"):
            t = t[:, :, None, None]
        if m := re.match(r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(\d+)(\..*)$", key):
            rest = m.group(4)
            if m.group(1) == "decoder.up_blocks" and re.match(r"\.conv\.(weight|bias)$", rest):
                rest = re.sub(r"\.conv\.(\w+)$", r".main.conv.conv.\1", rest)  # upsamplers always wrap a ConvLayer
            else:
                for pattern, repl in block:
                    if re.search(pattern, rest):
                        rest = re.sub(pattern, repl, rest)
                        break
            out[_stage_key(f"{m.group(1)}.{m.group(2)}.{m.group(3)}") + rest] = t
            continue
        fixed = {
            "encoder.conv_in.": "encoder.project_in.conv.",
            "encoder.conv_in.conv.": "encoder.project_in.conv.conv.",
            "encoder.conv_out.": "encoder.project_out.main.op_list.0.conv.",
            "decoder.conv_in.": "decoder.project_in.main.conv.",
            "decoder.norm_out.": "decoder.project_out.op_list.0.",
            "decoder.conv_out.": "decoder.project_out.op_list.2.conv.",
            "decoder.conv_out.conv.": "decoder.project_out.op_list.2.conv.conv.",
        }
        prefix = max((p for p in fixed if key.startswith(p) and key[len(p):].count(".") == 0), key=len)
        out[fixed[prefix] + key[len(prefix):]] = t
    return out


def _stage_key(p: str) -> str:
    m = re.match(r"(encoder|decoder)\.(?:down_blocks|up_blocks)\.(\d+)\.(\d+)$", p)
    return f"{m.group(1)}.stages.{m.group(2)}.op_list.{m.group(3)}"


# ------------------------------------------------------------------------------------------------ fixtures
class Ref:
    def __init__(self, arch: str):
        self.arch = arch
        self.variant, (h, w) = ARCHS[arch]
        self.model = deterministic_model(self.variant)
        self.sd = self.model.state_dict()
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(BATCH[arch], 3, h, w, generator=g) * 2 - 1
        if arch == "sana":  # a 45x70 image, replicate-padded as vae.VAE pads it (see the padding test)
            self.images = torch.nn.functional.pad(self.images[..., :45, :70], (0, w - 70, 0, h - 45), mode="replicate")
        f = self.model.spatial_compression_ratio
        self.noise = torch.randn(BATCH[arch], self.model.config.latent_channels, h // f, w // f, generator=g)
        with torch.inference_mode():
            self.latents = self.model.encode(self.images).latent
            self.decoded = self.model.decode(self.noise).sample

    def check(self, vae, what: str) -> tuple[float, float]:
        z = vae.encode(self.images)
        x = vae.decode(self.noise)
        assert z.shape == self.latents.shape and x.shape == self.decoded.shape
        dz = (z - self.latents).abs().max().item() / max(1.0, self.latents.abs().max().item())
        dx = (x - self.decoded).abs().max().item() / max(1.0, self.decoded.abs().max().item())
        print(f"{self.arch} {what}: encode max abs diff (rel. to scale) {dz:.2e}, decode {dx:.2e}")
        assert dz <= TOL and dx <= TOL, (what, dz, dx)
        return dz, dx


@pytest.fixture(scope="module", params=list(ARCHS))
def ref(request):
    r = Ref(request.param)
    yield r
    del r
    gc.collect()


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.slow
def test_diffusers_format_parity(ref, tmp_path):
    """Every released architecture, diffusers names: state dict in memory, then a folder / a single file."""
    vae = load_vae(ref.sd)
    assert (vae.family, vae.variant, vae.latent_channels) == ("dc", ref.variant, ref.model.config.latent_channels)
    assert vae.downscale == ref.model.spatial_compression_ratio
    ref.check(vae, "state dict")
    del vae
    if ref.arch == "sana":  # a diffusers folder: built from config.json
        ref.model.save_pretrained(tmp_path / "dc-ae-sana", safe_serialization=True)
        vae = load_vae(tmp_path / "dc-ae-sana")
        assert vae.variant == "dc-ae-f32c32-sana-1.0" and vae.scaling_factor == pytest.approx(0.41407)
        ref.check(vae, "diffusers folder")
    if ref.arch == "f32":  # a single file without config; the name says "in"
        save_file(ref.sd, tmp_path / "dc-ae-f32c32-in-1.0.safetensors")
        vae = load_vae(tmp_path / "dc-ae-f32c32-in-1.0.safetensors")
        assert vae.variant == "dc-ae-f32c32-in-1.0" and vae.scaling_factor == pytest.approx(0.3189)
        ref.check(vae, "single file")


@pytest.mark.slow
def test_original_format_parity(ref, tmp_path):
    """The mit-han-lab single-file format, proven through diffusers' own converter as the oracle."""
    conv_stem = ref.arch == "sana"
    original = to_original(ref.sd, conv_stem)
    assert "decoder.stages.1.op_list.0.main.conv.conv.bias" in original  # diffusers' DC-AE signature
    assert ("encoder.project_in.conv.bias" in original) == conv_stem  # ... and its sana signature
    back = convert_autoencoder_dc_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(ref.sd)
    assert all(torch.equal(back[k], ref.sd[k]) for k in ref.sd)
    del back

    ours = dc.convert(original)  # our table gives the same dict
    assert set(ours) == set(ref.sd) and all(torch.equal(ours[k], ref.sd[k]) for k in ref.sd)
    del ours
    if ref.arch == "sana":  # from a file whose name says sana-1.1
        path = tmp_path / "dc-ae-f32c32-sana-1.1.safetensors"
        save_file({k: v.contiguous() for k, v in original.items()}, path)
        del original
        vae = load_vae(path)
        assert vae.variant == "dc-ae-f32c32-sana-1.1" and vae.scaling_factor == pytest.approx(0.41407)
    else:
        vae = load_vae(original)
        assert vae.variant == ref.variant  # in/mix cannot be told apart: mix, as diffusers
    ref.check(vae, "original format")


# ------------------------------------------------------------------------------------------------ configs, variants
@pytest.mark.parametrize("variant", list(dc.VARIANTS))
def test_infer_config_gives_the_released_config(variant):
    """From the shapes alone (meta tensors), every released config is recovered exactly (bar the scaling)."""
    sd = meta_model(variant).state_dict()
    assert dc.matches(sd)
    config = dc.infer_config(dc.convert(sd))
    preset = dc.VARIANTS[variant]
    for key, value in config.items():
        want = preset.get(key, dc.DEFAULT_CONFIG.get(key))
        if isinstance(want, str) and isinstance(value, list):
            want = [want] * len(value)
        assert value == want, key
    expect = variant.replace("sana-1.1", "sana-1.0").replace("-in-", "-mix-")
    assert dc.guess_variant(sd, config, {}) == expect


@pytest.mark.parametrize("variant", list(dc.VARIANTS))
def test_variant_from_folder_scaling_and_names(variant):
    sd = meta_model(variant).state_dict()
    config = dc.infer_config(sd)
    folder = {**config, "scaling_factor": dc.VARIANTS[variant]["scaling_factor"]}
    name_hint = {"filename": f"{variant}.safetensors"}
    if "sana-1.1" not in variant:  # 1.0 and 1.1 share the scaling: only a name tells them apart
        assert dc.guess_variant(sd, folder, {}) == variant
    assert dc.guess_variant(sd, config, name_hint) == variant
    assert dc.guess_variant(sd, config, {"filename": f"hf:mit-han-lab/{variant}-diffusers model.safetensors"}) == variant


def test_matches_only_dc():
    sana = meta_model("dc-ae-f32c32-sana-1.0").state_dict()
    assert dc.matches(sana) and dc.matches(to_original(sana, True))
    with torch.device("meta"):
        kl = diffusers.AutoencoderKL().state_dict()
        tiny = diffusers.AutoencoderTiny().state_dict()
    assert not dc.matches(kl) and not dc.matches(tiny)


# ------------------------------------------------------------------------------------------------ behaviour, errors
@pytest.fixture(scope="module")
def sana():
    r = Ref("sana")
    yield r
    del r
    gc.collect()


def test_sizes_not_a_multiple_of_32_are_padded(sana):
    vae = load_vae(sana.sd)
    z = vae.encode(sana.images[..., :45, :70])  # the fixture's reference image is this one, replicate-padded
    assert z.shape == (1, 32, 2, 3)
    assert (z - sana.latents).abs().max().item() <= TOL * max(1.0, sana.latents.abs().max().item())
    assert vae.decode(z).shape == (1, 3, 64, 96)  # the padded size; the caller crops


def test_scaling_and_variant_override(sana):
    vae = load_vae(sana.sd, variant="dc-ae-f32c32-sana-1.1")
    assert vae.variant == "dc-ae-f32c32-sana-1.1" and vae.scaling_factor == pytest.approx(0.41407)
    assert vae.shift_factor == 0.0
    z = torch.randn(1, 32, 2, 2)
    assert torch.allclose(vae.to_diffusion(z), z * 0.41407)
    with pytest.raises(VAEError, match="dc-ae-f64c128-mix-1.0"):
        load_vae(sana.sd, variant="dc-ae-f64c128-mix-1.0")  # another architecture: a clear error, not bad scaling
    with pytest.raises(VAEError, match="unknown dc variant"):
        load_vae(sana.sd, variant="dc-ae-f32c32-sana-2.0")


@pytest.mark.parametrize("group", [2, 4, 8, 16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_down_shortcut_equals_unshuffle_then_mean(group, fmt):
    """The down-block shortcut computed from average pools equals diffusers' pixel-unshuffle, then the mean of each
    group of channels, in either layout, and keeps the layout."""
    x = torch.randn(2, 16, 12, 10, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=fmt)
    want = torch.nn.functional.pixel_unshuffle(x, 2).unflatten(1, (-1, group)).mean(dim=2)
    got = ops.PixelUnshuffle(2, group).eager(x, False, None)
    assert got.shape == want.shape and (got - want).abs().max().item() < 1e-6
    assert ops.layout(got) == ops.layout(x) or group > 4


@pytest.mark.slow  # bf16 convolutions are very slow on CPUs without bf16 units (~20-50 s here)
@pytest.mark.parametrize("size", [8, 4])  # 64 tokens: linear attention; 16 tokens: quadratic
def test_bfloat16_block_and_float16_request(sana, size):
    """bf16 keeps the linear attention and RMS statistics in float32. One EfficientViT block (with its multiscale
    branch), as the whole model in bf16 is very slow on CPU."""
    vae = load_vae(sana.sd)
    ours, theirs = vae.model.decoder.up_blocks[3][1], sana.model.decoder.up_blocks[3][1]
    x = torch.randn(1, 512, size, size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = theirs(x)
        assert (ours(x.clone()) - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())
        got = copy.deepcopy(ours).to(torch.bfloat16)(x.to(torch.bfloat16))
        want_bf16 = copy.deepcopy(theirs).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    scale = want.abs().max().item()
    assert (got.float() - want).abs().max().item() / scale < 0.05
    assert (got.float() - want_bf16.float()).abs().max().item() / scale < 0.05
    assert load_vae(sana.sd, dtype=torch.float16).dtype == torch.float32  # force_upcast: SANA's DC-AE is not fp16-safe


def test_bad_inputs(sana):
    vae = load_vae(sana.sd)
    with pytest.raises(VAEError, match="latents have 4 channels.*expects 32"):
        vae.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(VAEError, match=r"\[B,3,H,W\]"):
        vae.encode(torch.zeros(1, 64, 64, 3))
    # a KL VAE asked to load as DC-AE
    with torch.device("meta"):
        kl = diffusers.AutoencoderKL(block_out_channels=[32], norm_num_groups=8)
    kl = kl.to_empty(device="cpu").state_dict()
    with pytest.raises(VAEError, match="'kl' VAE"):
        load_vae(kl, family="dc")
    # incomplete DC-AE weights
    partial = {k: v for k, v in sana.sd.items() if not k.startswith("decoder.up_blocks.3.1.")}
    with pytest.raises(VAEError, match="missing.*decoder.up_blocks.3.1"):
        load_vae(partial)
    # an original-format file with a key that is not DC-AE's
    original = to_original(sana.sd, True)
    original["decoder.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(VAEError, match="unexpected.*decoder.extra_head.weight"):
        load_vae(original)
