"""The nodes inside a real ComfyUI 0.3.75 server, driven over its HTTP API.

The test process writes seeded random-weight VAEs (diffusers folder, single file with diffusers names, original
ldm layout; the asymmetric VAE; the real TAEF2 pair from ../shared) into the server's model folders, runs
API-format prompts through /prompt and compares what comes back with vae_core run here on the same files.

Lossless readback: images are sent through core ``VAEEncode`` with the core ``pixel_space`` VAE (which returns
image * 2 - 1 unchanged) into ``SaveLatent``, so they come back as float32 safetensors, not 8-bit PNGs.
"""
from __future__ import annotations

import importlib.util
import json
import time
import re
import shutil
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from comfy_host import HOST_DIR, collect_ws, execution_error
from conftest import PHOTO, TAESD_WEIGHTS, require_file
from vae_core import load_vae

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
SIZE = 32  # test image edge in pixels (the machine is small and shared)
KL_SMALL = {"block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "latent_channels": 4, "norm_num_groups": 32,
            "layers_per_block": 1}
ASYM_SMALL = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
              "down_block_out_channels": [32, 32, 64, 64], "layers_per_down_block": 1,
              "up_block_types": ["UpDecoderBlock2D"] * 4, "up_block_out_channels": [32, 64, 64, 64],
              "layers_per_up_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
              "sample_size": 32, "scaling_factor": 0.18215}
DC_SMALL = {"in_channels": 3, "latent_channels": 8, "attention_head_dim": 8,
            "encoder_block_types": ("ResBlock", "EfficientViTBlock"),
            "decoder_block_types": ("ResBlock", "EfficientViTBlock"),
            "encoder_block_out_channels": (16, 32), "decoder_block_out_channels": (16, 32),
            "encoder_layers_per_block": (1, 1), "decoder_layers_per_block": (1, 1),
            "encoder_qkv_multiscales": ((), (5,)), "decoder_qkv_multiscales": ((), (5,)),
            "upsample_block_type": "interpolate", "downsample_block_type": "conv", "decoder_norm_types": "rms_norm",
            "decoder_act_fns": "silu", "scaling_factor": 0.41407}
# What the core VAELoader can build from an ldm file: ch 128, ch_mult [1, 2, 4] (it has no config input).
KL_CORE_SHAPED = {"block_out_channels": (128, 256, 512), "down_block_types": ("DownEncoderBlock2D",) * 3,
                  "up_block_types": ("UpDecoderBlock2D",) * 3, "latent_channels": 4, "norm_num_groups": 32,
                  "layers_per_block": 2}


