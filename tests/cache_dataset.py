"""A generated image dataset for the latent-cache tests and bench: crops, flips, sizes and formats of the shared
photo (jpg, png, webp; RGBA, grayscale and palette images; one stored rotated with an EXIF orientation tag),
in nested folders, plus corrupt files."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

CORRUPT = ("bad/truncated.jpg", "bad/random.png", "bad/empty.webp", "bad/text.jpg")
EXIF_ROTATED = "exif/rotated.jpg"


def make_dataset(photo_path: Path, folder: Path, n: int = 200, seed: int = 0, sizes=(48, 256)) -> Path:
    """``n`` valid images (one of them ``EXIF_ROTATED``) and the ``CORRUPT`` files under ``folder``."""
    rng = random.Random(seed)
    src = Image.open(photo_path).convert("RGB")
    folder = Path(folder)
    for i in range(n - 1):
        cw, ch = rng.randint(96, 512), rng.randint(96, 512)
        left, top = rng.randint(0, 512 - cw), rng.randint(0, 512 - ch)
        img = src.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = rng.uniform(sizes[0], sizes[1]) / max(cw, ch)
        img = img.resize((max(16, round(cw * scale)), max(16, round(ch * scale))), Image.Resampling.BILINEAR)
        fmt = ("jpg", "png", "webp")[i % 3]
        mode = rng.choice(("RGB",) * 6 + ("RGBA", "L", "P"))
        if mode == "RGBA":
            img = img.convert("RGBA")
            fmt = "png"
        elif mode == "L":
            img = img.convert("L")
        elif mode == "P":
            img = img.convert("P")
            fmt = "png"
        path = folder / f"set{i % 4}" / f"img{i:04d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90) if fmt in ("jpg", "webp") else img.save(path)
    rotated = src.crop((0, 0, 256, 160)).resize((128, 80)).transpose(Image.Transpose.ROTATE_90)  # stored 80x128
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the displayed image is 128x80 again
    (folder / EXIF_ROTATED).parent.mkdir(parents=True, exist_ok=True)
    rotated.save(folder / EXIF_ROTATED, quality=95, exif=exif)
    (folder / "bad").mkdir(exist_ok=True)
    good = sorted(folder.glob("set*/*.jpg"))[0]
    (folder / CORRUPT[0]).write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (folder / CORRUPT[1]).write_bytes(bytes(rng.randrange(256) for _ in range(2000)))
    (folder / CORRUPT[2]).write_bytes(b"")
    (folder / CORRUPT[3]).write_text("not an image\n")
    (folder / "notes.txt").write_text("ignored: not an image extension\n")
    return folder
