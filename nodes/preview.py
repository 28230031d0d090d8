"""TAESD Preview: live TAESD-decoded previews of a sampler's x0, for the models that pass through this node.

How it hooks in (no ComfyUI globals are replaced):

- The node clones the MODEL and adds an ``OUTER_SAMPLE`` wrapper under its own key. Every sampler that samples
  the clone (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced) goes through
  ``CFGGuider.sample`` -> our wrapper, which receives the sampler's step callback.
- The wrapper passes the sampler a callback of its own. It first calls the original one (ComfyUI's progress bar,
  ``x0_output_dict``), then decodes x0 with a TAESD decoder and sends the picture through a ``ProgressBar`` update:
  the same path the core previewer uses, so the frontend shows it on the sampler node.
- If the server itself runs a previewer (``--preview-method``), ours replaces it for this sampling call only
  (both would decode every step; the frontend would show whichever came last).

The sampler's x0 is in the model's space (after ``latent_format.process_in``). We map it back with
``process_out`` to the raw latents of the full VAE and let vae_core's tiny VAE apply that variant's own scaling:
that is right for every format, including SDXL-Playground-2.5 whose ``process_in`` is not the SDXL scale.
ComfyUI's FLUX.2 latents are 2x2-patchified (128 channels): they are unpacked to the 32 channels TAEF2 decodes
(the FLUX.2 VAE's latent batch-norm is not undone: its statistics live in the full VAE; newer ComfyUI previews
FLUX.2 the same way).

The pure parts (variant choice, latent mapping, size cap, rate limit, rendering) import nothing from ComfyUI, so
tests and the bench use them outside the host; the ComfyUI parts are imported inside the functions that need them.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from ..vae_core import VAEError, load_vae

log = logging.getLogger("vae_suite")

NODE_ID = "VAESuiteTAESDPreview"
WRAPPER_KEY = "vae_suite.taesd_preview"

# ComfyUI latent format class -> TAESD variant. Looked up along the class's MRO, so subclasses follow their base
# (Flux is an SD3 subclass: it is listed first in its own MRO).
VARIANT_FOR_FORMAT = {
    "SD15": "taesd",
    "SDXL": "taesdxl",
    "SDXL_Playground_2_5": "taesdxl",
    "SD3": "taesd3",
    "Flux": "taef1",
    "Flux2": "taef2",
}
# Hub repositories (diffusers AutoencoderTiny folders) tried when nothing is in vae_approx and we are online.
HUB_REPO = {v: f"hf:madebyollin/{v}" for v in ("taesd", "taesdxl", "taesd3", "taef1", "taef2")}


# ================================================================================================ pure parts
def variant_for_format(latent_format: Any) -> str | None:
    """The TAESD variant for a ComfyUI latent format object (or class), None when there is none."""
    cls = latent_format if isinstance(latent_format, type) else type(latent_format)
    for klass in cls.__mro__:
        if klass.__name__ in VARIANT_FOR_FORMAT:
            return VARIANT_FOR_FORMAT[klass.__name__]
    return None


def decoder_file_names(variant: str) -> tuple[str, ...]:
    """The file names we look for in vae_approx (the same prefix rule as ComfyUI's own previewer)."""
    return (f"{variant}_decoder.safetensors", f"{variant}_decoder.pth")


def find_decoder_file(variant: str, filenames: Iterable[str]) -> str | None:
    """First name in a vae_approx listing that starts with ``<variant>_decoder`` (safetensors preferred)."""
    prefix = f"{variant}_decoder"
    hits = sorted((f for f in filenames if os.path.basename(f).startswith(prefix)),
                  key=lambda f: (not f.endswith(".safetensors"), f))
    return hits[0] if hits else None


def unpack_2x2(z: torch.Tensor) -> torch.Tensor:
    """[B, 4C, h, w] -> [B, C, 2h, 2w]: undo ComfyUI's FLUX.2 2x2 patchify (channel = c*4 + 2*row + col)."""
    b, c4, h, w = z.shape
    c = c4 // 4
    return z.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * 2, w * 2)


def pack_2x2(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]: ComfyUI's FLUX.2 latent layout (inverse of ``unpack_2x2``)."""
    b, c, hh, ww = z.shape
    return z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, hh // 2, ww // 2)


