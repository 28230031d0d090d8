"""vae_core's memory estimate (vae_core.tiling.estimate: what auto tiling, ComfyUI's memory manager through our
VAE, and the tile widget all use) against the measured peak, per family and direction, at two sizes.

Each row runs in a fresh subprocess: a released config with seeded weights, one cold call, and the rise of the
process's peak resident memory over that call (on CUDA: max_memory_allocated). Untiled rows compare with the
untiled estimate; tiled rows (disk store, so the stored activations are not process memory) with the per-tile
estimate. measured / estimate is printed; the target is within 0.75-1.25.

    .venv/bin/python bench/bench_estimate.py                 # every family, CPU fp32
    .venv/bin/python bench/bench_estimate.py --families kl tiny --modes untiled
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# family -> (variant, untiled sizes, tiled sizes, tile)
ROWS = {
    "kl": ("sd1", (256, 512), (512, 768), 256),
    "asym": ("x-1-5", (256, 512), (512, 768), 256),
    "dc": ("dc-ae-f32c32-sana-1.0", (256, 512), (768, 1024), 256),
    "tiny": ("taesd", (512, 1024), (1024, 1536), 512),
}


def worker(a) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from measure import PeakRSS

    from vae_core import tiling
    from vae_core.registry import get
    from vae_core.vae import VAE

    rec = get(a.family)
    cfg = dict(rec.variants[a.variant])
    torch.manual_seed(0)
    vae = VAE(rec.module.build(cfg), a.family, a.variant, {**rec.module.DEFAULT_CONFIG, **cfg}, device=a.device)
    f = vae.downscale
    g = torch.Generator().manual_seed(1)
    if a.op == "encode":
        inp = torch.rand(1, 3, a.size, a.size, generator=g) * 2 - 1
    else:
        inp = torch.randn(1, vae.latent_channels, a.size // f, a.size // f, generator=g)
    inp = inp.to(a.device)
    t = tiling.Tiling(a.tile, 0, "disk") if a.mode == "tiled" else None
    est = tiling.estimate(vae, a.op, (a.size, a.size), t)["device_bytes"]
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as m:
        out = getattr(vae, a.op)(inp, tile=t if t is not None else False)
    peak = torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else m.peak - m.base
    del out
    print(json.dumps({"estimate": est, "measured": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--ops", nargs="+", default=["decode", "encode"])
    p.add_argument("--modes", nargs="+", default=["untiled", "tiled"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--family"), p.add_argument("--variant"), p.add_argument("--op"), p.add_argument("--mode")
    p.add_argument("--size", type=int), p.add_argument("--tile", type=int)
    a = p.parse_args()
    if a.family and a.op:
        return worker(a)
    mib = 2 ** 20
    print(f"{'family':6} {'op':6} {'mode':7} {'size':>5} | {'estimate MiB':>12} {'measured MiB':>12} {'meas/est':>8}")
    for fam in a.families:
        variant, untiled, tiled, tile = ROWS[fam]
        for op in a.ops:
            for mode in a.modes:
                for size in untiled if mode == "untiled" else tiled:
                    cmd = [sys.executable, __file__, "--family", fam, "--variant", variant, "--op", op, "--mode", mode,
                           "--size", str(size), "--tile", str(tile), "--device", a.device]
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    if r.returncode:
                        print(f"{fam} {op} {mode} {size} failed:\n{r.stderr[-2000:]}")
                        continue
                    res = json.loads(r.stdout.strip().splitlines()[-1])
                    e, m = res["estimate"], res["measured"]
                    print(f"{fam:6} {op:6} {mode:7} {size:5d} | {e / mib:12.0f} {m / mib:12.0f} {m / max(e, 1):8.2f}",
                          flush=True)


if __name__ == "__main__":
    main()
