"""Latent-cache throughput: a plain training-script loop against vae_core.cache's local and Ray backends.

One run, the same images and the same weights for all three: the images are a generated dataset of the shared
photo (tests/cache_dataset.py); the VAEs are diffusers models with seeded weights saved as diffusers folders, so
the plain loop runs diffusers itself and vae_core loads the same folder:
- a small VAE: diffusers AutoencoderTiny (the taesd layout; TAEF2's pooled branch has no diffusers class);
- the SD1-config AutoencoderKL.
The plain loop is what training scripts do: one image at a time, PIL open + EXIF transpose + resize + crop (to the
bucket the cache picks, so the work is the same), ``vae.encode(x)`` with diffusers, one ``.npz`` per image. The
backends run ``cache.build`` / ``build_ray`` (a local Ray instance) into fresh folders. images/s excludes loading
the VAE and starting Ray for every method (Ray's actor start, VAE load included, is inside its time). The three
run interleaved for ``--rounds`` rounds in a rotating order; each figure is the method's median.
Ratios: local / plain loop (target >= 2), Ray / local (target >= 0.85).

    .venv/bin/python bench/bench_cache.py                      # CPU, both VAEs
    .venv/bin/python bench/bench_cache.py --vaes tiny --images 200 --resolution 256
    .venv/bin/python bench/bench_cache.py --device cuda --images 2000 --resolution 512 --batch-size 32
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SD1 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           scaling_factor=0.18215)


def make_vae(kind: str, folder: Path):
    import diffusers
    import torch

    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny() if kind == "tiny" else diffusers.AutoencoderKL(**SD1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.eval().save_pretrained(folder, safe_serialization=True)
    return ref


def plain_loop(ref, kind, items, out: Path, device) -> float:
    """One image at a time, the way training scripts cache latents; returns seconds."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    out.mkdir(parents=True, exist_ok=True)
    ref.to(device)
    t0 = time.perf_counter()
    for n, item in enumerate(items):
        r = item["recipe"]
        img = ImageOps.exif_transpose(Image.open(item["path"])).convert("RGB")
        img = img.resize(tuple(r["resize"]), Image.Resampling.LANCZOS).crop(tuple(r["crop"]))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(device)
        with torch.no_grad():
            enc = ref.encode(x)
            z = enc.latents if kind == "tiny" else enc.latent_dist.mean
        np.savez(out / f"{n:06d}.npz", latents=z[0].float().cpu().numpy(), original_size=np.array(item["size"]),
                 crop_ltrb=np.array(r["crop"]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vaes", nargs="+", default=["tiny", "kl"], choices=["tiny", "kl"])
    ap.add_argument("--images", type=int, default=120, help="images in the generated dataset")
    ap.add_argument("--resolution", type=int, default=128, help="bucket area (the tiny VAE); the KL uses half")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ray-cpus", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median of each method is used")
    args = ap.parse_args()

    import numpy as np
    import torch
    from cache_dataset import make_dataset
    from conftest import PHOTO

    from vae_core import cache
    from vae_core.cache.ray_backend import build_ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        tmp = Path(tmp)
        images = make_dataset(PHOTO, tmp / "images", n=args.images, sizes=(64, 512))
        for kind in args.vaes:
            folder = tmp / f"vae_{kind}"
            ref = make_vae(kind, folder)
            res = args.resolution if kind == "tiny" else max(64, args.resolution // 2 // 64 * 64)
            settings = cache.Settings(resolution=res, bucket_step=64, dtype="fp32", batch_size=args.batch_size,
                                      workers=args.workers)
            times: dict[str, list[float]] = {"loop": [], "local": [], "ray": []}
            for r in range(args.rounds):  # interleaved, the order rotating: the machine drifts between methods
                for method in ("local", "loop", "ray")[r % 3:] + ("local", "loop", "ray")[:r % 3]:
                    dest = tmp / f"{method}_{kind}_{r}"
                    if method == "local":
                        s = cache.build([images], str(folder), dest, settings, device=args.device)
                        times["local"].append(s["plan_seconds"] + s["seconds"])
                        first = dest
                    elif method == "ray":
                        s = build_ray([images], str(folder), dest, settings, num_cpus=args.ray_cpus,
                                      device=args.device)
                        times["ray"].append(s["plan_seconds"] + s["seconds"])
                    else:
                        if not (tmp / f"local_{kind}_0").is_dir():
                            cache.build([images], str(folder), tmp / f"local_{kind}_0", settings, device=args.device)
                        items = cache.open(tmp / f"local_{kind}_0").entries
                        times["loop"].append(plain_loop(ref, kind, items, dest, args.device))
                        npz = dest
            n = len(cache.open(first))
            med = {k: statistics.median(v) for k, v in times.items()}
            loop_ips, local_ips, ray_ips = n / med["loop"], n / med["local"], n / med["ray"]
            rows.append(dict(vae=kind, images=n, resolution=res, rounds=args.rounds, plain_loop_ips=loop_ips,
                             local_ips=local_ips, ray_ips=ray_ips, local_vs_loop=local_ips / loop_ips,
                             ray_vs_local=ray_ips / local_ips, seconds={k: [round(x, 2) for x in v] for k, v in times.items()}))
            print(json.dumps(rows[-1]), flush=True)
            # the plain loop and the backends computed the same latents (diffusers' AutoencoderTiny returns scaled
            # latents; the cache holds raw ones)
            ds = cache.open(first)
            sf, shift = (ds.meta["vae"]["scaling_factor"], ds.meta["vae"]["shift_factor"]) if kind == "tiny" else (1, 0)
            worst = max(float((torch.from_numpy(np.load(npz / f"{i:06d}.npz")["latents"]) / sf + shift
                               - ds[i]["latent"]).abs().max()) for i in range(0, n, max(1, n // 10)))
            print(f"  {kind}: max |plain loop - cache| over sampled entries {worst:.2e}", flush=True)
    print(f"\n{'VAE':6} {'images':>6} {'bucket area':>11} {'plain loop':>11} {'local':>8} {'Ray':>8} "
          f"{'local/loop':>10} {'Ray/local':>9}   (images/s, {args.device}, torch threads {torch.get_num_threads()})")
    for r in rows:
        print(f"{r['vae']:6} {r['images']:>6} {r['resolution']:>9}^2 {r['plain_loop_ips']:>11.2f} {r['local_ips']:>8.2f} "
              f"{r['ray_ips']:>8.2f} {r['local_vs_loop']:>10.2f} {r['ray_vs_local']:>9.2f}")


if __name__ == "__main__":
    main()
