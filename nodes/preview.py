"""TAESD Preview: live TAESD-decoded previews of a sampler's x0, for the models that pass through this node.

How it hooks in (no ComfyUI globals are replaced):

- The node clones the MODEL and adds an ``OUTER_SAMPLE`` wrapper under its own key. Every sampler that samples
  the clone (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced) goes through
  ``CFGGuider.sample`` -> our wrapper, which receives the sampler's step callback.
- The wrapper passes the sampler a callback of its own. It first calls the original one (ComfyUI's progress bar,
  ``x0_output_dict``), then makes the picture with ``vae_core.preview`` and sends it through a ``ProgressBar``
  update: the same path the core previewer uses, so the frontend shows it on the sampler node.
- If the server itself runs a previewer (``--preview-method``), ours replaces it for this sampling call only
  (both would decode every step; the frontend would show whichever came last).

Everything but the hook (variant choice, latent mapping, size cap, rate limit, decoder cache) is
``vae_core.preview``; ComfyUI modules are imported inside the functions that need them.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from ..vae_core.preview import (RateLimit, cap_latent, decoder_needed_for_format, fit, load_decoder, missing_message,
                                render_preview, to_pil, variant_for_format, warn_once, x0_to_raw)

NODE_ID = "VAESuiteTAESDPreview"
WRAPPER_KEY = "vae_suite.taesd_preview"


# ================================================================================================ ComfyUI side
class _Previewer:
    """Makes preview tuples for one sampling call. ``kind`` is 'taesd', 'vae' (a VAE input), 'rgb' or None."""

    def __init__(self, latent_format, max_size: int, vae=None, device="cpu"):
        self.latent_format = latent_format
        self.max_size = int(max_size)
        self.kind = None
        self.decoder = None
        self.vae = None
        self.rgb = None
        if vae is not None and self._use_vae(vae):
            return
        variant = variant_for_format(latent_format) if latent_format is not None else None
        needed = decoder_needed_for_format(latent_format) if latent_format is not None and variant is None else None
        if needed is not None:  # a family with no TAESD (Wan 2.1 / Qwen-Image): say which decoder it would need
            text = (f"TAESD Preview: latents of {needed} would need that tiny video decoder, which VAE Suite does "
                    "not support yet; showing the latent RGB preview (or connect a VAE to preview with it)")
            if warn_once(("needs", needed), text):
                _progress_text(text)
        if variant is not None:
            import folder_paths

            files = folder_paths.get_filename_list("vae_approx")
            allow_hub = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")
            self.decoder, _ = load_decoder(variant, device, files,
                                           lambda n: folder_paths.get_full_path("vae_approx", n), allow_hub)
            if self.decoder is not None:
                self.kind = "taesd"
                return
            folders = folder_paths.get_folder_paths("vae_approx")
            if warn_once(("missing", variant), missing_message(variant, folders)):
                _progress_text(f"TAESD Preview: no {variant} decoder: put {variant}_decoder.pth in "
                               f"{folders[0] if folders else 'models/vae_approx'}")
        factors = getattr(latent_format, "latent_rgb_factors", None)
        if factors is not None:
            import latent_preview

            self.rgb = latent_preview.Latent2RGBPreviewer(
                factors, getattr(latent_format, "latent_rgb_factors_bias", None),
                getattr(latent_format, "latent_rgb_factors_reshape", None))
            self.kind = "rgb"

    def _use_vae(self, vae) -> bool:
        channels = getattr(vae, "latent_channels", None)
        fmt_channels = getattr(self.latent_format, "latent_channels", None)
        if channels and fmt_channels and channels not in (fmt_channels, fmt_channels // 4):
            warn_once(("vae-channels", channels, fmt_channels),
                       f"TAESD Preview: the VAE input has {channels} latent channels but the model samples "
                       f"{fmt_channels}: it cannot decode these latents, using the automatic TAESD instead")
            return False
        self.vae = vae
        self.kind = "vae"
        return True

    def image(self, x0: torch.Tensor):
        if self.kind == "taesd":
            raw = x0_to_raw(x0, self.latent_format, self.decoder.latent_channels)
            return render_preview(self.decoder, raw, self.max_size)
        if self.kind == "vae":  # any ComfyUI VAE (ours or core): its own decode, memory management included
            raw = x0_to_raw(x0, self.latent_format, self.vae.latent_channels)
            f = self.vae.spacial_compression_decode() if hasattr(self.vae, "spacial_compression_decode") else 8
            images = self.vae.decode(cap_latent(raw, f, self.max_size))  # [B,H,W,C] in 0..1
            return fit(to_pil(images[:1].movedim(-1, 1).float() * 2 - 1), self.max_size)
        if self.kind == "rgb":
            return fit(self.rgb.decode_latent_to_preview(x0), self.max_size)
        return None


def _progress_text(text: str) -> None:
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        ctx = get_executing_context()
        if ctx is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id)
    except Exception:  # older hosts: the log line is enough
        pass


def _mute_server_previewer(callback) -> Callable[[], None]:
    """Disable the previewer inside ComfyUI's own sampler callback, for this sampling call only.

    ``latent_preview.prepare_callback`` builds a fresh closure per sampling call holding ``previewer``; we set
    that cell to None while we sample and restore it afterwards. Nothing global is touched; if the closure does
    not look as expected we leave it alone (both previews then go out, ours last).
    """
    try:
        import latent_preview

        names = callback.__code__.co_freevars
        cell = callback.__closure__[names.index("previewer")]
        old = cell.cell_contents
        if not isinstance(old, latent_preview.LatentPreviewer):
            return lambda: None
        cell.cell_contents = None

        def restore():
            cell.cell_contents = old
        return restore
    except Exception:
        return lambda: None


class PreviewWrapper:
    """The OUTER_SAMPLE wrapper the node installs on its model clone."""

    def __init__(self, max_size: int, max_rate: float, vae=None):
        self.max_size = max_size
        self.max_rate = max_rate
        self.vae = vae

    def __call__(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                 disable_pbar=False, seed=None, **kwargs):
        import comfy.utils

        guider = executor.class_obj
        patcher = guider.model_patcher
        try:
            latent_format = patcher.get_model_object("latent_format")
        except Exception:
            latent_format = getattr(patcher.model, "latent_format", None)
        try:
            previewer = _Previewer(latent_format, self.max_size, self.vae, patcher.load_device)
        except Exception as e:
            warn_once(("setup", repr(e)), f"TAESD Preview: previews off for this run: {e}")
            previewer = None
        if previewer is None or previewer.kind is None:
            return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                            **kwargs)

        restore = _mute_server_previewer(callback) if callback is not None else (lambda: None)
        pbar = comfy.utils.ProgressBar(max(1, sigmas.shape[-1] - 1))
        limit = RateLimit(self.max_rate)
        state = {"on": True}

        def preview_callback(step, x0, x, total_steps):
            if callback is not None:
                callback(step, x0, x, total_steps)
            if not state["on"] or not limit.due(step, total_steps):
                return
            try:
                image = previewer.image(x0)
            except Exception as e:  # a preview must never stop sampling
                state["on"] = False
                warn_once(("decode", repr(e)), f"TAESD Preview: preview failed, off for this run: {e}")
                return
            if image is not None:  # the size we made it: the server would scale it up to the size given here
                pbar.update_absolute(step + 1, total_steps, ("JPEG", image, max(image.size)))

        try:
            return executor(noise, latent_image, sampler, sigmas, denoise_mask, preview_callback, disable_pbar,
                            seed, **kwargs)
        finally:
            restore()


class TAESDPreview:
    """MODEL in, MODEL out: samplers that sample the returned model show live TAESD previews."""

    DESCRIPTION = ("Live previews while sampling, decoded by TAESD, for any sampler that samples the returned "
                   "model, whatever --preview-method the server runs. The TAESD variant follows the model "
                   "(SD1.x, SDXL, SD3, FLUX.1, FLUX.2); weights come from models/vae_approx "
                   "(<variant>_decoder.pth/.safetensors) or the Hugging Face Hub when online.")
    CATEGORY = "VAE Suite"
    SEARCH_ALIASES = ["taesd", "taesd preview", "live preview", "preview sampling", "taef1", "taef2", "taesdxl"]
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A copy of the model with live previews: connect it to the sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model whose sampling to preview."}),
                "max_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                     "tooltip": "Longest side of the preview in pixels. For bigger images the "
                                                "TAESD decoder skips its last upsamplings (a 1024 px image costs "
                                                "about 59 % of a full decode at 512), which keeps previews cheap."}),
                "max_rate": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 120.0, "step": 0.5,
                                       "tooltip": "At most this many previews per second (0 = every step). "
                                                  "The last step always gets one."}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "Decode previews with this VAE instead (e.g. a TAESD loaded with the "
                                           "suite's loader). Must match the model's latent space."}),
            },
        }

    def apply(self, model, max_size, max_rate, vae=None):
        import comfy.patcher_extension

        m = model.clone()
        kind = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)  # applying the node twice: the last one wins
        m.add_wrapper_with_key(kind, WRAPPER_KEY, PreviewWrapper(max_size, max_rate, vae))
        return (m,)


NODE_CLASS_MAPPINGS = {NODE_ID: TAESDPreview}
NODE_DISPLAY_NAME_MAPPINGS = {NODE_ID: "TAESD Preview (VAE Suite)"}