def x0_to_raw(x0: torch.Tensor, latent_format: Any, latent_channels: int) -> torch.Tensor:
    """The sampler's x0 (model space) of the first batch item -> raw VAE latents with ``latent_channels``."""
    z = x0[:1]
    if latent_format is not None:
        z = latent_format.process_out(z)
    if z.ndim == 4 and z.shape[1] == 4 * latent_channels:  # patchified (FLUX.2)
        z = unpack_2x2(z)
    return z


def cap_latent(z: torch.Tensor, downscale: int, max_size: int) -> torch.Tensor:
    """Area-downscale a latent so the decoded picture's longest side is at most ``max_size`` pixels.

    Used for VAEs we cannot trim (a VAE input). It is cheap but soft: averaging latents lowers their contrast
    (TAEF2 on the test photo at half size: 20.6 dB, against 31.7 dB for a trimmed decoder).
    """
    h, w = z.shape[-2:]
    longest = max(h, w) * downscale
    if not max_size or longest <= max_size:
        return z
    s = max_size / longest
    return F.adaptive_avg_pool2d(z, (max(1, int(h * s + 1e-6)), max(1, int(w * s + 1e-6))))


def halvings(longest: int, max_size: int, limit: int) -> int:
    """How many of the decoder's last 2x upsamplings to skip so the picture stays at least ``max_size`` wide."""
    j = 0
    while j < limit and max_size and longest // 2 ** (j + 1) >= max_size:
        j += 1
    return j


_TRIMMED: "OrderedDict[tuple, Any]" = OrderedDict()


def trimmed_decoder(vae, skip: int):
    """A copy of a TAESD VAE whose decoder skips its last ``skip`` 2x upsamplings (None if it has fewer).

    A preview of a large image at half or quarter size then costs about 59 % or 23 % of a full decode, and looks
    like the full decode scaled down (the convolutions after a skipped upsampling see the same features, only
    less repeated): TAEF2 on the test photo gives 31.7 dB at 256 px and 29.4 dB at 128 px.
    """
    if skip <= 0:
        return vae
    key = (id(vae), skip)
    with _CACHE_LOCK:
        hit = _TRIMMED.get(key)
        if hit is not None and hit[0] is vae:
            return hit[1]
    import copy

    from_vae = type(vae)
    model = copy.deepcopy(vae.model)
    ups = [(parent, name) for parent in model.decoder.modules() for name, child in parent.named_children()
           if isinstance(child, torch.nn.Upsample)]
    if len(ups) < skip:
        return None
    for parent, name in ups[len(ups) - skip:]:
        setattr(parent, name, torch.nn.Identity())
    model.downscale = vae.downscale // 2 ** skip
    if hasattr(model.decoder, "upscale"):
        model.decoder.upscale = model.downscale
    out = from_vae(model, vae.family, vae.variant, vae.config, device=vae.device, dtype=vae.dtype)
    with _CACHE_LOCK:
        _TRIMMED[key] = (vae, out)
        while len(_TRIMMED) > 2 * _CACHE_SIZE:
            _TRIMMED.popitem(last=False)
    return out


def count_upsamples(vae) -> int:
    decoder = getattr(vae.model, "decoder", None)
    return sum(isinstance(m, torch.nn.Upsample) for m in decoder.modules()) if decoder is not None else 0


def to_pil(images: torch.Tensor):
    """[1,3,H,W] in [-1,1] -> PIL RGB image."""
    from PIL import Image

    img = images[0].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return Image.fromarray(img.permute(1, 2, 0).cpu().numpy())


def fit(image, max_size: int):
    """Scale a PIL image down (never up) so its longest side is at most ``max_size``."""
    from PIL import Image, ImageOps

    if max_size and max(image.size) > max_size:
        image = ImageOps.contain(image, (max_size, max_size), Image.BILINEAR)
    return image


