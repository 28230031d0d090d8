"""The main job, scripts/start.sh, in a throw-away base folder.

- Offline, as this machine is (no network; HF_HUB_CACHE an empty folder): one line says so, the examples' files are
  stand-ins, and the real ComfyUI it starts keeps its database in the base folder, so no database error line.
- Online, against a local huggingface_hub cache in the hub's own layout (HF_HUB_CACHE, HF_HUB_OFFLINE=1): the TAESD
  family and the SD VAE are linked into the base's model folders under the examples' names, replacing the
  stand-ins of an earlier offline run, and they load.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import save_file

from comfy_host import PACK_NAME, free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_demo_models  # noqa: E402

STANDIN_ITEMS = {f"vae/{make_demo_models.SD_VAE}", "vae/taesd", "vae/asymmetric-autoencoder-kl-x-1-5",
                 make_demo_models.DEMO_UNET, f"vae/{make_demo_models.FLUX2_VAE}",
                 f"vae/{make_demo_models.QWEN_VAE}", f"vae/{make_demo_models.WAN_VAE}"}


def run_start(base: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "start.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "VAE_SUITE_BASE": str(base), "VAE_SUITE_NO_SERVER": "1",
                                                **env})


def put_in_hub_cache(cache: Path, repo: str, filename: str, data: bytes, commit: str = "1" * 40) -> None:
    """A file as huggingface_hub keeps it: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    d = cache / f"models--{repo.replace('/', '--')}"
    blob = d / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snap = d / "snapshots" / commit / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(os.path.relpath(blob, snap.parent))
    (d / "refs").mkdir(exist_ok=True)
    (d / "refs" / "main").write_text(commit)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_offline_start_says_so_once_uses_standins_and_keeps_the_database_in_the_base(tmp_path):
    base = tmp_path / "base"
    env = {"HF_HUB_CACHE": str(tmp_path / "empty_hub_cache")}
    r = run_start(base, env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (r.stdout + r.stderr).splitlines()
    offline = [ln for ln in lines if ln.startswith("VAE Suite: offline")]
    assert len(offline) == 1 and "stand-ins" in offline[0] and str(base / "models") in offline[0], offline
    assert not any("Retrying" in ln or "Traceback" in ln for ln in lines), r.stderr[-3000:]
    recorded = set((base / "models" / ".vae_suite_standins").read_text().split())
    assert recorded == STANDIN_ITEMS
    for rel in STANDIN_ITEMS:
        assert (base / "models" / rel).exists(), rel
    assert (base / "input" / "example.png").is_file() and (base / "input" / "example_inpaint.png").is_file()

    # the server itself, as the main job starts it (the base is ready, so this is quick)
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "start.sh"), str(port)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VAE_SUITE_BASE": str(base), **env})
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/system_stats", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail(f"the main job did not answer:\n{log.read_text()[-3000:]}")
        templates = requests.get(f"http://127.0.0.1:{port}/workflow_templates", timeout=10).json()[PACK_NAME]
        assert sorted(templates) == sorted(make_demo_models_examples())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    text = log.read_text()
    assert "Failed to initialize database" not in text and "unable to open database file" not in text, text[-3000:]
    assert (base / "user" / "comfyui.db").is_file()


def make_demo_models_examples() -> list[str]:
    return [p.stem for p in (ROOT / "example_workflows").glob("*.json")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_online_start_links_the_real_files_from_the_hub_cache(tmp_path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    from vae_core import load_vae

    cache = tmp_path / "hub"
    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, layers_per_block=1)
    kl_file = tmp_path / "kl.safetensors"
    save_file({k: v.contiguous() for k, v in kl.state_dict().items()}, str(kl_file))
    put_in_hub_cache(cache, "stabilityai/sd-vae-ft-mse-original", make_demo_models.SD_VAE, kl_file.read_bytes())
    tiny = AutoencoderTiny()
    tiny.save_pretrained(tmp_path / "tiny")
    for name in make_demo_models.TAESD_FAMILY:
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            put_in_hub_cache(cache, f"madebyollin/{name}", f, (tmp_path / "tiny" / f).read_bytes())

    base = tmp_path / "base"
    assert run_start(base, {"HF_HUB_CACHE": str(tmp_path / "empty")}).returncode == 0  # offline first: stand-ins
    r = run_start(base, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "VAE Suite: offline" not in r.stdout + r.stderr, r.stderr[-3000:]
    models = base / "models"
    sd = models / "vae" / make_demo_models.SD_VAE
    assert sd.is_symlink() and sd.resolve().parent.name == "blobs"
    for name in make_demo_models.TAESD_FAMILY:
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            p = models / "vae" / name / f
            assert p.is_symlink() and str(cache) in str(p.resolve()), p
    # the real files replaced the stand-ins of the first run; the others stay stand-ins
    recorded = set((models / ".vae_suite_standins").read_text().split())
    assert recorded == {"vae/asymmetric-autoencoder-kl-x-1-5", make_demo_models.DEMO_UNET,
                        f"vae/{make_demo_models.FLUX2_VAE}",
                        f"vae/{make_demo_models.QWEN_VAE}", f"vae/{make_demo_models.WAN_VAE}"}
    v = load_vae(str(models / "vae" / "taesd"))
    assert (v.family, v.variant) == ("tiny", "taesd")
    v = load_vae(str(sd))
    assert v.family == "kl"
    x = torch.zeros(1, 3, 32, 32)
    ref = kl.decode(kl.encode(x).latent_dist.mean).sample
    assert (v.decode(v.encode(x)) - ref).abs().max() < 1e-4
