"""Reading weights from every supported source and building the right family (``load_vae``).

Sources: a weights file, a diffusers folder, a TAESD encoder/decoder pair (tuple or folder), a state dict,
or ``hf:<repo_id>[/<subfolder or file>][@<revision>]`` through huggingface_hub.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from . import registry
from .convert import WeightParts
from .errors import VAEError
from .vae import VAE

log = logging.getLogger("vae_core")

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
_CONTAINERS = ("state_dict", "model", "module", "model_state_dict", "ema")
_PREFIXES = ("first_stage_model.", "vae.", "model.vae.")
# File names that say nothing about the model (the folder holding them does: mit-han-lab/dc-ae-f32c32-in-1.0/...)
GENERIC_STEMS = {"model", "diffusion_pytorch_model", "pytorch_model", "vae", "ae", "weights", "checkpoint"}


# ------------------------------------------------------------------------------------------------ files
def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read one weights file -> (tensors, metadata). Pickles load with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise VAEError(f"VAE file not found: {path}")
    if path.stat().st_size == 0:
        raise VAEError(f"{path.name} is empty (0 bytes): the download or copy did not finish; fetch the file again")
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        return _read_safetensors(path)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _read_pickle(path), {}
    raise VAEError(
        f"{path.name}: unknown weights format {suffix!r}; expected one of {', '.join(WEIGHT_SUFFIXES)} "
        "or a diffusers folder with config.json"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            # copies, not views of the file mapping: the weights are in memory when load_vae returns (no disk
            # reads during the first decode, no mapping kept open)
            return {k: f.get_tensor(k).clone() for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise VAEError(f"{path.name} is not a readable .safetensors file (truncated or corrupt?): {e}. "
                       "Download it again") from None


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VAEError(
            f"{path.name} was refused: it is a pickle that asks to run code or build objects other than tensors "
            f"(loaded with weights_only=True, nothing was executed). Convert it to .safetensors from a source you "
            f"trust. Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise VAEError(f"{path.name} is not a readable torch checkpoint (truncated or corrupt?): "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Download it again") from None
    if not isinstance(obj, Mapping):
        raise VAEError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors")
    return dict(obj)


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap ``state_dict``/``model``/``module`` containers (as .ckpt files have them) and keep the tensors."""
    for _ in range(3):
        inner = next((obj[c] for c in _CONTAINERS if isinstance(obj.get(c), Mapping)), None)
        if inner is None or sum(isinstance(v, torch.Tensor) for v in obj.values()) > 8:
            break
        obj = inner
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_vae_prefix(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Full checkpoints keep the VAE under ``first_stage_model.`` or ``vae.``. Returns (vae dict, companion summary)."""
    for prefix in _PREFIXES:
        part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if any(k.startswith(("encoder.", "decoder.")) for k in part):
            companions = {k.split(".", 3)[min(2, k.count("."))] for k in sd if not k.startswith(prefix)}
            tops = {".".join(k.split(".")[:3]) for k in sd if not k.startswith(prefix)}
            return part, " ".join(sorted(companions | tops))
    return sd, ""


# ------------------------------------------------------------------------------------------------ hub
_HF = re.compile(r"^hf:(?P<repo>[^/@\s]+/[^/@\s]+)(?:/(?P<sub>[^@\s]+?))?/?(?:@(?P<rev>[^\s]+))?$")


def resolve_hub(spec: str) -> Path:
    """``hf:owner/name[/subfolder-or-file][@revision]`` -> a local path (downloaded, or from the cache offline)."""
    m = _HF.match(spec.strip())
    if not m:
        raise VAEError(f"bad Hub reference {spec!r}: write hf:<owner>/<repo>[/<subfolder or file>][@<revision>], "
                       "e.g. hf:madebyollin/taesd or hf:stabilityai/stable-diffusion-xl-base-1.0/vae")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise VAEError("hf: sources need the huggingface_hub package: pip install huggingface_hub") from None
    repo, sub, rev = m.group("repo"), m.group("sub") or "", m.group("rev")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        if sub.lower().endswith(WEIGHT_SUFFIXES):
            return Path(hf_hub_download(repo, sub, revision=rev, local_files_only=offline))
        base = f"{sub}/" if sub else ""
        patterns = [f"{base}config.json", f"{base}*.safetensors", f"{base}*.pth"]
        root = Path(snapshot_download(repo, revision=rev, allow_patterns=patterns, local_files_only=offline))
        folder = root / sub if sub else root
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.pth")):
            root = Path(snapshot_download(repo, revision=rev, allow_patterns=[f"{base}config.json", f"{base}*.bin"],
                                          local_files_only=offline))
        return folder
    except LocalEntryNotFoundError:
        raise VAEError(f"{spec}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; run once online or "
                       "unset HF_HUB_OFFLINE") from None
    except Exception as e:  # network errors, 404s, gated repos: one clear line instead of a deep traceback
        raise VAEError(f"{spec}: could not fetch from the Hugging Face Hub ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None


# ------------------------------------------------------------------------------------------------ sources
def _folder_weights(folder: Path) -> Path | None:
    names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "model.safetensors", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin",
             "pytorch_model.bin"]
    for n in names:
        if (folder / n).is_file():
            return folder / n
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES)
    return files[0] if len(files) == 1 else None


def tiny_pair_in(folder: Path) -> tuple[Path, Path] | None:
    """A folder holding ``<name>_encoder.*`` and ``<name>_decoder.*`` (madebyollin's split TAESD files)."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES]
    enc = sorted(p for p in files if re.search(r"_encoder$", p.stem))
    dec = sorted(p for p in files if re.search(r"_decoder$", p.stem))
    if len(enc) == 1 and len(dec) == 1:
        return enc[0], dec[0]
    return None


def read_source(source: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """-> (state dict, diffusers config or None, hints for variant detection)."""
    if isinstance(source, Mapping):
        return unwrap_state_dict(source), None, {}
    if isinstance(source, (tuple, list)):
        parts = [read_source(s) for s in source]
        return (WeightParts(p[0] for p in parts),  # an encoder/decoder pair: resolved by the tiny family
                None, {"filename": " ".join(str(p[2].get("filename", "")) for p in parts)})
    if isinstance(source, str) and source.startswith("hf:"):
        sd, cfg, hints = read_source(resolve_hub(source))
        hints["filename"] = f"{source} {hints.get('filename', '')}"
        return sd, cfg, hints
    if not isinstance(source, (str, os.PathLike)):
        raise VAEError(f"cannot load a VAE from a {type(source).__name__}: pass a file path, a diffusers folder, "
                       "a state dict, a (encoder, decoder) pair of files or 'hf:<repo>'")
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"  # a whole pipeline folder
        if (path / "config.json").is_file():
            config = read_config(path / "config.json")
            weights = _folder_weights(path)
            if weights is None:
                raise VAEError(f"{path} has config.json but no single weights file "
                               "(expected diffusion_pytorch_model.safetensors)")
            sd, meta = read_weights(weights)
            return unwrap_state_dict(sd), config, {"filename": f"{path.name} {weights.name}", "metadata": meta,
                                                   "config_path": str(path / "config.json")}
        pair = tiny_pair_in(path)
        if pair is not None:
            return read_source(pair)
        weights = _folder_weights(path)
        if weights is None:
            raise VAEError(f"{path} is a folder without config.json, a TAESD encoder/decoder pair or one weights file")
        path = weights
    if not path.exists():
        raise VAEError(f"VAE file not found: {path}")
    sd, meta = read_weights(path)
    sd = unwrap_state_dict(sd)
    name = path.name
    if path.stem.split(".")[0].lower() in GENERIC_STEMS:  # model.safetensors etc.: the folder names the model
        name = f"{path.parent.name}/{path.name}"
    hints = {"filename": name, "metadata": " ".join(f"{k}={v}" for k, v in meta.items() if len(v) < 300)}
    return sd, None, hints


# ------------------------------------------------------------------------------------------------ detection
def describe_non_vae(sd: Mapping[str, torch.Tensor]) -> str:
    """A best guess at what a state dict that is not a VAE is, for the error message."""
    keys = list(sd)
    joined = "\n".join(keys[:4000])
    if re.search(r"(^|\.)(input_blocks|time_embed|time_embedding|double_blocks|joint_blocks|transformer_blocks|"
                 r"down_blocks\.\d+\.attentions)\.", joined):
        return "a diffusion model (UNet or transformer) without VAE weights"
    if re.search(r"(text_model\.|encoder\.block\.\d+\.layer|shared\.weight|embed_tokens|token_embedding)", joined):
        return "a text encoder"
    if re.search(r"(lora_|\.alpha$|lora\.)", joined):
        return "a LoRA"
    return f"an unknown model ({len(keys)} tensors, e.g. {', '.join(keys[:3])})"


def read_config(path: Path) -> dict[str, Any]:
    """A diffusers config.json -> dict, or a VAEError naming the file and what is wrong with it."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise VAEError(f"{path}: cannot read it ({e}); fix or replace the file") from None
    except json.JSONDecodeError as e:
        raise VAEError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file or "
                       "download it again") from None
    if not isinstance(config, dict):
        raise VAEError(f"{path} must hold a JSON object of config fields, got a {type(config).__name__}")
    return config


def _kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "list"
    return "other"


def check_config(config: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> None:
    """Every field the family knows must have its default's type (a string where a number belongs is refused).

    A field whose default is a string may also be a list (diffusers' per-stage block types), and one whose
    default is None takes anything."""
    for key, default in defaults.items():
        if key not in config or default is None or config[key] is None:
            continue
        want, got = _kind(default), _kind(config[key])
        if want == got or (want == "string" and got == "list") or (want == "list" and got == "string"):
            continue
        if want == "number" and got == "bool":
            got = "bool"
        raise VAEError(f"{where}: field {key!r} is {config[key]!r} ({got}), but it must be a {want} like "
                       f"{default!r}; fix the config file")
    for key in ("scaling_factor", "shift_factor"):
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise VAEError(f"{where}: field {key!r} is {v!r}, but it must be a number; fix the config file")


# ------------------------------------------------------------------------------------------------ load_vae
def load_vae(source: Any, family: str | None = None, variant: str | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VAE:
    """Load a VAE of any supported family from a file, folder, state dict, file pair or ``hf:`` reference."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise VAEError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    sd, folder_config, hints = read_source(source)
    pair = isinstance(sd, WeightParts)
    if pair:
        family = family or "tiny"
    else:
        sd, hints["companion_keys"] = strip_vae_prefix(sd)
    if folder_config is not None and family is None:
        rec = registry.by_class(folder_config.get("_class_name", ""))
        family = rec.name if rec else None
    detected = None if pair else registry.detect(sd)
    if family is None:
        if detected is None:
            raise VAEError(f"{hints.get('filename') or 'this state dict'} is not a VAE: it looks like "
                           f"{describe_non_vae(sd)}. Pick a VAE file (e.g. from models/vae)")
        family = detected.name
    rec = registry.get(family)
    mod = rec.module
    if detected is not None and detected.name != family:
        raise VAEError(f"family={family!r} was asked for, but the weights are a {detected.name!r} VAE")
    if not pair and not mod.matches(sd):
        raise VAEError(f"family={family!r} was asked for, but the weights are not that family: "
                       f"{describe_non_vae(sd)}")
    sd = mod.convert(sd)
    try:
        config = dict(mod.infer_config(sd))
    except (KeyError, ValueError, IndexError) as e:
        if isinstance(e, VAEError):
            raise
        raise VAEError(f"the weights look like a {family} VAE but are incomplete (missing {e}): the file may be "
                       "truncated or only part of a model") from None
    inferred = dict(config)
    if folder_config:
        check_config(folder_config, mod.DEFAULT_CONFIG, hints.get("config_path") or "config.json")
        config.update({k: v for k, v in folder_config.items() if not k.startswith("_")})
    explicit = variant is not None
    if variant is None:
        variant = mod.guess_variant(sd, config, hints)
    elif variant not in mod.VARIANTS:
        raise VAEError(f"unknown {family} variant {variant!r}; known: {', '.join(mod.VARIANTS)}")
    preset = mod.VARIANTS.get(variant)
    if preset is not None:
        factors = set(mod.VARIANT_FACTORS)
        if explicit:
            clash = [k for k, v in preset.items() if k not in factors and k in inferred
                     and _shape_value(v) is not None and _shape_value(v) != _shape_value(inferred[k])]
            if clash:
                detail = ", ".join(f"{k}={inferred[k]} (variant: {preset[k]})" for k in clash[:3])
                raise VAEError(f"variant={variant!r} does not fit these weights: {detail}. Use the variant of the "
                               f"weights (detected: {mod.guess_variant(sd, inferred, hints)!r}) or other weights")
        folder_wins = folder_config is not None and not explicit and rec.folder_factors_apply
        for key in factors:  # an explicit variant wins; a guessed one defers to a diffusers folder's own config
            if key in preset and not folder_wins:
                config[key] = preset[key]
        for key, value in preset.items():
            config.setdefault(key, value)
    model = _build(mod, config, sd, family, variant)

    upcast = ""
    if dtype == torch.float16 and config.get("force_upcast", False):
        upcast = f"{family}/{variant} sets force_upcast: kept in float32 (fp16 overflows in this VAE)"
        log.info("vae_core: %s", upcast)
        dtype = torch.float32
    return VAE(model, family, variant, config, device=device, dtype=dtype, upcast_reason=upcast)


def _shape_value(v):
    """Ints and lists of ints (channel counts, layer counts) compare across configs; anything else is skipped."""
    if isinstance(v, (tuple, list)):
        items = [_shape_value(x) for x in v]
        return None if any(x is None for x in items) else items
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _build(mod, config: dict, sd: dict, family: str, variant: str) -> torch.nn.Module:
    """Build on the meta device (no random init, one copy of the weights in memory), then assign the tensors."""
    try:
        with torch.device("meta"):
            model = mod.build(config)
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as e:
        if isinstance(e, VAEError):
            raise
        raise VAEError(f"the {family} config ({variant}) cannot be built: {type(e).__name__}: {e}. Check the "
                       "config fields") from None
    _load_weights(model, sd, family, variant)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # state outside the state dict: build for real
        model = mod.build(config)
        _load_weights(model, sd, family, variant)
    return model


def _load_weights(model: torch.nn.Module, sd: dict, family: str, variant: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {list(sd[k].shape)} vs {list(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {'; '.join(wrong[:2])})")
        raise VAEError(f"the weights do not fit a {family} VAE ({variant}): {'; '.join(parts)}. The file may be "
                       "truncated, of another model, or of an unsupported variant")
    # built on the meta device (no random init of ~1B parameters): assign the tensors then
    model.load_state_dict(sd, strict=True, assign=any(t.is_meta for t in own.values()))
