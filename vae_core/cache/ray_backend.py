"""The cache pipeline on Ray Data (``--ray [ADDRESS]``; ``pip install .[ray]``). The only module that imports ray.

The driver plans exactly as the local backend does (same batches, same seeds); Ray Data then runs two operators
over the batches: decode + preprocess (CPU tasks) and encode (VAE actors, one per GPU, else CPU actors) whose
workers write each batch's part file into the output folder. The driver journals each finished batch as it
arrives and merges the parts into shards and the index at the end, so resume works as in the local backend.
The output folder, the images and the VAE source must be reachable under the same paths from every node.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import time
from pathlib import Path

import torch

from .. import load_vae
from .pipeline import DTYPES, Settings, default_device, encode_batch, load_item, make_plan, summary, vae_identity
from .store import Store, write_part

LOCAL_OBJECT_STORE = 256 * 2**20  # a local instance on a small machine: batches are small, keep the store small
_PACKAGE = Path(__file__).resolve().parents[1]  # vae_core/


def _preprocess(row: dict) -> dict:
    batch = json.loads(row["batch"])
    return {"batch": row["batch"], "pixels": pickle.dumps([load_item(i) for i in batch["items"]], protocol=5)}


class _Encoder:
    """A VAE actor: loads the VAE once, encodes batches, writes their part files."""

    def __init__(self, vae, family, variant, device, vae_dtype, out, threads):
        if threads:
            torch.set_num_threads(threads)
        self.vae = load_vae(vae, family=family, variant=variant, device=device or default_device(),
                            dtype=DTYPES[vae_dtype])
        self.out = out

    def __call__(self, row: dict) -> dict:
        batch = json.loads(row["batch"])
        tensors, records = encode_batch(self.vae, batch, pickle.loads(row["pixels"]))
        if tensors:
            part = write_part(self.out, tensors)
            records = [{**r, "shard": part} if r["type"] == "entry" else r for r in records]
        return {"records": json.dumps(records)}


def build_ray(inputs, vae, out, settings: Settings | None = None, *, address: str | None = None,
              actors: int | None = None, num_cpus: int | None = None, family=None, variant=None, device=None,
              vae_dtype: str = "fp32", progress=None) -> dict:
    """``pipeline.build`` on Ray: on the cluster at ``address``, or on a local instance started (and shut down)
    here with ``num_cpus`` CPUs (default: all). ``actors``: VAE actors (default: one per GPU, else one)."""
    import ray

    settings = settings or Settings()
    started = not ray.is_initialized()
    if started:
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, runtime_env={"py_modules": [str(_PACKAGE)]}, **quiet)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                         [str(_PACKAGE.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}}, **quiet)
    try:
        return _run(ray, inputs, vae, out, settings, address, actors, family, variant, device, vae_dtype, progress)
    finally:
        if started:
            ray.shutdown()


def _run(ray, inputs, vae, out, settings, address, actors, family, variant, device, vae_dtype, progress):
    model = load_vae(vae, family=family, variant=variant, device="cpu", dtype=DTYPES[vae_dtype])
    settings.check(model)
    vae_id = vae_identity(model, vae)
    store = Store(out, settings.shard_mb)
    t_plan = time.perf_counter()
    plan = make_plan(inputs, store, vae_id, settings)
    plan.seconds = time.perf_counter() - t_plan
    del model
    store.commit(plan.errors)
    store.meta = {**plan.meta, "type": "meta"}
    t0 = time.perf_counter()
    total = sum(len(b["items"]) for b in plan.batches)
    done, errors = 0, len(plan.errors)
    if plan.batches:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n = actors or max(1, gpus)
        threads = None if address or gpus else max(1, int(ray.cluster_resources().get("CPU", 1)) // n)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        rows = [{"batch": json.dumps(b)} for b in plan.batches]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map(_preprocess, num_cpus=1)
        ds = ds.map(_Encoder, compute=ray.data.ActorPoolStrategy(size=n), num_gpus=1 if gpus else 0, num_cpus=1,
                    fn_constructor_kwargs=dict(vae=vae, family=family, variant=variant,
                                               device=device or ("cuda" if gpus else "cpu"), vae_dtype=vae_dtype,
                                               out=str(store.folder), threads=threads))
        for row in ds.iter_rows():
            records = json.loads(row["records"])
            store.commit(records)
            done += len(records)
            errors += sum(r["type"] == "error" for r in records)
            if progress is not None:
                progress(done, total, errors)
    store.finish(plan.meta, keep=plan.keep)
    return {**summary(store, plan, done, errors - len(plan.errors), total, time.perf_counter() - t0, True),
            "backend": "ray"}
