"""Kill and resume: the cache command killed with a real SIGKILL mid-run (while batches are being written and
merged into shards) keeps everything it committed, and the re-run finishes with no duplicate, no missing entry,
no leftover file and the same latents as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import json
import time

import pytest

from cache_dataset import CORRUPT, make_dataset
from conftest import PHOTO, ROOT, require_file
from vae_core import cache
from vae_core.cache.store import State

N_IMAGES = 120
ARGS = ["--resolution", "64", "--bucket-step", "16", "--dtype", "fp32", "--batch-size", "2",
        "--shard-mb", "0.03", "--quiet"]  # ~4 latents a shard: shards are merged while the run goes on


@pytest.mark.slow
def test_sigkill_then_resume(taesd_dir, tmp_path):
    images = make_dataset(require_file(PHOTO), tmp_path / "images", n=N_IMAGES, sizes=(40, 160))
    vae = str(taesd_dir / "taef2_encoder.pth")
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "vae_core.cache", str(images), "--vae", vae, "--out", str(out), *ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = 0, time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                seen = len(State(out).entries)
            except (FileNotFoundError, ValueError):  # the folder is being created
                seen = 0
            if seen >= 20:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = len(State(out).entries)
    assert seen <= kept < N_IMAGES  # what was committed survives the kill
    assert any((out / "shards").iterdir())  # the kill came after shards had been merged

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["complete"] and (s["fresh"], s["encoded"]) == (kept, N_IMAGES - kept)
    ds = cache.open(out)
    paths = [e["path"] for e in ds.entries]
    assert len(paths) == len(set(paths)) == N_IMAGES == len({e["key"] for e in ds.entries})
    assert len(ds.errors) == len(CORRUPT)
    used = {e["shard"] for e in ds.entries}
    assert {f"shards/{p.name}" for p in (out / "shards").iterdir()} == used  # no orphan shard, nothing missing
    assert not list((out / "parts").iterdir()) and not list(out.rglob("*.tmp"))

    clean = tmp_path / "clean"
    subprocess.run([*cmd[:7], str(clean), *ARGS], cwd=ROOT, check=True, capture_output=True, timeout=600)
    ref = cache.open(clean)
    assert [e["key"] for e in ref.entries] == [e["key"] for e in ds.entries]
    for i in range(len(ds)):
        assert ref.entries[i]["recipe"] == ds.entries[i]["recipe"]
        assert (ref[i]["latent"] - ds[i]["latent"]).abs().max().item() < 1e-4
