"""The cache folder on disk: shards, the index, the journal of an unfinished run, and memory-mapped reads.

    index.jsonl       line 1: {"type": "meta", ...}; then one {"type": "entry", ...} per image, sorted by key,
                      then one {"type": "error", "path", "error"} per unreadable image. Rewritten atomically.
    shards/NNNNN.safetensors   the latents, about ``shard_mb`` each, tensors named by entry key
    parts/*.safetensors        one file per encoded batch of a run in progress (merged into shards at its end)
    journal.jsonl     entries and errors committed since the index was last written (appended, fsync'd)

Every file is written to a temporary name, fsync'd and renamed, so a killed run leaves either the old file or the
new one; a journal line torn by a kill is ignored. Entries are keyed by source path: a later line replaces an
earlier one, so replaying the journal never duplicates an entry.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import VAEError

FORMAT = "vae_core.cache/1"
INDEX, JOURNAL, PARTS, SHARDS = "index.jsonl", "journal.jsonl", "parts", "shards"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write a safetensors file under a temporary name, fsync, rename; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path.stat().st_size


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1:]):
                raise VAEError(f"{path} is corrupt at line {i + 1}: delete the cache folder and run again") from None
    return out  # only a torn last line (a kill while appending) is dropped


class State:
    """What a cache folder holds: the meta of its last index, entries by source path, errors by source path."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta: dict = {}
        self.entries: dict[str, dict] = {}
        self.errors: dict[str, str] = {}
        records = read_jsonl(self.folder / INDEX)
        if records and records[0].get("type") == "meta":
            self.meta = records.pop(0)
            if self.meta.get("format") != FORMAT:
                raise VAEError(f"{self.folder} holds a cache of format {self.meta.get('format')!r}, not {FORMAT!r}: "
                               "use another --out folder")
        for rec in records + read_jsonl(self.folder / JOURNAL):
            self.apply(rec)

    def apply(self, rec: dict) -> None:
        if rec["type"] == "entry":
            if (self.folder / rec["shard"]).is_file():  # a journal line whose part vanished is not data
                self.entries[rec["path"]] = rec
                self.errors.pop(rec["path"], None)
        elif rec["type"] == "error":
            self.errors[rec["path"]] = rec["error"]
            self.entries.pop(rec["path"], None)


class Store(State):
    """A cache folder opened for writing by one run."""

    def __init__(self, folder: Path, shard_mb: float = 1024):
        folder = Path(folder)
        (folder / PARTS).mkdir(parents=True, exist_ok=True)
        (folder / SHARDS).mkdir(parents=True, exist_ok=True)
        super().__init__(folder)
        self.shard_bytes = int(shard_mb * 2**20)
        self._collect_garbage()

    # ---------------------------------------------------------------------------------------------- a run
    def write_part(self, tensors: dict[str, torch.Tensor]) -> str:
        """One batch's latents as a part file; returns its name relative to the folder."""
        return write_part(self.folder, tensors)

    def commit(self, records: list[dict]) -> None:
        """Append a batch's entries and errors to the journal (durable when this returns), then apply them."""
        with open(self.folder / JOURNAL, "ab") as f:
            f.write(b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        for rec in records:
            self.apply(rec)

    def part_bytes(self) -> int:
        parts = {e["shard"] for e in self.entries.values() if e["shard"].startswith(PARTS + "/")}
        return sum((self.folder / p).stat().st_size for p in parts)

    def finish(self, meta: dict, keep: set[str] | None = None, partial: bool = False) -> None:
        """Merge part files into shards, write the index (entries of ``keep`` paths only, when given) and empty
        the journal. ``partial``: merge only whole shards' worth of parts (a run in progress)."""
        if keep is not None:
            self.entries = {p: e for p, e in self.entries.items() if p in keep}
            self.errors = {p: e for p, e in self.errors.items() if p in keep}
        pending = sorted((e for e in self.entries.values() if e["shard"].startswith(PARTS + "/")),
                         key=lambda e: e["key"])
        groups, group, size = [], [], 0
        for e in pending:
            group.append(e)
            size += _entry_bytes(e)
            if size >= self.shard_bytes:
                groups.append(group)
                group, size = [], 0
        if group and not partial:
            groups.append(group)
        number = 1 + max((int(p.stem) for p in (self.folder / SHARDS).glob("*.safetensors") if p.stem.isdigit()),
                         default=-1)
        for group in groups:
            name = f"{SHARDS}/{number:05d}.safetensors"
            number += 1
            tensors, opened = {}, {}
            for e in group:
                shard = opened.setdefault(e["shard"], ShardFile(self.folder / e["shard"]))
                for field, suffix in (("tensor", ""), ("tensor_flip", "#flip")):
                    if field in e:
                        tensors[e["key"] + suffix] = shard.get(e[field]).clone()
            save_tensors_atomic(self.folder / name, tensors)
            for e in group:
                e["shard"], e["tensor"] = name, e["key"]
                if "tensor_flip" in e:
                    e["tensor_flip"] = e["key"] + "#flip"
        self.meta = {**meta, "type": "meta", "format": FORMAT}
        lines = [self.meta]
        lines += sorted(self.entries.values(), key=lambda e: e["key"])
        lines += [{"type": "error", "path": p, "error": m} for p, m in sorted(self.errors.items())]
        write_atomic(self.folder / INDEX, b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in lines))
        write_atomic(self.folder / JOURNAL, b"")
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Delete temporary files and part/shard files that no entry points at (left by a kill or superseded)."""
        used = {e["shard"] for e in self.entries.values()}
        for sub in (PARTS, SHARDS):
            for p in (self.folder / sub).iterdir():
                if p.name.endswith(".tmp") or f"{sub}/{p.name}" not in used:
                    p.unlink(missing_ok=True)
        for p in self.folder.glob("*.tmp"):
            p.unlink(missing_ok=True)


def write_part(folder: Path, tensors: dict[str, torch.Tensor]) -> str:
    name = f"{PARTS}/{uuid.uuid4().hex}.safetensors"
    save_tensors_atomic(Path(folder) / name, tensors)
    return name


def _entry_bytes(e: dict) -> int:
    n = 1
    for s in e["latent_shape"]:
        n *= s
    item = {"fp32": 4, "fp16": 2, "bf16": 2}[e["recipe"]["dtype"]]
    return n * item * (2 if "tensor_flip" in e else 1)


class ShardFile:
    """A safetensors file memory-mapped copy-on-write: tensors are views into the page cache, never copies,
    and writing to one never reaches the file."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
            self.base = 8 + n
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        count = (end - start) // dtype.itemsize
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.base + start).view(info["shape"])
