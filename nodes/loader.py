"""Load VAE (VAESuiteLoader): any family, from models/vae, models/vae_approx or the Hugging Face Hub."""
from __future__ import annotations

import logging
import os
import re
import weakref
from pathlib import Path

import torch

from ..vae_core import VAEError
from .common import CATEGORY, clean_errors

log = logging.getLogger("vae_suite")

HUB_ENTRY = "(hf_source below)"
APPROX = "vae_approx/"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_WEIGHTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
_PAIR = re.compile(r"^(?P<name>.+)_(?P<part>encoder|decoder)\.[^.]+$")

# Loaded VAEs stay shared while a workflow (ComfyUI's node cache) holds them; nothing is pinned here.
_CACHE: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()


def family_choices() -> list[str]:
    from ..vae_core.registry import FAMILIES

    return ["auto", *FAMILIES]


def variant_choices() -> list[str]:
    from ..vae_core.registry import FAMILIES

    names = ["auto"]
    for rec in FAMILIES.values():
        names += [v for v in rec.variants if v not in names]
    return names


def _diffusers_folders(folder: str) -> list[str]:
    """Diffusers VAE folders (config.json + weights) under a model folder, as 'name/' entries."""
    import folder_paths

    out = []
    for base in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if "config.json" in files and any(f.endswith(_WEIGHTS) for f in files):
                rel = os.path.relpath(root, base).replace(os.sep, "/")
                if rel != ".":
                    out.append(rel + "/")
                dirs[:] = []
    return sorted(set(out))


def list_entries() -> list[str]:
    """vae files, diffusers folders (``name/``), vae_approx files and TAESD pairs (one ``vae_approx/name``)."""
    import folder_paths

    entries: list[str] = []
    folders = _diffusers_folders("vae")
    for f in folder_paths.get_filename_list("vae"):
        if not any(f.startswith(d) for d in folders):
            entries.append(f)
    entries += folders
    approx = folder_paths.get_filename_list("vae_approx")
    parts: dict[str, set] = {}
    for f in approx:
        m = _PAIR.match(f)
        if m:
            parts.setdefault(m.group("name"), set()).add(m.group("part"))
    for f in approx:
        m = _PAIR.match(f)
        if m and parts[m.group("name")] == {"encoder", "decoder"}:
            continue
        if f.lower().endswith(_WEIGHTS):
            entries.append(APPROX + f)
    entries += [APPROX + name for name, p in sorted(parts.items()) if p == {"encoder", "decoder"}]
    entries.append(HUB_ENTRY)
    return entries


def resolve_entry(name: str):
    """A list entry -> what vae_core.load_vae takes (a path, a folder, or an (encoder, decoder) pair)."""
    import folder_paths

    if name.startswith(APPROX):
        rel = name[len(APPROX):]
        path = folder_paths.get_full_path("vae_approx", rel)
        if path is not None:
            return path
        approx = folder_paths.get_filename_list("vae_approx")
        enc = [f for f in approx if f.startswith(rel + "_encoder.")]
        dec = [f for f in approx if f.startswith(rel + "_decoder.")]
        if enc and dec:
            return (folder_paths.get_full_path("vae_approx", enc[0]), folder_paths.get_full_path("vae_approx", dec[0]))
        raise VAEError(f"{name} is not in models/vae_approx any more: refresh the node list")
    if name.endswith("/"):
        for base in folder_paths.get_folder_paths("vae"):
            path = Path(base) / name
            if (path / "config.json").is_file():
                return str(path)
        raise VAEError(f"the diffusers folder {name} is not in models/vae any more: refresh the node list")
    path = folder_paths.get_full_path("vae", name)
    if path is None:
        raise VAEError(f"{name} is not in models/vae: pick a file from the list (or refresh it)")
    return path


def _stamp(source) -> tuple:
    paths = source if isinstance(source, tuple) else (source,)
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), 0, 0))
    return tuple(out)


class VAESuiteLoader:
    DESCRIPTION = ("Loads a VAE of any family (AutoencoderKL for SD1/SDXL/SD3/FLUX.1, FLUX.2's VAE, the asymmetric inpainting "
                   "VAE, DC-AE, TAESD/TAEF1/TAEF2) from models/vae, models/vae_approx or the Hugging Face Hub. The "
                   "output is an ordinary VAE: it works in the core VAE Decode/Encode/Tiled/Inpaint nodes too.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["vae loader", "load vae", "taesd", "dc-ae", "sana vae", "flux vae", "flux2 vae", "sdxl vae",
                      "asymmetric vae", "huggingface vae"]
    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("A ComfyUI VAE backed by the VAE Suite engine.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (list_entries(), {"tooltip":
                             "A file or diffusers folder in models/vae, or a file in models/vae_approx; TAESD "
                             "encoder/decoder pairs appear once as vae_approx/<name>. Pick the last entry to use "
                             "hf_source instead."}),
            },
            "optional": {
                "hf_source": ("STRING", {"default": "", "tooltip":
                              "Optional Hugging Face Hub source, e.g. hf:madebyollin/taesd or "
                              "hf:stabilityai/sdxl-vae@main; when set it is used instead of vae_name."}),
                "family": (family_choices(), {"default": "auto", "tooltip":
                           "Override the detected family; auto detects it from the weights."}),
                "variant": (variant_choices(), {"default": "auto", "tooltip":
                            "Override the detected variant (it sets the latent scaling: e.g. sd1 vs sdxl, taesd vs "
                            "taesdxl, which the weights cannot tell apart)."}),
                "dtype": (["auto", "fp32", "bf16", "fp16"], {"default": "auto", "tooltip":
                          "Working precision. auto = what ComfyUI picks for VAEs on this device (respects "
                          "--fp16-vae/--bf16-vae/--fp32-vae, and never fp16 for VAEs that overflow in it)."}),
            },
        }

    @clean_errors
    def load(self, vae_name, hf_source="", family="auto", variant="auto", dtype="auto"):
        hf = (hf_source or "").strip()
        if hf:
            source = hf if hf.startswith("hf:") else f"hf:{hf}"
        elif vae_name == HUB_ENTRY:
            raise VAEError("vae_name is set to use hf_source, but hf_source is empty: write a Hub source such as "
                           "hf:madebyollin/taesd, or pick a file")
        else:
            source = resolve_entry(vae_name)
        key = (source if isinstance(source, str) and source.startswith("hf:") else _stamp(source), family,
               variant, dtype)
        vae = _CACHE.get(key)
        if vae is None:
            vae = load_suite_vae(source, family, variant, dtype, name=hf or vae_name)
            _CACHE[key] = vae
        return (vae,)


def load_suite_vae(source, family="auto", variant="auto", dtype="auto", name=""):
    import comfy.model_management as mm

    from ..vae_core import load_vae
    from .comfy_vae import SuiteVAE, working_dtypes

    core = load_vae(source, family=None if family == "auto" else family,
                    variant=None if variant == "auto" else variant, dtype=torch.float32)
    if dtype == "auto":
        want = mm.vae_dtype(mm.vae_device(), working_dtypes(core))
    elif dtype in DTYPES:
        want = DTYPES[dtype]
    else:
        raise VAEError(f"dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    if want == torch.float16 and core.config.get("force_upcast", False):
        log.info("vae_suite: %s sets force_upcast (fp16 overflows in it): kept in float32", name)
        want = torch.float32
    if want != torch.float32:
        core.to(dtype=want)
    log.info("vae_suite: loaded %s as %r", name, core)
    return SuiteVAE(core, name=str(name))
