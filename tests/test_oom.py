"""Out of memory never costs the work: decodes under a real address-space limit (RLIMIT_AS), in real processes.

The limit sits 1.45 GiB above what the process has mapped: the untiled 1024x1024 decode of the SD1-config VAE
needs ~1.65 GiB more (its large convs run in bands: the feature maps themselves are most of it) and fails; 256 px
tiles with the disk store fit. Checked through vae_core
(tests/oom_child.py), through our Decode Tiled node and through core's VAE Decode with our VAE in a real ComfyUI
whose server process gets the limit with prlimit. Every result must equal the untiled decode (made here, without a
limit) within 1e-3.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_host import ComfyHost, execution_error
from vae_core import load_vae, tiling

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
SD1 = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
       "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "latent_channels": 4,
       "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
HEADROOM_GIB = 1.45
TOL = 1e-3


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """SD1-config seeded weights, a 1024x1024 latent and the untiled decode made without a limit."""
    d = tmp_path_factory.mktemp("oom")
    torch.manual_seed(0)
    m = diffusers.AutoencoderKL(**SD1)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, d / "sd1_oom.safetensors")
    z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(5))
    save_file({"latent_tensor": z, "latent_format_version_0": torch.tensor([])}, d / "z_oom.latent")
    ref = load_vae(d / "sd1_oom.safetensors").decode(z, tile=False)
    return d, ref


def close(a, b, tol=TOL) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = float((a.float() - b.float()).abs().max())
    assert diff <= tol, f"max abs diff {diff} > {tol}"
    return diff


def test_vae_core_under_a_memory_limit(case):
    d, ref = case
    out = d / "child"
    out.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "oom_child.py"), str(d / "sd1_oom.safetensors"),
                        str(d / "z_oom.latent"), str(out), str(HEADROOM_GIB)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "message"} for k, v in rep.items()}, indent=1))

    # even a 128 px tile cannot fit in 8 MiB: a clear error with the estimate's figures and what to try
    tight = rep["tight"]
    assert not tight["ok"] and tight["error"] == "VAEError", tight
    for needle in ("ran out of host memory", "128 px tiles", "GiB", "smaller batch", "LATENT can still be saved"):
        assert needle in tight["message"], (needle, tight["message"])

    # Cancel is honoured between the retries
    assert rep["cancel"]["error"] == "VAEInterrupted", rep["cancel"]

    # auto mode sees the limit (memory.available) and tiles from the start, or falls back: equal to untiled
    assert rep["auto"]["ok"], rep["auto"]
    print(f"auto: max abs diff vs untiled {close(load_file(out / 'auto.safetensors')['image'], ref):.2e}")
    assert rep["auto"]["warnings"] == [], rep["auto"]  # planned within the limit: nothing had to be retried

    # tile=False: the untiled attempt really runs out, then the exact tiled retry returns the same image
    never = rep["never"]
    assert never["ok"], never
    assert any("ran out of memory with untiled" in w and "disk store" in w for w in never["warnings"]), never
    print(f"never -> retried tiled: max abs diff vs untiled {close(load_file(out / 'never.safetensors')['image'], ref):.2e}")


def _set_limit(pid: int, headroom_gib: float) -> int:
    soft = psutil.Process(pid).memory_info().vms + int(headroom_gib * (1 << 30))
    resource.prlimit(pid, resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))
    return soft


def test_nodes_under_a_memory_limit(case, tmp_path_factory):
    d, ref = case
    host = ComfyHost(tmp_path_factory.mktemp("comfy_oom"))
    (host.base / "models" / "vae" / "sd1_oom.safetensors").write_bytes((d / "sd1_oom.safetensors").read_bytes())
    (host.base / "input" / "z_oom.latent").write_bytes((d / "z_oom.latent").read_bytes())
    host.start()
    try:
        def prompt(decoder: str, **inputs) -> tuple[dict, str]:
            vae = ["1", 0]
            p = {"1": {"class_type": "VAESuiteLoader", "inputs": {"vae_name": "sd1_oom.safetensors"}},
                 "2": {"class_type": "LoadLatent", "inputs": {"latent": "z_oom.latent"}},
                 "3": {"class_type": decoder, "inputs": {"samples": ["2", 0], "vae": vae, **inputs}},
                 "4": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
                 "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["4", 0]}},
                 "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"oom/{decoder}"}}}
            return p, "6"

        def image(entry, node) -> torch.Tensor:
            f = entry["outputs"][node]["latents"][0]
            return load_file(host.base / "output" / f["subfolder"] / f["filename"])["latent_tensor"]

        want = ref.clamp(-1, 1)
        # warm up without a limit (imports, the weights, the worker thread), then limit the server process
        p, _ = prompt("VAESuiteDecodeTiled", tiling="never", tile_size=512, overlap=0)
        p["2"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        assert execution_error(host.run(p, timeout=600)) is None
        limit = _set_limit(host.proc.pid, HEADROOM_GIB)

        # our node, auto mode: the memory probe sees the limit
        p, n = prompt("VAESuiteDecodeTiled", tiling="auto", tile_size=512, overlap=64)
        entry = host.run(p, timeout=1800)
        assert execution_error(entry) is None, execution_error(entry)
        print(f"our Decode Tiled (auto): max abs diff vs untiled {close(image(entry, n), want):.2e}")

        # core's VAE Decode with our VAE: untiled as core asks, runs out, retried in exact tiles
        p, n = prompt("VAEDecode")
        entry = host.run(p, timeout=1800)
        assert execution_error(entry) is None, execution_error(entry)
        print(f"core VAE Decode (ours inside): max abs diff vs untiled {close(image(entry, n), want):.2e}")
        assert "ran out of memory with untiled" in host.log(), host.log()[-3000:]
        status = Path(f"/proc/{host.proc.pid}/status").read_text()
        peak = int(next(x for x in status.splitlines() if x.startswith("VmPeak")).split()[1]) * 1024
        print(f"host: limit {limit / 2**30:.2f} GiB, VmPeak {peak / 2**30:.2f} GiB")
        assert host.get("/system_stats").ok  # the server is still up
    finally:
        host.stop()


def test_batches_are_decoded_in_slices_when_the_whole_batch_does_not_fit(monkeypatch):
    """Batch slicing follows the estimate: room for two items of four -> slices of two, same result."""
    torch.manual_seed(0)
    small = {**SD1, "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
             "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1}
    m = diffusers.AutoencoderKL(**small)
    vae = load_vae({k: v.contiguous() for k, v in m.state_dict().items()})
    z = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    want = vae.decode(z, tile=False)
    one = tiling.estimate_memory(vae, "decode", (32, 32), None)
    monkeypatch.setattr(tiling, "_free_bytes", lambda device: int(2.5 * one / tiling.AUTO_FRACTION))
    assert tiling._slice_items(vae, "decode", (32, 32), None, torch.float32, 4) == 2
    seen = []
    got = vae.decode(z, tile=False, progress=lambda done, total: seen.append((done, total)))
    assert torch.equal(got, want)
    assert seen == [(1, 2), (2, 2)]
