"""python -m vae_core.cache INPUT... --vae SOURCE --out FOLDER [--ray [ADDRESS]] [options]  (also: vae-cache)"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from ..errors import VAEError
from .pipeline import Settings, build


def parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="vae-cache", description="Encode image folders into a latent cache for training: "
                                "safetensors shards + index.jsonl. Re-running skips what is done and re-encodes what "
                                "is stale.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image folders (recursive: jpg, png, webp), images, or "
                   "list files (one image path a line, relative to the list file)")
    p.add_argument("--vae", required=True, help="anything load_vae takes: a file, a diffusers folder, hf:<repo>, "
                   "or ENCODER,DECODER for a TAESD pair")
    p.add_argument("--out", required=True, help="the cache folder (created; reused to resume)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data; without an address a local Ray instance is started (pip install .[ray])")
    p.add_argument("--family", help="override the detected VAE family (kl, dc, asym, tiny)")
    p.add_argument("--variant", help="override the detected variant (e.g. sdxl, flux1, taef2)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype of the VAE")
    p.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16", "fp16"], help="dtype of the stored latents")
    p.add_argument("--resolution", type=int, default=d.resolution, help="bucket area is about RESOLUTION^2 pixels")
    p.add_argument("--bucket-step", type=int, default=d.bucket_step, help="bucket sides are multiples of this")
    p.add_argument("--max-aspect", type=float, default=d.max_aspect, help="largest bucket aspect ratio")
    p.add_argument("--crop", default=d.crop, choices=["center", "random"], help="crop after resizing to cover")
    p.add_argument("--resample", default=d.resample, choices=["lanczos", "bicubic", "bilinear", "area"])
    p.add_argument("--flip", action="store_true", help="also store each horizontally flipped image's latent")
    p.add_argument("--sample", action="store_true", help="a seeded sample of the posterior instead of its mean")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of --sample and --crop random")
    p.add_argument("--diffusion-space", action="store_true", help="store (z - shift) * scale, what the diffusion "
                   "model sees, instead of raw latents (the factors are recorded in the index either way)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per VAE call")
    p.add_argument("--max-batch-pixels", type=int, default=d.max_batch_pixels,
                   help="fewer images per call in large buckets; a single image too large for memory is tiled")
    p.add_argument("--workers", type=int, default=d.workers, help="image decode/resize threads")
    p.add_argument("--shard-mb", type=float, default=d.shard_mb, help="shard size in MiB")
    p.add_argument("--ray-actors", type=int, help="VAE actors (default: one per GPU, else one)")
    p.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    settings = Settings(resolution=a.resolution, bucket_step=a.bucket_step, max_aspect=a.max_aspect, crop=a.crop,
                        resample=a.resample, flip=a.flip, sample=a.sample, seed=a.seed, dtype=a.dtype,
                        diffusion=a.diffusion_space, batch_size=a.batch_size, max_batch_pixels=a.max_batch_pixels,
                        workers=a.workers, shard_mb=a.shard_mb)
    vae = tuple(a.vae.split(",")) if "," in a.vae else a.vae
    last = [0.0]

    def progress(done, total, errors):
        if not a.quiet and (time.monotonic() - last[0] > 2 or done == total):
            last[0] = time.monotonic()
            print(f"[vae-cache] {done}/{total} images encoded, {errors} errors", file=sys.stderr, flush=True)

    kw = dict(family=a.family, variant=a.variant, device=a.device, vae_dtype=a.vae_dtype, progress=progress)
    try:
        if a.ray is not None:
            from .ray_backend import build_ray
            result = build_ray(a.inputs, vae, a.out, settings, address=a.ray or None, actors=a.ray_actors,
                               num_cpus=a.ray_cpus, **kw)
        else:
            result = build(a.inputs, vae, a.out, settings, **kw)
    except VAEError as e:
        print(f"vae-cache: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vae-cache: interrupted; what was written is kept, run the same command again to resume",
              file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
