"""Latent caches for training: encode an image dataset once, read its latents memory-mapped while training.

    python -m vae_core.cache photos/ --vae ae.safetensors --out cache/ [--ray [ADDRESS]]

    from vae_core import cache
    ds = cache.open("cache/")               # a Dataset: len(ds), ds[i] / ds["key"] -> {"latent", "path", ...}
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ds.sampler(batch_size=16, shuffle=True, seed=0))

The format is described in store.py and the README. Ray (``--ray``) is optional and only imported by
ray_backend.py.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..errors import VAEError
from .pipeline import Settings, build
from .store import INDEX, ShardFile, State

__all__ = ["open", "build", "Settings", "LatentCache", "BucketBatchSampler"]


def open(folder) -> "LatentCache":  # noqa: A001 - the module's reader, as in tarfile.open
    """The latents of a cache folder as a map-style Dataset (what the last run committed, finished or not)."""
    return LatentCache(folder)


class LatentCache(torch.utils.data.Dataset):
    """``ds[i]`` or ``ds[key]``: {"latent": tensor [C,h,w] (a view into the memory-mapped shard), "latent_flip"
    (when cached with --flip), "path", "key", "size" (original w, h), "crop" (left, top, right, bottom in the
    resized image), "resize", "bucket" (w, h)}. Entries are in key order; ``meta`` holds the VAE and settings."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not (self.folder / INDEX).is_file() and not (self.folder / "journal.jsonl").is_file():
            raise VAEError(f"{self.folder} is not a latent cache (no {INDEX}): build one with python -m vae_core.cache")
        state = State(self.folder)
        self.meta = state.meta
        self.errors = dict(state.errors)
        self.entries = sorted(state.entries.values(), key=lambda e: e["key"])
        self._by_key = {e["key"]: i for i, e in enumerate(self.entries)}
        self._shards: dict[str, ShardFile] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def index_of(self, key: str) -> int:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"no entry {key!r} in {self.folder} (keys are paths relative to the inputs' "
                           f"common folder, e.g. {self.entries[0]['key'] if self.entries else '…'!r})") from None

    def __getitem__(self, i):
        e = self.entries[self.index_of(i) if isinstance(i, str) else i]
        shard = self._shards.get(e["shard"])
        if shard is None:
            shard = self._shards[e["shard"]] = ShardFile(self.folder / e["shard"])
        r = e["recipe"]
        item = {"latent": shard.get(e["tensor"]), "path": e["path"], "key": e["key"], "size": tuple(e["size"]),
                "crop": tuple(r["crop"]), "resize": tuple(r["resize"]), "bucket": tuple(r["bucket"])}
        if "tensor_flip" in e:
            item["latent_flip"] = shard.get(e["tensor_flip"])
        return item

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        out: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(self.entries):
            out.setdefault(tuple(e["recipe"]["bucket"]), []).append(i)
        return out

    def sampler(self, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        return BucketBatchSampler(self, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def __getstate__(self):  # DataLoader workers re-map the shards themselves
        return {**self.__dict__, "_shards": {}}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that share a bucket (so their latents stack); shuffled per epoch with ``seed`` + epoch
    (call ``set_epoch``), within buckets and across batches."""

    def __init__(self, ds: LatentCache, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise VAEError(f"batch_size must be at least 1, got {batch_size}")
        self.groups = list(ds.buckets().values())
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batches = []
        for group in self.groups:
            group = list(group)
            if self.shuffle:
                rng.shuffle(group)
            for i in range(0, len(group), self.batch_size):
                if len(group[i:i + self.batch_size]) == self.batch_size or not self.drop_last:
                    batches.append(group[i:i + self.batch_size])
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
