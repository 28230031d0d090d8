"""The cache pipeline: plan (hash, probe, bucket, skip what is fresh), preprocess, encode by bucket, write.

The plan and the per-batch encode are shared by the local backend (here) and the Ray backend (ray_backend.py),
so both produce the same index and the same latents.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import load_vae
from ..errors import VAEError
from . import buckets as bk
from . import images as im
from .store import Store

log = logging.getLogger("vae_core.cache")

PREFETCH = 2  # batches decoded ahead of the one being encoded
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Settings:
    """Preprocessing and output settings. Those that change a latent are recorded per entry (its ``recipe``)."""
    resolution: int = 1024        # buckets hold about resolution**2 pixels
    bucket_step: int = 64         # bucket sides are multiples of this (and of the VAE's downscale)
    max_aspect: float = 2.0       # longest side / shortest side of a bucket, at most
    crop: str = "center"          # or "random" (seeded by ``seed`` and the image's content hash)
    resample: str = "lanczos"     # resize filter: lanczos, bicubic, bilinear, area
    flip: bool = False            # also store the latent of the horizontally flipped image
    sample: bool = False          # a seeded sample of the posterior instead of its mean
    seed: int = 0
    dtype: str = "bf16"           # latents on disk: fp32, bf16, fp16
    diffusion: bool = False       # store vae.to_diffusion(z) (scaled and shifted) instead of raw latents
    batch_size: int = 8           # images per VAE call (their flips ride along)
    max_batch_pixels: int = 4 * 1024 * 1024  # fewer images per call for large buckets; one image is auto-tiled
    workers: int = 2              # image decode/resize threads
    shard_mb: float = 1024

    def check(self, vae) -> None:
        if self.crop not in ("center", "random"):
            raise VAEError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if self.resample not in im.FILTERS:
            raise VAEError(f"resample must be one of {', '.join(im.FILTERS)}, got {self.resample!r}")
        if self.dtype not in DTYPES:
            raise VAEError(f"dtype must be one of fp32, bf16, fp16, got {self.dtype!r}")
        if self.bucket_step <= 0 or self.bucket_step % vae.downscale:
            raise VAEError(f"bucket step {self.bucket_step} is not a multiple of this VAE's downscale factor "
                           f"{vae.downscale}: use --bucket-step {max(64, vae.downscale)}")
        if self.resolution < self.bucket_step:
            raise VAEError(f"resolution {self.resolution} is below the bucket step {self.bucket_step}")
        if self.max_aspect < 1:
            raise VAEError(f"max aspect ratio must be at least 1, got {self.max_aspect}")
        if self.batch_size < 1 or self.workers < 1:
            raise VAEError("batch size and workers must be at least 1")
        if not vae.can_encode:
            raise VAEError(f"this {vae.family} VAE ({vae.variant}) has no encoder: pass the encoder file as --vae")

    def recipe(self, bucket, resized, crop) -> dict:
        """Everything that decides one entry's latent besides the image and the VAE."""
        r = {"bucket": list(bucket), "resize": list(resized), "crop": list(crop), "resample": self.resample,
             "flip": self.flip, "sample": self.sample, "dtype": self.dtype,
             "space": "diffusion" if self.diffusion else "raw"}
        if self.sample:
            r["seed"] = self.seed
        if self.crop == "random":
            r["crop_seed"] = self.seed
        return r


