"""The FLUX.2 VAE inside a real ComfyUI 0.3.75 server, over HTTP: ours and core's, loaded from the same original
BFL-layout ae.safetensors (seeded weights at the released config, non-trivial BatchNorm statistics), must give the
same FLUX.2 LATENT ([B,128,H/16,W/16], normalised) and the same images in core VAE Encode / VAE Decode /
VAE Decode (Tiled) and in our Encode / Decode Tiled; core's FLUX.2 VAE decodes in our exact tiles as core does
untiled. Images come back losslessly (see test_nodes_host.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from conftest import PHOTO, require_file
from test_nodes_host import G, close, ours, saved, saved_image

diffusers = pytest.importorskip("diffusers")

W, H = 80, 48  # a multiple of 16 (core crops to it); 64 px tiles fall off the 16 px latent grid


@pytest.fixture(scope="module")
def flux2_file(comfy_host):
    from ldm_layout import to_ldm_flux2
    from test_flux2 import flux2_reference

    path = comfy_host.base / "models" / "vae" / "flux2_ae.safetensors"
    save_file({k: v.contiguous() for k, v in to_ldm_flux2(flux2_reference(11).state_dict()).items()}, str(path))
    img = Image.open(require_file(PHOTO)).convert("RGB").resize((W, H), Image.BICUBIC)
    img.save(comfy_host.base / "input" / "flux2_photo.png")
    return path


def test_ours_and_cores_flux2_vae_are_interchangeable(comfy_host, flux2_file):
    host = comfy_host
    g = G()
    img = [g.add("LoadImage", image="flux2_photo.png"), 0]
    mine = ours(g, "flux2_ae.safetensors", dtype="fp32")
    core = [g.add("VAELoader", vae_name="flux2_ae.safetensors"), 0]
    tiled = dict(temporal_size=64, temporal_overlap=8)
    z_core = [g.add("VAEEncode", pixels=img, vae=core), 0]
    z_mine = [g.add("VAEEncode", pixels=img, vae=mine), 0]
    z_suite = [g.add("VAESuiteEncode", pixels=img, vae=mine, latent="mean", seed=0, tiling="always", tile_size=64,
                     overlap=16), 0]
    n = {
        "z_core": g.save_latent(z_core), "z_mine": g.save_latent(z_mine), "z_suite": g.save_latent(z_suite),
        "x_core": g.save_image([g.add("VAEDecode", samples=z_core, vae=core), 0]),
        "x_mine": g.save_image([g.add("VAEDecode", samples=z_core, vae=mine), 0]),
        "x_mine_coretiled": g.save_image([g.add("VAEDecodeTiled", samples=z_core, vae=mine, tile_size=256,
                                                overlap=64, **tiled), 0]),
        "x_suite": g.save_image([g.add("VAESuiteDecodeTiled", samples=z_core, vae=mine, tiling="always",
                                       tile_size=64, overlap=16), 0]),
        "x_core_in_suite": g.save_image([g.add("VAESuiteDecodeTiled", samples=z_core, vae=core, tiling="always",
                                               tile_size=64, overlap=16), 0]),
    }
    e = host.run(g.p, timeout=600)
    zc = saved(host, e, n["z_core"])
    assert zc.shape == (1, 128, H // 16, W // 16)
    diffs = {"z_mine": close(saved(host, e, n["z_mine"]), zc), "z_suite": close(saved(host, e, n["z_suite"]), zc)}
    xc = saved_image(host, e, n["x_core"])
    assert xc.shape == (1, 3, H, W)
    for k in ("x_mine", "x_mine_coretiled", "x_suite", "x_core_in_suite"):
        diffs[k] = close(saved_image(host, e, n[k]), xc)
    print("FLUX.2 host max abs diffs vs core:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert float(xc.std()) > 1e-3  # a real picture, not a constant
    assert "IMPORT FAILED" not in host.log()
    assert np.isfinite(zc.numpy()).all()
