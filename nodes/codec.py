"""VAE Encode, VAE Decode Tiled and Asym Inpaint Decode: our own tiled engine, progress bar and Cancel."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..vae_core import VAEError
from .common import (CATEGORY, clean_errors, comfy_progress, decode_latent, encode_latent, image_from_core, image_to_core,
                     latent_downscale, latent_samples, mask_to_core, run_info, tile_inputs, tile_option)


def video_frames(x: torch.Tensor, core) -> torch.Tensor:
    """An image batch [N,3,H,W] for a video VAE -> one video [1,3,T,H,W], as core VAE Encode makes it: the frames
    in order, the last ones dropped down to T = 1 + 4k."""
    k = core.time_downscale
    t = 1 + (x.shape[0] - 1) // k * k
    return x[:t].movedim(0, 1).unsqueeze(0)


@contextlib.contextmanager
def running(vae, tiling: str, tile_size: int, overlap: int, temporal_size: int | None = None):
    """-> the vae_core VAE behind ``vae`` (ours, or a core VAE rebuilt once) loaded by ComfyUI's memory manager,
    and the keyword arguments of its encode/decode: tile (corrected for it), progress bar and Cancel.

    A core VAE converted by us is not managed by ComfyUI: it goes back to the offload device afterwards.
    """
    import comfy.model_management as mm

    from .comfy_vae import core_of, load_core_on

    core = core_of(vae)
    load_core_on(vae, core)
    try:
        progress, should_stop = comfy_progress()
        tile = tile_option(tiling, tile_size, overlap, core.downscale)
        if temporal_size is not None and getattr(core, "video", False) and tile:  # frames per causal chunk
            import dataclasses

            tile = dataclasses.replace(tile, time_chunk=max(1, int(temporal_size) // core.time_downscale))
        yield core, {"tile": tile, "progress": progress, "should_stop": should_stop}
    finally:
        off = torch.device(mm.vae_offload_device())
        if getattr(vae, "suite_core", None) is not core and core.device != off:
            core.to(off)
            mm.soft_empty_cache()


class VAESuiteEncode:
    DESCRIPTION = ("Encodes an IMAGE into a LATENT with any VAE (ours or a core one): the posterior mean or a seeded "
                   "sample, tiled when the image is large. An optional MASK becomes the latent's noise_mask (for "
                   "inpainting with a sampler). Sizes that are not a multiple of the VAE's downscale are padded.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["vae encode", "tiled vae encode", "encode tiled", "image to latent", "inpaint encode"]
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The LATENT core VAE Encode gives (raw VAE-space; for FLUX.2 the patchified, normalised "
                       "128-channel latent), with noise_mask when a mask is given.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": "The image(s) to encode."}),
                "vae": ("VAE", {"tooltip": "The VAE to encode with (from VAE Suite Load VAE or any core loader)."}),
                "latent": (["mean", "sample"], {"default": "mean", "tooltip":
                           "mean: the deterministic posterior mean (as core VAE Encode). sample: draw from the "
                           "posterior with the seed below (VAEs without a posterior variance give the mean)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                         "Seed of the posterior sample (only used when latent is 'sample')."}),
                **tile_inputs(),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional inpainting mask (1 = inpaint here), the image's size; it "
                                  "becomes the latent's noise_mask. An all-zero mask (LoadImage's mask of an image "
                                  "without alpha) is ignored."}),
            },
        }

    @clean_errors
    def encode(self, pixels, vae, latent="mean", seed=0, tiling="auto", tile_size=512, overlap=64, mask=None):
        import comfy.model_management as mm

        x = image_to_core(pixels)
        b, _, h, w = x.shape
        m = mask_to_core(mask, h, w, b, "the image") if mask is not None else None
        if m is not None and not bool((m > 0).any()):
            m = None  # nothing to inpaint (e.g. LoadImage's mask of an image without alpha): a plain latent
        gen = torch.Generator("cpu").manual_seed(int(seed)) if latent == "sample" else None
        with running(vae, tiling, tile_size, overlap) as (core, run):
            if getattr(core, "video", False):  # the batch is the frames of one video, as core VAE Encode has it
                if m is not None:
                    raise VAEError("a mask (noise_mask) is not supported with a video VAE: encode without it")
                x = video_frames(x, core)
            z = encode_latent(core, x, sample=latent == "sample", generator=gen, **run)
        out = {"samples": z.float().to(mm.intermediate_device())}
        if m is not None:
            f = latent_downscale(core)
            ph, pw = (-h) % f, (-w) % f
            if ph or pw:  # the latent covers the padded image
                m = F.pad(m, (0, pw, 0, ph), mode="replicate")
            out["noise_mask"] = m.to(mm.intermediate_device())
        return {"ui": run_info(core, h, w), "result": (out,)}


class VAESuiteDecodeTiled:
    DESCRIPTION = ("Decodes a LATENT with the VAE Suite tiled engine: any VAE from VAE Suite Load VAE or a core "
                   "checkpoint/VAE loader. Tiling is exact: the result equals the untiled decode (no seams, no colour "
                   "shift) while memory stays bounded by the tile. The progress bar advances per tile and Cancel "
                   "stops within one tile.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["tiled vae", "vae decode tiled", "tiled decode", "seamless tiled vae", "latent to image",
                      "low memory vae"]
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image(s).",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode, as samplers output it (raw VAE-space; FLUX.2: "
                                    "its 128-channel diffusion-space latent)."}),
                "vae": ("VAE", {"tooltip": "The VAE to decode with (VAE Suite Load VAE, or a core loader's VAE)."}),
                **tile_inputs(),
            },
            "optional": {
                "temporal_size": ("INT", {"default": 4, "min": 4, "max": 4096, "step": 4, "tooltip":
                                  "Video VAEs (Wan 2.1 / Qwen-Image): frames per causal chunk when tiling. 4 is "
                                  "one latent frame, as diffusers and core decode. Chunking in time is exact (the "
                                  "causal convs carry their last frames over), so this only trades memory for speed."}),
            },
        }

    @clean_errors
    def decode(self, samples, vae, tiling="auto", tile_size=512, overlap=64, temporal_size=4):
        z = latent_samples(samples, video=True)
        with running(vae, tiling, tile_size, overlap, temporal_size) as (core, run):
            if z.ndim == 5 and not getattr(core, "video", False):
                z = latent_samples(samples)
            images = decode_latent(core, z, **run)
        return {"ui": run_info(core, *images.shape[-2:]), "result": (image_from_core(images),)}


class VAESuiteAsymInpaintDecode:
    DESCRIPTION = ("Decodes an inpainting result with the asymmetric VAE's conditioned decoder: it sees the "
                   "original image outside the mask, so unmasked pixels keep their detail and colour. MASK follows "
                   "ComfyUI's convention (1 = inpainted region).")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["inpaint vae", "asymmetric vae", "inpaint decode", "asymmetric autoencoder"]
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image(s).",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The inpainted latent (raw VAE-space) to decode."}),
                "vae": ("VAE", {"tooltip": "An asymmetric inpainting VAE (AsymmetricAutoencoderKL), loaded with "
                                "VAE Suite Load VAE."}),
                "image": ("IMAGE", {"tooltip": "The original image the latent was inpainted from (same size as "
                                    "the decoded image)."}),
                "mask": ("MASK", {"tooltip": "The inpainting mask, the image's size: 1 = region that was "
                                  "inpainted (regenerated), 0 = keep the original."}),
                **tile_inputs(),
            },
        }

    @clean_errors
    def decode(self, samples, vae, image, mask, tiling="auto", tile_size=512, overlap=64):
        from .comfy_vae import core_of

        core = core_of(vae)
        if core.family != "asym":
            raise VAEError(f"Asym Inpaint Decode needs an asymmetric inpainting VAE (AsymmetricAutoencoderKL); this "
                           f"VAE is {core.family} ({core.variant}). Load an asymmetric VAE, or use VAE Decode")
        z = latent_samples(samples)
        x = image_to_core(image)
        b = z.shape[0]
        if x.shape[0] not in (1, b):
            raise VAEError(f"the image batch is {x.shape[0]} but the latent batch is {b}: use 1 image or one each")
        x = x.expand(b, -1, -1, -1)
        h, w = x.shape[-2:]
        m = mask_to_core(mask, h, w, b, "the image")
        with running(vae, tiling, tile_size, overlap) as (core, run):
            images = core.decode(z, image=x, mask=m, **run)
        return {"ui": run_info(core, *images.shape[-2:]), "result": (image_from_core(images),)}
