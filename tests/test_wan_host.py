"""The Wan 2.1 / Qwen-Image VAE in a real ComfyUI 0.3.75 server over HTTP, both directions against core:

- our VAE (VAE Suite Load VAE) in core VAEEncode / VAEDecode equals core's own Wan VAE (core VAELoader) on the
  same file;
- core's Wan VAE in our Encode and Decode Tiled (tiled in space and time) equals core's VAEEncode / VAEDecode.

The file is seeded random weights of the released layout with base_dim 16 (core builds its Wan VAE from the
file's shapes), written in the original layout ComfyUI users download (wan_2.1_vae.safetensors)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from test_nodes_host import G, close, ours, saved
from wan_layout import to_original

diffusers = pytest.importorskip("diffusers")
NAME = "wan_small_vae.safetensors"
FRAMES, H, W = 5, 32, 80  # 80 px wide: two 64 px tiles in our nodes


@pytest.fixture(scope="module")
def host(comfy_host):
    torch.manual_seed(11)
    ref = diffusers.AutoencoderKLWan(base_dim=16).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("gamma"):
                p.mul_(1 + 0.5 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in to_original(ref.state_dict()).items()},
              comfy_host.base / "models" / "vae" / NAME)
    g = torch.Generator().manual_seed(3)
    video = torch.rand(FRAMES, 3, H, W, generator=g) * 2 - 1  # the frames of one video, as pixel_space latents
    save_file({"latent_tensor": video.contiguous(), "latent_format_version_0": torch.tensor([])},
              comfy_host.base / "input" / "wan_frames.latent")
    return comfy_host


def _frames(g: G) -> list:
    """The test frames as an IMAGE [T,H,W,3], losslessly: a LATENT file decoded by the pixel_space VAE."""
    px = [g.add("VAELoader", vae_name="pixel_space"), 0]
    lat = [g.add("LoadLatent", latent="wan_frames.latent"), 0]
    return [g.add("VAEDecode", samples=lat, vae=px), 0]


def _save_image(g: G, image: list) -> str:
    px = [g.add("VAELoader", vae_name="pixel_space"), 0]
    return g.save_latent([g.add("VAEEncode", pixels=image, vae=px), 0])


def test_our_vae_in_core_nodes_equals_core_vae(host):
    g = G()
    core = [g.add("VAELoader", vae_name=NAME), 0]
    mine = ours(g, NAME)
    frames = _frames(g)
    z_core = [g.add("VAEEncode", pixels=frames, vae=core), 0]
    z_ours = [g.add("VAEEncode", pixels=frames, vae=mine), 0]
    n = [g.save_latent(z_core), g.save_latent(z_ours),
         _save_image(g, [g.add("VAEDecode", samples=z_core, vae=core), 0]),
         _save_image(g, [g.add("VAEDecode", samples=z_core, vae=mine), 0])]
    e = host.run(g.p)
    a, b = saved(host, e, n[0]), saved(host, e, n[1])
    assert a.shape == (1, 16, 2, H // 8, W // 8)
    close(b, a)
    x_core, x_ours = saved(host, e, n[2]), saved(host, e, n[3])
    assert x_core.shape[0] == FRAMES
    close(x_ours, x_core)


def test_core_vae_in_our_nodes_equals_core_nodes(host):
    g = G()
    core = [g.add("VAELoader", vae_name=NAME), 0]
    frames = _frames(g)
    z_core = [g.add("VAEEncode", pixels=frames, vae=core), 0]
    z_ours = [g.add("VAESuiteEncode", pixels=frames, vae=core, latent="mean", seed=0, tiling="always",
                    tile_size=64, overlap=0), 0]
    n = [g.save_latent(z_core), g.save_latent(z_ours),
         _save_image(g, [g.add("VAEDecode", samples=z_core, vae=core), 0]),
         _save_image(g, [g.add("VAESuiteDecodeTiled", samples=z_core, vae=core, tiling="always", tile_size=64,
                               overlap=0, temporal_size=4), 0])]
    e = host.run(g.p)
    close(saved(host, e, n[1]), saved(host, e, n[0]))
    close(saved(host, e, n[3]), saved(host, e, n[2]))