def vae_identity(vae, source) -> dict:
    """Family, variant, latent geometry, scaling and a SHA-256 of the weights as loaded (names, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(vae.model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"source": str(source), "family": vae.family, "variant": vae.variant, "weights_sha256": h.hexdigest(),
            "latent_channels": vae.latent_channels, "downscale": vae.downscale,
            "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor}


@dataclass
class Plan:
    batches: list[dict] = field(default_factory=list)    # {"bucket", "seed", "items": [item...]}
    keep: set[str] = field(default_factory=set)           # every source path of this run (done or to do)
    fresh: int = 0
    stale: int = 0
    errors: list[dict] = field(default_factory=list)      # error records found while planning
    meta: dict = field(default_factory=dict)
    seconds: float = 0.0                                  # time to plan (hash, probe, bucket)


def make_plan(inputs, store: Store, vae_id: dict, settings: Settings) -> Plan:
    paths = im.list_images(inputs)
    root = Path(os.path.commonpath([p.parent for p in paths])) if paths else Path(".")
    buckets = bk.make_buckets(settings.resolution, settings.bucket_step, settings.max_aspect)
    plan = Plan(keep={str(p) for p in paths})
    plan.meta = {"vae": vae_id, "settings": asdict(settings), "buckets": [list(b) for b in buckets]}

    def survey(path: Path):
        old = store.entries.get(str(path))
        st = path.stat()
        if old and old["bytes"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
            return old["hash"], tuple(old["size"]), st, old
        try:
            digest = im.file_hash(path)
            size = im.probe(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is an index error, never a stopped run
            return None, f"cannot read image: {type(e).__name__}: {e}", st, old
        return digest, size, st, old

    todo: dict[tuple, list[dict]] = {}
    with ThreadPoolExecutor(settings.workers) as pool:
        for path, (digest, size, st, old) in zip(paths, pool.map(survey, paths)):
            if digest is None:
                plan.errors.append({"type": "error", "path": str(path), "error": size})
                continue
            bucket = bk.pick_bucket(*size, buckets)
            resized, crop = bk.fit(*size, bucket, settings.crop, settings.seed, digest)
            item = {"path": str(path), "key": path.relative_to(root).as_posix(), "hash": digest,
                    "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "size": list(size),
                    "recipe": settings.recipe(bucket, resized, crop), "vae": vae_id["weights_sha256"]}
            if old and all(old.get(k) == item[k] for k in ("hash", "recipe", "vae")):
                plan.fresh += 1
                if old["key"] != item["key"] or old["mtime_ns"] != item["mtime_ns"]:  # moved root or touched file
                    store.apply({**old, "key": item["key"], "mtime_ns": item["mtime_ns"]})
                continue
            plan.stale += old is not None
            todo.setdefault(bucket, []).append(item)
    for bucket in sorted(todo):
        items = sorted(todo[bucket], key=lambda i: i["key"])
        per = max(1, min(settings.batch_size, settings.max_batch_pixels // (bucket[0] * bucket[1])))
        for i in range(0, len(items), per):
            chunk = items[i:i + per]
            seed = hashlib.sha256(f"{settings.seed}:{','.join(c['hash'] for c in chunk)}".encode()).digest()
            plan.batches.append({"bucket": list(bucket), "seed": int.from_bytes(seed[:7], "big"), "items": chunk})
    return plan


def load_item(item: dict):
    """Decode and preprocess one image: uint8 [H, W, 3], or the error message when it cannot be read."""
    r = item["recipe"]
    try:
        return im.load(Path(item["path"]), r["resize"], r["crop"], r["resample"])
    except Exception as e:  # noqa: BLE001 - a corrupt image is an index error, never a stopped run
        return f"cannot decode image: {type(e).__name__}: {e}"


def encode_batch(vae, batch: dict, pixels: list) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Encode one batch; returns the tensors of a part file and the entry/error records (``shard`` unset)."""
    good = [(item, px) for item, px in zip(batch["items"], pixels) if not isinstance(px, str)]
    records = [{"type": "error", "path": item["path"], "error": px}
               for item, px in zip(batch["items"], pixels) if isinstance(px, str)]
    tensors: dict[str, torch.Tensor] = {}
    if not good:
        return tensors, records
    import numpy as np

    recipe = good[0][0]["recipe"]
    x = im.to_tensor(np.stack([px for _, px in good]))
    if recipe["flip"]:
        x = torch.cat([x, x.flip(-1)]).contiguous(memory_format=torch.channels_last)
    z = encode(vae, x, recipe["sample"], batch["seed"])
    if recipe["space"] == "diffusion":
        z = vae.to_diffusion(z)
    z = z.to(DTYPES[recipe["dtype"]]).cpu()
    n = len(good)
    for row, (item, _) in enumerate(good):
        entry = {**item, "type": "entry", "tensor": item["key"], "latent_shape": list(z.shape[1:])}
        tensors[item["key"]] = z[row].clone()
        if recipe["flip"]:
            entry["tensor_flip"] = item["key"] + "#flip"
            tensors[entry["tensor_flip"]] = z[n + row].clone()
        if recipe["sample"]:
            entry["noise"] = {"seed": batch["seed"], "row": row, "rows": len(z)}
        records.append(entry)
    return tensors, records


