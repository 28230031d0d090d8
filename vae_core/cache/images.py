"""Finding, hashing, probing and preprocessing the source images (PIL; EXIF orientation honoured)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import VAEError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
           "bilinear": Image.Resampling.BILINEAR, "area": Image.Resampling.BOX}
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def list_images(inputs) -> list[Path]:
    """Image files from folders (recursive) and list files (one path a line, relative to the list's folder)."""
    found: dict[Path, None] = {}
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(EXTENSIONS):
                        found[(Path(root) / name).resolve()] = None
        elif p.is_file() and p.suffix.lower() in EXTENSIONS:
            found[p.resolve()] = None
        elif p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line) if Path(line).is_absolute() else p.parent / line
                    found[q.resolve()] = None
        else:
            raise VAEError(f"input {item} is neither an image folder, an image nor a list file: check the path")
    return sorted(found)


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def probe(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation, from the header alone."""
    with Image.open(path) as img:
        w, h = img.size
        if img.getexif().get(0x0112) in _SWAPS_SIDES:
            w, h = h, w
    return w, h


def load(path: Path, resized: tuple[int, int], crop: tuple[int, int, int, int], resample: str) -> np.ndarray:
    """Decode, orient, convert to RGB, resize and crop: uint8 [H, W, 3]."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != tuple(resized):
            img = img.resize(tuple(resized), FILTERS[resample], reducing_gap=None)
        img = img.crop(tuple(crop))
        return np.asarray(img, dtype=np.uint8).copy()


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or [H, W, 3]) -> float32 [B, 3, H, W] in [-1, 1], kept channels-last in memory."""
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    if x.ndim == 3:
        x = x.unsqueeze(0)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
