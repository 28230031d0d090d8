"""Latent caches (vae_core.cache) with the real TAEF2 encoder on a generated dataset of the shared photo: every
latent against vae.encode of an independently preprocessed image, buckets, index, errors, re-runs, stale entries,
the reader and its sampler, and the Ray backend on a local instance against the local backend."""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from cache_dataset import CORRUPT, EXIF_ROTATED, make_dataset
from conftest import PHOTO, ROOT, require_file
from vae_core import load_vae
from vae_core import cache
from vae_core.cache.buckets import make_buckets
from vae_core.cache.store import read_jsonl

SETTINGS = dict(resolution=64, bucket_step=16, max_aspect=2.0, dtype="fp32", batch_size=8)
N_IMAGES = 200


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(require_file(PHOTO), tmp_path_factory.mktemp("images"), n=N_IMAGES, sizes=(40, 160))


@pytest.fixture(scope="module")
def taef2(taesd_dir):
    return taesd_dir / "taef2_encoder.pth"


@pytest.fixture(scope="module")
def built(dataset, taef2, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    summary = cache.build([dataset], str(taef2), out, cache.Settings(**SETTINGS), device="cpu")
    return out, summary


def _reference_pixels(path, resize, crop) -> torch.Tensor:
    """The preprocessing written out plainly: orient, RGB, Lanczos resize, crop -> [1,3,h,w] in [-1, 1]."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    img = img.resize(tuple(resize), Image.Resampling.LANCZOS).crop(tuple(crop))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).unsqueeze(0)


def test_summary_and_errors(built, dataset):
    out, s = built
    assert s["complete"] and s["entries"] == N_IMAGES and s["errors"] == len(CORRUPT)
    assert s["encoded"] == N_IMAGES and s["fresh"] == 0
    ds = cache.open(out)
    assert sorted(ds.errors) == sorted(str((dataset / c).resolve()) for c in CORRUPT)
    assert all(msg.startswith("cannot") for msg in ds.errors.values())
    valid = {str(p.resolve()) for p in dataset.rglob("*") if p.suffix in (".jpg", ".png", ".webp")} - set(ds.errors)
    assert {e["path"] for e in ds.entries} == valid  # no image missing, none twice, notes.txt not taken
    assert len({e["key"] for e in ds.entries}) == N_IMAGES
    assert not list((out / "parts").iterdir()) and (out / "journal.jsonl").read_bytes() == b""


def test_buckets_and_index(built, taef2):
    out, _ = built
    ds = cache.open(out)
    buckets = make_buckets(64, 16, 2.0)
    assert buckets == [(48, 80), (64, 64), (80, 48)]
    for w, h in make_buckets(1024, 64, 2.0):  # SDXL-style: on the grid, within the area, the ratio bounded
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 1024**2 and max(w, h) / min(w, h) <= 2.0
        assert w * (h + 64) > 1024**2  # the tallest height that fits
    assert (1024, 1024) in make_buckets(1024, 64, 2.0) and (832, 1216) in make_buckets(1024, 64, 2.0)
    seen = set()
    for e in ds.entries:
        r, (w, h) = e["recipe"], e["size"]
        bw, bh = r["bucket"]
        seen.add((bw, bh))
        nearest = min(abs(math.log(b[0] / b[1]) - math.log(w / h)) for b in buckets)
        assert abs(math.log(bw / bh) - math.log(w / h)) == pytest.approx(nearest)
        rw, rh = r["resize"]
        assert min(rw - bw, rh - bh) == 0 and rw >= bw and rh >= bh  # covers the bucket, tight on one side
        assert abs(rw / rh - w / h) <= 1.0 / min(rh, rw) * (w / h) + 1e-9  # aspect kept (rounding)
        left, top, right, bottom = r["crop"]
        assert (right - left, bottom - top) == (bw, bh) and (left, top) == ((rw - bw) // 2, (rh - bh) // 2)
        assert e["latent_shape"] == [32, bh // 8, bw // 8]
    assert seen == set(buckets)
    rotated = next(e for e in ds.entries if e["key"] == EXIF_ROTATED)
    assert rotated["size"] == [128, 80] and rotated["recipe"]["bucket"] == [80, 48]  # EXIF orientation honoured
    meta = ds.meta
    vae = load_vae(str(taef2))
    h = hashlib.sha256()
    for name, t in sorted(vae.model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
    assert meta["vae"]["weights_sha256"] == h.hexdigest()
    assert (meta["vae"]["family"], meta["vae"]["variant"], meta["vae"]["scaling_factor"]) == ("tiny", "taef2", 1.0)
    assert meta["settings"]["resolution"] == 64 and meta["format"] == "vae_core.cache/1"
    for e in ds.entries:
        assert e["hash"] == hashlib.sha256(open(e["path"], "rb").read()).hexdigest()
    lines = read_jsonl(out / "index.jsonl")
    assert [r["type"] for r in lines] == ["meta"] + ["entry"] * N_IMAGES + ["error"] * len(CORRUPT)


def test_every_latent_equals_vae_encode(built, taef2):
    """All entries, against vae.encode of the plainly preprocessed images (one call per bucket, to keep it fast)."""
    out, _ = built
    ds = cache.open(out)
    vae = load_vae(str(taef2))
    worst = 0.0
    for bucket, indices in ds.buckets().items():
        x = torch.cat([_reference_pixels(ds[i]["path"], ds[i]["resize"], ds[i]["crop"]) for i in indices])
        z = vae.encode(x)
        got = torch.stack([ds[i]["latent"] for i in indices])
        assert got.shape == z.shape and got.dtype == torch.float32 and z.shape[-2:] == (bucket[1] // 8, bucket[0] // 8)
        worst = max(worst, (got - z).abs().max().item())
    assert worst < 1e-4, worst  # other batches, channels-last memory: float rounding only


def test_rerun_skips_everything(built, dataset, taef2):
    out, _ = built
    before = (out / "index.jsonl").read_bytes()
    s = cache.build([dataset], str(taef2), out, cache.Settings(**SETTINGS), device="cpu")
    assert (s["encoded"], s["fresh"], s["stale"], s["errors"]) == (0, N_IMAGES, 0, len(CORRUPT))
    assert (out / "index.jsonl").read_bytes() == before


def test_reader_and_sampler(built):
    out, _ = built
    ds = cache.open(out)
    assert len(ds) == N_IMAGES
    item = ds[EXIF_ROTATED]
    assert set(item) >= {"latent", "path", "key", "size", "crop", "bucket"} and item["path"].endswith(EXIF_ROTATED)
    assert torch.equal(item["latent"], ds[ds.index_of(EXIF_ROTATED)]["latent"])
    with pytest.raises(KeyError, match="no entry"):
        ds["missing.png"]
    sampler = ds.sampler(batch_size=8, shuffle=True, seed=3)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(N_IMAGES))
    assert all(len({tuple(ds.entries[i]["recipe"]["bucket"]) for i in b}) == 1 for b in batches)
    assert batches == list(ds.sampler(batch_size=8, shuffle=True, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert all(len(b) == 8 for b in ds.sampler(batch_size=8, drop_last=True))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ds.sampler(batch_size=4, seed=0), num_workers=2)
    n = 0
    for batch in loader:
        assert batch["latent"].ndim == 4 and batch["latent"].shape[0] <= 4
        n += batch["latent"].shape[0]
    assert n == N_IMAGES


def _subset(dataset, folder, n):
    folder.mkdir()
    for p in sorted(dataset.glob("set1/*"))[:n]:
        shutil.copy2(p, folder / p.name)
    return folder


def test_stale_entries_are_reencoded(dataset, taef2, taesd_dir, tmp_path):
    images = _subset(dataset, tmp_path / "imgs", 24)
    out = tmp_path / "cache"
    base = dict(SETTINGS, max_aspect=2.0)  # buckets 48x80, 64x64, 80x48
    s = cache.build([images], str(taef2), out, cache.Settings(**base), device="cpu")
    assert s["encoded"] == 24
    # one image changes content: only it is re-encoded
    victim = sorted(images.iterdir())[0]
    Image.open(victim).convert("RGB").transpose(Image.Transpose.ROTATE_180).save(victim)
    s = cache.build([images], str(taef2), out, cache.Settings(**base), device="cpu")
    assert (s["encoded"], s["stale"], s["fresh"]) == (1, 1, 23)
    # a narrower aspect range (no 80x48 / 48x80 buckets) moves only the images that were in those
    before = {e["path"]: e["recipe"]["bucket"] for e in cache.open(out).entries}
    s = cache.build([images], str(taef2), out, cache.Settings(**dict(base, max_aspect=1.5)), device="cpu")
    after = {e["path"]: e["recipe"]["bucket"] for e in cache.open(out).entries}
    moved = sum(before[p] != after[p] for p in before)
    assert 0 < moved < 24 and (s["encoded"], s["stale"]) == (moved, moved)
    # another VAE (TAESANA, f32: a 32 px step gives the same 64x64 bucket) makes every entry stale
    sana = taesd_dir / "taesana_encoder.pth"
    s = cache.build([images], str(sana), out, cache.Settings(**dict(base, max_aspect=1.5, bucket_step=32)),
                    device="cpu")
    assert (s["encoded"], s["stale"]) == (24, 24)
    # diffusion space is part of the recipe too
    s = cache.build([images], str(sana), out,
                    cache.Settings(**dict(base, max_aspect=1.5, bucket_step=32, diffusion=True)), device="cpu")
    assert (s["encoded"], s["stale"]) == (24, 24)
    ds = cache.open(out)
    vae = load_vae(str(sana))
    assert ds.meta["vae"]["variant"] == "taesana" and ds.meta["vae"]["scaling_factor"] == vae.scaling_factor != 1.0
    x = torch.cat([_reference_pixels(ds[i]["path"], ds[i]["resize"], ds[i]["crop"]) for i in range(len(ds))])
    z = vae.to_diffusion(vae.encode(x))
    assert all(e["recipe"]["space"] == "diffusion" and e["latent_shape"] == [32, 2, 2] for e in ds.entries)
    assert (torch.stack([ds[i]["latent"] for i in range(len(ds))]) - z).abs().max().item() < 1e-4
    assert len(list((out / "shards").iterdir())) == 1  # superseded shards are deleted


def test_flip_bf16_and_random_crop(dataset, taef2, tmp_path):
    images = _subset(dataset, tmp_path / "imgs", 10)
    out = tmp_path / "cache"
    settings = cache.Settings(**dict(SETTINGS, dtype="bf16", flip=True, crop="random", seed=5, batch_size=3))
    cache.build([images], str(taef2), out, settings, device="cpu")
    ds = cache.open(out)
    vae = load_vae(str(taef2))
    offsets = set()
    for i in range(len(ds)):
        e, item = ds.entries[i], ds[i]
        x = _reference_pixels(e["path"], e["recipe"]["resize"], e["recipe"]["crop"])
        z, zf = vae.encode(torch.cat([x, x.flip(-1)]))
        assert item["latent"].dtype == item["latent_flip"].dtype == torch.bfloat16
        for got, want in ((item["latent"], z), (item["latent_flip"], zf)):
            assert (got.float() - want).abs().max().item() <= 2e-2 * want.abs().max().item()  # bf16 rounding
        offsets.add(tuple(e["recipe"]["crop"][:2]))
    assert len(offsets) > 1  # random crops differ between images
    again = tmp_path / "again"
    cache.build([images], str(taef2), again, settings, device="cpu")  # and are the same on every run
    assert [e["recipe"] for e in cache.open(again).entries] == [e["recipe"] for e in ds.entries]


def test_cli_reports_bad_input(tmp_path, dataset):
    r = subprocess.run([sys.executable, "-m", "vae_core.cache", str(dataset), "--vae", str(tmp_path / "nope.pth"),
                        "--out", str(tmp_path / "c")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "vae-cache: error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ray_backend_equals_local(built, dataset, taef2, tmp_path):
    if not os.environ.get("CI"):  # in CI scripts/setup_env.sh installs ray: its absence fails there
        pytest.importorskip("ray", reason="the Ray backend needs pip install .[ray]")
    from vae_core.cache.ray_backend import build_ray

    out, _ = built
    s = build_ray([dataset], str(taef2), tmp_path / "ray", cache.Settings(**SETTINGS), num_cpus=2, device="cpu")
    assert s["complete"] and s["encoded"] == N_IMAGES and s["errors"] == len(CORRUPT)
    assert (tmp_path / "ray" / "index.jsonl").read_bytes() == (out / "index.jsonl").read_bytes()  # same index
    local, ray_ds = cache.open(out), cache.open(tmp_path / "ray")
    for i in range(len(local)):
        assert (local[i]["latent"] - ray_ds[i]["latent"]).abs().max().item() <= 1e-6
    s = build_ray([dataset], str(taef2), tmp_path / "ray", cache.Settings(**SETTINGS), num_cpus=2, device="cpu")
    assert (s["encoded"], s["fresh"]) == (0, N_IMAGES)  # resume works the same way


def test_ray_stays_optional():
    code = ("import sys, vae_core, vae_core.cache, vae_core.cache.__main__; "
            "assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
