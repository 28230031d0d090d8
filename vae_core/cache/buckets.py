"""Aspect-ratio buckets at a target area (SDXL-style) and the resize + crop that puts an image into one."""
from __future__ import annotations

import hashlib
import math
import random

from ..errors import VAEError


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Every (width, height) on a ``step`` grid with width * height <= resolution**2 and the longest side at most
    ``max_aspect`` times the shortest, taking for each width the tallest height that fits the area."""
    area = resolution * resolution
    buckets = set()
    w = step
    while w * step <= area:
        h = (area // w) // step * step
        if h >= step and max(w, h) <= max_aspect * min(w, h):
            buckets.add((w, h))
        w += step
    if not buckets:  # max_aspect below the grid's resolution: the square bucket alone
        side = max(step, resolution // step * step)
        buckets.add((side, side))
    return sorted(buckets)


def pick_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space); ties go to the larger area."""
    ar = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1], b))


def fit(width: int, height: int, bucket: tuple[int, int], crop: str, seed: int, content_hash: str):
    """Resize (to cover the bucket, aspect kept) and crop box for one image.

    Returns ``(resized (w, h), crop box (left, top, right, bottom) in the resized image)``. A random crop draws
    its offset from the seed and the image's content hash, so it is the same on every run and every backend.
    """
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    if crop == "center":
        left, top = (rw - bw) // 2, (rh - bh) // 2
    elif crop == "random":
        rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{content_hash}".encode()).digest()[:8], "big"))
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        raise VAEError(f"crop must be 'center' or 'random', got {crop!r}: use --crop center or --crop random")
    return (rw, rh), (left, top, left + bw, top + bh)