def render_preview(decoder, raw: torch.Tensor, max_size: int):
    """Raw latents -> PIL preview from a vae_core TAESD, longest side at most ``max_size``.

    A large picture is decoded by a trimmed decoder (its last upsamplings skipped) down to the smallest size that
    is still at least ``max_size``, then scaled down the rest of the way.
    """
    z = raw[:1]
    longest = max(z.shape[-2:]) * decoder.downscale
    skip = halvings(longest, max_size, count_upsamples(decoder))
    dec = trimmed_decoder(decoder, skip) if skip else decoder
    if dec is None:  # an unexpected decoder layout: fall back to a downscaled latent
        dec, z = decoder, cap_latent(z, decoder.downscale, max_size)
    return fit(to_pil(dec.decode(z.to(dec.device, dec.dtype), tile=False)), max_size)


class RateLimit:
    """At most ``max_rate`` previews per second (0 = every step); the last step always gets one."""

    def __init__(self, max_rate: float, clock: Callable[[], float] = time.monotonic):
        self.interval = 1.0 / max_rate if max_rate and max_rate > 0 else 0.0
        self.clock = clock
        self.last: float | None = None

    def due(self, step: int, total_steps: int) -> bool:
        now = self.clock()
        if self.last is None or step + 1 >= total_steps or now - self.last >= self.interval:
            self.last = now
            return True
        return False


# ================================================================================================ decoders
_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()
_WARNED: set = set()


def _warn_once(key: Any, message: str) -> bool:
    if key in _WARNED:
        return False
    _WARNED.add(key)
    log.warning("%s", message)
    return True


def preview_dtype(device: torch.device) -> torch.dtype:
    # TAESD is fine in fp16 on accelerators; CPUs are faster (and exact) in fp32.
    return torch.float16 if torch.device(device).type in ("cuda", "xpu", "mps") else torch.float32


def load_decoder(variant: str, device: torch.device | str, vae_approx_files: Iterable[str],
                 full_path: Callable[[str], str | None], allow_hub: bool = True):
    """-> (vae_core VAE or None, what was looked for). Loaded once per (file, device, dtype) and cached."""
    device = torch.device(device)
    dtype = preview_dtype(device)
    name = find_decoder_file(variant, vae_approx_files)
    sources: list[str] = []
    path = full_path(name) if name else None
    if path:
        sources.append(path)
    if allow_hub and variant in HUB_REPO:
        sources.append(HUB_REPO[variant])
    for src in sources:
        stamp = os.path.getmtime(src) if os.path.exists(src) else 0.0
        key = (src, stamp, variant, str(device), dtype)
        with _CACHE_LOCK:
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key], src
            if ("failed", key) in _WARNED:
                continue
        try:
            vae = load_vae(src, family="tiny", variant=variant, device=device, dtype=dtype)
            if not vae.can_decode:
                raise VAEError(f"{os.path.basename(src)} holds no TAESD decoder (an encoder file?)")
        except Exception as e:  # a bad file or an offline Hub must never stop sampling
            _warn_once(("failed", key), f"TAESD Preview: could not load {src}: {e}")
            continue
        with _CACHE_LOCK:
            _CACHE[key] = vae
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        log.info("TAESD Preview: %s previews from %s", variant, src)
        return vae, src
    return None, None


def missing_message(variant: str, folders: Iterable[str]) -> str:
    names = " or ".join(decoder_file_names(variant))
    where = ", ".join(folders) or "models/vae_approx"
    return (f"TAESD Preview: no {variant} decoder found. Looked for {names} in {where}"
            f"{' and ' + HUB_REPO[variant] + ' on the Hugging Face Hub' if variant in HUB_REPO else ''}. "
            f"Download {variant}_decoder.pth from https://github.com/madebyollin/taesd and put it in one of those "
            "folders; meanwhile previews fall back to latent2rgb where the model has factors, else none.")


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
            if _warn_once(("missing", variant), missing_message(variant, folders)):
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
            _warn_once(("vae-channels", channels, fmt_channels),
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
            _warn_once(("setup", repr(e)), f"TAESD Preview: previews off for this run: {e}")
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
                _warn_once(("decode", repr(e)), f"TAESD Preview: preview failed, off for this run: {e}")
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
    CATEGORY = "latent/vae suite"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
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
NODE_DISPLAY_NAME_MAPPINGS = {NODE_ID: "TAESD Preview"}