def _perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # GroupNorm affines and biases matter too
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _to_ldm(sd: dict) -> dict:
    """diffusers -> original ldm names, with ComfyUI's own converter (an independent oracle for the ldm format)."""
    spec = importlib.util.spec_from_file_location("comfy_diffusers_convert", HOST_DIR / "comfy" / "diffusers_convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    out = {}
    for k, v in mod.convert_vae_state_dict(dict(sd)).items():
        # ComfyUI's converter assumes 4 up blocks (up.{3-i}); ldm numbers them up.{n-1-i}
        m = re.match(r"^decoder\.up\.(\d+)\.(.*)$", k)
        out[f"decoder.up.{int(m.group(1)) - (4 - n_up)}.{m.group(2)}" if m else k] = v.contiguous()
    return out


# ------------------------------------------------------------------------------------------------ fixtures
class Models:
    """Names of the files written into the host's model folders, and the paths vae_core loads them from."""


@pytest.fixture(scope="module")
def host(comfy_host):
    return comfy_host


@pytest.fixture(scope="module")
def models(host):
    vae_dir = host.base / "models" / "vae"
    approx = host.base / "models" / "vae_approx"
    m = Models()
    torch.manual_seed(0)
    kl = _perturb(diffusers.AutoencoderKL(**KL_SMALL), 1)
    kl.save_pretrained(vae_dir / "kl_diffusers")
    save_file({k: v.contiguous() for k, v in kl.state_dict().items()}, vae_dir / "kl_single.safetensors")
    save_file(_to_ldm(kl.state_dict()), vae_dir / "kl_ldm.safetensors")
    m.kl = {"kl_diffusers/": vae_dir / "kl_diffusers", "kl_single.safetensors": vae_dir / "kl_single.safetensors",
            "kl_ldm.safetensors": vae_dir / "kl_ldm.safetensors"}

    torch.manual_seed(0)
    asym = _perturb(diffusers.AsymmetricAutoencoderKL(**ASYM_SMALL), 2)
    asym.save_pretrained(vae_dir / "asym_diffusers")
    m.asym = vae_dir / "asym_diffusers"

    torch.manual_seed(0)
    _perturb(diffusers.AutoencoderDC(**DC_SMALL), 4).save_pretrained(vae_dir / "dc_diffusers")
    m.dc = vae_dir / "dc_diffusers"

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.time_embed.0.weight": torch.zeros(8, 4)}, vae_dir / "not_a_vae.safetensors")

    for part in ("encoder", "decoder"):
        shutil.copy(require_file(TAESD_WEIGHTS / f"taef2_{part}.pth"), approx / f"taef2_{part}.pth")
    (approx / "solo").mkdir(exist_ok=True)
    shutil.copy(TAESD_WEIGHTS / "taef2_decoder.pth", approx / "solo" / "taef2_decoder.pth")
    m.taef2 = (approx / "taef2_encoder.pth", approx / "taef2_decoder.pth")

    img = Image.open(require_file(PHOTO)).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    img.save(host.base / "input" / "photo64.png")
    m.photo = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    # an inpainting mask in the red channel: a square hole in the middle
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[8:24, 10:22, 0] = 255
    Image.fromarray(mask).save(host.base / "input" / "mask64.png")
    m.mask = torch.from_numpy(mask[..., 0].astype(np.float32) / 255.0)[None, None]
    return m


# ------------------------------------------------------------------------------------------------ graph helpers
class G:
    """A tiny API-format prompt builder: ``g.add(class, **inputs) -> node id``; ``g[id, slot]`` is a link."""

    def __init__(self):
        self.p: dict = {}

    def add(self, cls: str, **inputs) -> str:
        nid = str(len(self.p) + 1)
        self.p[nid] = {"class_type": cls, "inputs": inputs}
        return nid

    def photo(self) -> list:
        return [self.add("LoadImage", image="photo64.png"), 0]

    def mask(self) -> list:
        return [self.add("LoadImageMask", image="mask64.png", channel="red"), 0]

    def save_latent(self, latent: list) -> str:
        return self.add("SaveLatent", samples=latent, filename_prefix=f"t/{uuid.uuid4().hex[:8]}")

    def save_image(self, image: list) -> str:
        """Lossless: IMAGE -> pixel_space VAE encode (image*2-1) -> SaveLatent."""
        px = [self.add("VAELoader", vae_name="pixel_space"), 0]
        return self.save_latent([self.add("VAEEncode", pixels=image, vae=px), 0])


def saved(host, entry: dict, node: str) -> torch.Tensor:
    ref = entry["outputs"][node]["latents"][0]
    return load_file(host.base / "output" / ref["subfolder"] / ref["filename"])["latent_tensor"]


def saved_image(host, entry, node) -> torch.Tensor:
    """-> [B,3,H,W] in [-1, 1] (the IMAGE in vae_core's convention)."""
    return saved(host, entry, node)


def ours(g: G, name: str, **kw) -> list:
    return [g.add("VAESuiteLoader", vae_name=name, **kw), 0]


def expect_error(host, prompt: dict, *needles: str) -> str:
    entry = host.wait(host.queue(prompt))
    err = execution_error(entry)
    assert err is not None, f"expected an execution_error, got status {entry.get('status')}"
    msg = err["exception_message"]
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in the error message: {msg}"
    assert "Traceback" not in msg and len(msg) < 600, msg
    return msg


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    d = float((a.float() - b.float()).abs().max())
    assert d <= tol, f"max abs diff {d} > {tol}"
    return d


# ------------------------------------------------------------------------------------------------ tests
def test_pack_loads_and_declares_its_nodes(host):
    assert "IMPORT FAILED" not in host.log()
    info = host.object_info()
    for node in ("VAESuiteLoader", "VAESuiteEncode", "VAESuiteDecodeTiled", "VAESuiteAsymInpaintDecode"):
        d = info[node]
        assert d["category"] == "VAE Suite" and d["description"], node
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    ints = info["VAESuiteDecodeTiled"]["input"]["required"]
    assert ints["tile_size"][0] == "INT" and ints["overlap"][0] == "INT"


def test_loader_lists_files_folders_and_taesd_pairs(host, models):
    names = host.object_info("VAESuiteLoader")["VAESuiteLoader"]["input"]["required"]["vae_name"][0]
    for n in ("kl_single.safetensors", "kl_ldm.safetensors", "kl_diffusers/", "asym_diffusers/",
              "vae_approx/taef2", "vae_approx/solo/taef2_decoder.pth"):
        assert n in names, (n, names)
    assert "vae_approx/taef2_encoder.pth" not in names  # the pair is one entry
    assert not any(n.startswith("kl_diffusers/") and n != "kl_diffusers/" for n in names)


@pytest.mark.parametrize("name", ["kl_diffusers/", "kl_single.safetensors", "kl_ldm.safetensors"])
def test_kl_in_core_encode_decode_matches_vae_core(host, models, name):
    """Our VAE into core VAE Encode and VAE Decode, from each format."""
    ref = load_vae(models.kl[name])
    z_ref = ref.encode(models.photo)
    g = G()
    vae = ours(g, name)
    z = [g.add("VAEEncode", pixels=g.photo(), vae=vae), 0]
    n_z = g.save_latent(z)
    n_x = g.save_image([g.add("VAEDecode", samples=z, vae=vae), 0])
    e = host.run(g.p)
    close(saved(host, e, n_z), z_ref)
    close(saved_image(host, e, n_x), ref.decode(z_ref).clamp(-1, 1))


def test_kl_in_core_tiled_nodes(host, models):
    """Our VAE into core VAE Decode (Tiled) and VAE Encode (Tiled): ComfyUI's tiler runs our adapter per tile."""
    ref = load_vae(models.kl["kl_single.safetensors"])
    z_ref = ref.encode(models.photo)
    g = G()
    vae, img = ours(g, "kl_single.safetensors"), g.photo()
    z = [g.add("VAEEncode", pixels=img, vae=vae), 0]
    tiled = dict(temporal_size=64, temporal_overlap=8)
    # tiles larger than the image: one call per pass, must equal the untiled run
    n_xt = g.save_image([g.add("VAEDecodeTiled", samples=z, vae=vae, tile_size=256, overlap=64, **tiled), 0])
    n_zt = g.save_latent([g.add("VAEEncodeTiled", pixels=img, vae=vae, tile_size=256, overlap=64, **tiled), 0])
    # a 96 px image with 64 px tiles: several tiles per pass
    big = [g.add("ImageScale", image=img, upscale_method="nearest-exact", width=96, height=96, crop="disabled"), 0]
    n_xs = g.save_image([g.add("VAEDecodeTiled", samples=[g.add("VAEEncode", pixels=big, vae=vae), 0], vae=vae,
                               tile_size=64, overlap=32, **tiled), 0])
    e = host.run(g.p)
    close(saved_image(host, e, n_xt), ref.decode(z_ref).clamp(-1, 1))
    close(saved(host, e, n_zt), z_ref)
    xs = saved_image(host, e, n_xs)
    assert xs.shape == (1, 3, 96, 96) and torch.isfinite(xs).all()


def test_kl_core_inpaint_encode(host, models):
    ref = load_vae(models.kl["kl_single.safetensors"])
    hole = models.mask.round()
    grey = models.photo * (1 - hole)  # VAEEncodeForInpaint sets the hole to 0.5 grey (0 in [-1, 1])
    g = G()
    lat = [g.add("VAEEncodeForInpaint", pixels=g.photo(), vae=ours(g, "kl_single.safetensors"), mask=g.mask(),
                 grow_mask_by=6), 0]
    n = g.save_latent(lat)
    e = host.run(g.p)
    close(saved(host, e, n), ref.encode(grey))


def test_our_encode_and_decode_tiled(host, models):
    ref = load_vae(models.kl["kl_ldm.safetensors"])
    z_ref = ref.encode(models.photo)
    g = G()
    vae, img = ours(g, "kl_ldm.safetensors"), g.photo()
    z = [g.add("VAESuiteEncode", pixels=img, vae=vae, latent="mean", seed=0, tiling="never", tile_size=512,
               overlap=64), 0]
    s1 = g.add("VAESuiteEncode", pixels=img, vae=vae, latent="sample", seed=7, tiling="never", tile_size=512,
               overlap=64)
    s2 = g.add("VAESuiteEncode", pixels=img, vae=vae, latent="sample", seed=7, tiling="never", tile_size=512,
               overlap=64, mask=g.mask())
    n_z, n_s1, n_s2 = g.save_latent(z), g.save_latent([s1, 0]), g.save_latent([s2, 0])
    dec = g.add("VAESuiteDecodeTiled", samples=z, vae=vae, tiling="never", tile_size=512, overlap=64)
    n_x = g.save_image([dec, 0])
    n_core = g.save_image([g.add("VAEDecode", samples=z, vae=vae), 0])
    e = host.run(g.p)
    # the tile widget's "last run" size comes back as the node's ui output
    info = e["outputs"][dec]["vae_suite_tiles"][0]
    assert (info["height"], info["width"]) == tuple(models.photo.shape[-2:]) and info["family"] == "kl"
    close(saved(host, e, n_z), z_ref)
    close(saved_image(host, e, n_x), ref.decode(z_ref).clamp(-1, 1))
    close(saved_image(host, e, n_x), saved_image(host, e, n_core))
    a, b = saved(host, e, n_s1), saved(host, e, n_s2)
    assert torch.equal(a, b)  # same seed, same sample (the mask only adds noise_mask)
    assert float((a - z_ref).abs().mean()) > 1e-3  # a sample, not the mean


def test_core_vae_into_our_decode_tiled(host, models):
    """A VAE from the core VAELoader is rebuilt from its state dict and decoded by our engine."""
    torch.manual_seed(0)
    big = _perturb(diffusers.AutoencoderKL(**KL_CORE_SHAPED), 3)
    path = host.base / "models" / "vae" / "kl_core_shaped.safetensors"
    save_file({k: v.half() for k, v in _to_ldm(big.state_dict()).items()}, path)
    del big
    ref = load_vae(path)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    (host.base / "input").mkdir(exist_ok=True)
    save_file({"latent_tensor": z, "latent_format_version_0": torch.tensor([])}, host.base / "input" / "z16.latent")
    g = G()
    core_vae = [g.add("VAELoader", vae_name="kl_core_shaped.safetensors"), 0]
    lat = [g.add("LoadLatent", latent="z16.latent"), 0]
    n_ours = g.save_image([g.add("VAESuiteDecodeTiled", samples=lat, vae=core_vae, tiling="never", tile_size=512,
                                 overlap=64), 0])
    n_core = g.save_image([g.add("VAEDecode", samples=lat, vae=core_vae), 0])
    e = host.run(g.p)
    x_ours = saved_image(host, e, n_ours)
    close(x_ours, ref.decode(z).clamp(-1, 1))
    close(x_ours, saved_image(host, e, n_core), 1e-3)  # ComfyUI's own decoder of the same weights
    path.unlink()


def test_asym_inpaint_decode(host, models):
    ref = load_vae(models.asym)
    z_ref = ref.encode(models.photo)
    x_ref = ref.decode(z_ref, image=models.photo, mask=models.mask).clamp(-1, 1)
    g = G()
    vae, img, mask = ours(g, "asym_diffusers/"), g.photo(), g.mask()
    z = [g.add("VAEEncode", pixels=img, vae=vae), 0]
    n_x = g.save_image([g.add("VAESuiteAsymInpaintDecode", samples=z, vae=vae, image=img, mask=mask,
                              tiling="never", tile_size=512, overlap=64), 0])
    n_plain = g.save_image([g.add("VAEDecode", samples=z, vae=vae), 0])
    e = host.run(g.p)
    close(saved_image(host, e, n_x), x_ref)
    close(saved_image(host, e, n_plain), ref.decode(z_ref).clamp(-1, 1))


def test_taef2_pair_in_our_and_core_nodes(host, models):
    ref = load_vae(models.taef2)
    z_ref = ref.encode(models.photo)
    x_ref = ref.decode(z_ref).clamp(-1, 1)
    g = G()
    vae, img = ours(g, "vae_approx/taef2"), g.photo()
    z = [g.add("VAESuiteEncode", pixels=img, vae=vae, latent="mean", seed=0, tiling="never", tile_size=512,
               overlap=64), 0]
    n_z = g.save_latent(z)
    n_x = g.save_image([g.add("VAESuiteDecodeTiled", samples=z, vae=vae, tiling="never", tile_size=512,
                              overlap=64), 0])
    n_core = g.save_image([g.add("VAEDecode", samples=[g.add("VAEEncode", pixels=img, vae=vae), 0], vae=vae), 0])
    solo = ours(g, "vae_approx/solo/taef2_decoder.pth")
    n_solo = g.save_image([g.add("VAEDecode", samples=z, vae=solo), 0])
    e = host.run(g.p)
    assert saved(host, e, n_z).shape == (1, 32, SIZE // 8, SIZE // 8)
    close(saved(host, e, n_z), z_ref)
    close(saved_image(host, e, n_x), x_ref)
    close(saved_image(host, e, n_core), x_ref)
    close(saved_image(host, e, n_solo), x_ref)


def test_dc_in_core_and_our_nodes(host, models):
    ref = load_vae(models.dc)
    assert ref.family == "dc"
    z_ref = ref.encode(models.photo)
    x_ref = ref.decode(z_ref).clamp(-1, 1)
    g = G()
    vae, img = ours(g, "dc_diffusers/"), g.photo()
    z = [g.add("VAEEncode", pixels=img, vae=vae), 0]
    n_z = g.save_latent(z)
    n_x = g.save_image([g.add("VAEDecode", samples=z, vae=vae), 0])
    n_ours = g.save_image([g.add("VAESuiteDecodeTiled", samples=[g.add(
        "VAESuiteEncode", pixels=img, vae=vae, latent="mean", seed=0, tiling="auto", tile_size=512, overlap=64), 0],
        vae=vae, tiling="auto", tile_size=512, overlap=64), 0])
    e = host.run(g.p)
    close(saved(host, e, n_z), z_ref)
    close(saved_image(host, e, n_x), x_ref)
    close(saved_image(host, e, n_ours), x_ref)


def test_errors_are_clear_and_the_server_stays_up(host, models):
    g = G()
    dec = g.add("VAESuiteDecodeTiled", samples=[g.add("EmptyLatentImage", width=64, height=64, batch_size=1), 0],
                vae=ours(g, "not_a_vae.safetensors"), tiling="never", tile_size=512, overlap=64)
    g.add("PreviewImage", images=[dec, 0])
    expect_error(host, g.p, "not_a_vae.safetensors", "not a VAE")

    z16 = torch.randn(1, 16, 8, 8)
    save_file({"latent_tensor": z16, "latent_format_version_0": torch.tensor([])}, host.base / "input" / "z16ch.latent")
    g = G()
    dec = g.add("VAESuiteDecodeTiled", samples=[g.add("LoadLatent", latent="z16ch.latent"), 0],
                vae=ours(g, "kl_single.safetensors"), tiling="never", tile_size=512, overlap=64)
    g.add("PreviewImage", images=[dec, 0])
    expect_error(host, g.p, "16 channels", "expects 4")

    g = G()
    vae = ours(g, "asym_diffusers/")
    small = [g.add("SolidMask", value=1.0, width=16, height=16), 0]
    img = g.photo()
    dec = g.add("VAESuiteAsymInpaintDecode", samples=[g.add("VAEEncode", pixels=img, vae=vae), 0], vae=vae,
                image=img, mask=small, tiling="never", tile_size=512, overlap=64)
    g.add("PreviewImage", images=[dec, 0])
    expect_error(host, g.p, "MASK is 16x16", "32x32")

    g = G()
    vae = ours(g, "kl_single.safetensors")
    img = g.photo()
    dec = g.add("VAESuiteAsymInpaintDecode", samples=[g.add("VAEEncode", pixels=img, vae=vae), 0], vae=vae,
                image=img, mask=g.mask(), tiling="never", tile_size=512, overlap=64)
    g.add("PreviewImage", images=[dec, 0])
    expect_error(host, g.p, "asymmetric", "kl")

    g = G()
    z = g.add("VAEEncode", pixels=g.photo(), vae=ours(g, "vae_approx/solo/taef2_decoder.pth"))
    g.save_latent([z, 0])
    expect_error(host, g.p, "without an encoder")

    g = G()  # a Hub source while the host is offline (HF_HUB_OFFLINE=1 in tests) and not cached
    g.save_latent([g.add("VAEEncode", pixels=g.photo(), vae=ours(g, "(hf_source below)",
                                                                 hf_source="hf:vae-suite-test/none")), 0])
    expect_error(host, g.p, "hf:vae-suite-test/none")

    # the server is still up and runs the next prompt
    g = G()
    vae = ours(g, "kl_single.safetensors")
    n = g.save_latent([g.add("VAEEncode", pixels=g.photo(), vae=vae), 0])
    e = host.run(g.p)
    assert saved(host, e, n).shape == (1, 4, SIZE // 2, SIZE // 2)


def test_tile_plan_route(host):
    r = host.get("/vae_suite/tile_plan", params={"width": 1024, "height": 768, "tile_size": 512, "overlap": 64})
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["count"] == plan["rows"] * plan["cols"] == len(plan["tiles"]) and plan["tiled"]
    xs = {t[0] for t in plan["tiles"]} | {t[2] for t in plan["tiles"]}
    assert min(xs) == 0 and max(xs) == 1024
    r = host.get("/api/vae_suite/tile_plan", params={"width": "wide", "height": 64})
    assert r.status_code == 400 and "width" in r.json()["error"]


def _latent_file(host, name: str, z: torch.Tensor) -> str:
    save_file({"latent_tensor": z.contiguous(), "latent_format_version_0": torch.tensor([])},
              host.base / "input" / name)
    return name


def test_our_tiled_decode_reports_progress_per_tile_and_is_exact(host, models):
    ref = load_vae(models.kl["kl_single.safetensors"])
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(11))  # a 96x96 image
    g = G()
    dec = g.add("VAESuiteDecodeTiled", samples=[g.add("LoadLatent", latent=_latent_file(host, "z48.latent", z)), 0],
                vae=ours(g, "kl_single.safetensors"), tiling="always", tile_size=64, overlap=16)
    n_x = g.save_image([dec, 0])
    cid = uuid.uuid4().hex
    ws = host.websocket(cid)
    try:
        pid = host.queue(g.p, client_id=cid)
        msgs, _ = collect_ws(ws, pid, timeout=300)
    finally:
        ws.close()
    assert not [m for m in msgs if m["type"] == "execution_error"], msgs[-3:]
    prog = [m["data"] for m in msgs if m["type"] == "progress" and m["data"].get("node") == dec]
    assert len(prog) >= 4 and prog[-1]["value"] == prog[-1]["max"] >= 4, prog[-3:]  # a 2x2 grid, per sweep
    assert [p["value"] for p in prog] == sorted(p["value"] for p in prog)
    x = saved_image(host, host.wait(pid), n_x)
    d = close(x, ref.decode(z).clamp(-1, 1), 1e-3)  # vae_core's tiling is exact
    print(f"tiled decode: {len(prog)} progress messages (max {prog[-1]['max']}), max abs diff vs untiled {d:.2e}")


def test_interrupt_stops_a_long_tiled_decode(host, models):
    z = torch.randn(1, 4, 160, 160, generator=torch.Generator().manual_seed(12))  # a 320x320 image, 25 tiles per sweep
    g = G()
    dec = g.add("VAESuiteDecodeTiled", samples=[g.add("LoadLatent", latent=_latent_file(host, "z160.latent", z)), 0],
                vae=ours(g, "kl_single.safetensors"), tiling="always", tile_size=64, overlap=0)
    g.add("PreviewImage", images=[dec, 0])
    cid = uuid.uuid4().hex
    ws = host.websocket(cid)
    try:
        pid = host.queue(g.p, client_id=cid)
        ws.settimeout(120)
        first = None
        while first is None:
            m = json.loads(ws.recv())
            assert m["type"] not in ("execution_error", "execution_success"), m
            if m["type"] == "progress" and m["data"].get("node") == dec:
                first = m["data"]
        assert first["value"] < first["max"]
        t0 = time.time()
        host.post("/interrupt", {})
        msgs, _ = collect_ws(ws, pid, timeout=60)
        elapsed = time.time() - t0
    finally:
        ws.close()
    kinds = [m["type"] for m in msgs]
    assert "execution_interrupted" in kinds, kinds[-5:]
    print(f"interrupt: stopped {elapsed:.2f}s after POST /interrupt (first progress {first})")
    assert elapsed < 10, f"the decode took {elapsed:.1f}s to stop"
    last = max((m["data"]["value"] for m in msgs if m["type"] == "progress" and m["data"].get("node") == dec),
               default=first["value"])
    assert last < first["max"], "the decode ran to the end"
    # and the next prompt runs
    g = G()
    n = g.save_latent([g.add("VAEEncode", pixels=g.photo(), vae=ours(g, "kl_single.safetensors")), 0])
    assert saved(host, host.run(g.p), n).shape == (1, 4, SIZE // 2, SIZE // 2)