def encode(vae, x: torch.Tensor, sample: bool, seed: int) -> torch.Tensor:
    """vae.encode, auto-tiled by vae_core when too large; on running out of memory, one image at a time, tiled."""
    gen = torch.Generator(vae.device).manual_seed(seed) if sample else None
    try:
        return vae.encode(x.to(vae.device), sample=sample, generator=gen, tile=None)
    except torch.OutOfMemoryError:
        if vae.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("vae_core.cache: out of memory on a batch of %d; encoding one image at a time, tiled", len(x))
        gen = torch.Generator(vae.device).manual_seed(seed) if sample else None
        return torch.cat([vae.encode(x[i:i + 1].to(vae.device), sample=sample, generator=gen, tile=True)
                          for i in range(len(x))])


Progress = Callable[[int, int, int], None]  # (images done, images to do, errors so far)


def build(inputs, vae: str, out, settings: Settings | None = None, *, family: str | None = None,
          variant: str | None = None, device: str | None = None, vae_dtype: str = "fp32",
          progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """Encode every image of ``inputs`` (folders, images, list files) into a cache folder ``out``; returns a summary.

    Images already cached with the same content, VAE and recipe are skipped; stale ones are re-encoded.
    """
    settings = settings or Settings()
    model = load_vae(vae, family=family, variant=variant, device=device or default_device(), dtype=DTYPES[vae_dtype])
    settings.check(model)
    store = Store(out, settings.shard_mb)
    t_plan = time.perf_counter()
    plan = make_plan(inputs, store, vae_identity(model, vae), settings)
    plan.seconds = time.perf_counter() - t_plan
    store.commit(plan.errors)
    store.meta = {**plan.meta, "type": "meta"}
    t0 = time.perf_counter()
    total = sum(len(b["items"]) for b in plan.batches)
    done, errors = 0, len(plan.errors)
    with ThreadPoolExecutor(settings.workers) as pool, _Writer(store) as writer:
        ahead = [[pool.submit(load_item, item) for item in b["items"]] for b in plan.batches[:PREFETCH]]
        for i, batch in enumerate(plan.batches):
            if should_stop is not None and should_stop():
                break
            pixels = [f.result() for f in ahead.pop(0)]  # later batches decode in the pool while this one encodes
            if i + PREFETCH < len(plan.batches):
                ahead.append([pool.submit(load_item, item) for item in plan.batches[i + PREFETCH]["items"]])
            tensors, records = encode_batch(model, batch, pixels)
            writer.put(tensors, records)
            done += len(batch["items"])
            errors += sum(r["type"] == "error" for r in records)
            if progress is not None:
                progress(done, total, errors)
        for futures in ahead:
            for f in futures:
                f.cancel()
    complete = done == total
    if complete:
        store.finish(plan.meta, keep=plan.keep)
    return summary(store, plan, done, errors - len(plan.errors), total, time.perf_counter() - t0, complete)


def summary(store: Store, plan: Plan, done: int, failed: int, total: int, seconds: float, complete: bool) -> dict:
    """``encoded``: images written this run; ``to_do``: images this run had to encode; ``errors``: unreadable
    images in the index; ``fresh``/``stale``: images found cached, up to date / out of date; ``plan_seconds``:
    hashing and probing; ``seconds``: decoding, encoding and writing."""
    return {"folder": str(store.folder), "encoded": done - failed, "to_do": total, "fresh": plan.fresh, "stale": plan.stale,
            "errors": len(store.errors), "entries": len(store.entries), "plan_seconds": plan.seconds, "seconds": seconds,
            "complete": complete,
            "images_per_s": (done - failed) / seconds if seconds > 0 else 0.0}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Writer:
    """Writes part files and journal lines on a thread, one batch behind the encoder (a queue of one)."""

    def __init__(self, store: Store):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="vae-cache-writer", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def put(self, tensors, records) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((tensors, records))

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                tensors, records = job
                if tensors:
                    part = self.store.write_part(tensors)
                    records = [{**r, "shard": part} if r["type"] == "entry" else r for r in records]
                self.store.commit(records)
                if self.store.part_bytes() >= self.store.shard_bytes:
                    self.store.finish(self.store.meta, partial=True)
            except BaseException as e:  # noqa: BLE001 - handed to the encoding thread
                self.error = e

    def __exit__(self, *exc):
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error
        return False
