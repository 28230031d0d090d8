"""AutoencoderKL speed and peak memory: vae_core against diffusers on the same weights, in the same run.

SD1 config (83.7M params, seeded random weights), fp32 on the CPU by default. Each (implementation, op, size)
is measured in its own fresh subprocess, so the peak memory figure is that op's own: the high-water mark of the
process's resident memory while the op runs, minus the resident memory just before it (weights and input
excluded). On CUDA the peak is torch.cuda.max_memory_allocated over the op. Ratios are ours / diffusers:
below 1.0 means ours is faster / smaller.

    .venv/bin/python bench/bench_kl.py                      # 512 and 1024, encode and decode, CPU fp32
    .venv/bin/python bench/bench_kl.py --sizes 512 --reps 3
    .venv/bin/python bench/bench_kl.py --device cuda --dtype bf16 --sizes 1024 2048
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import PeakRSS  # noqa: E402

SD1 = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def worker(args) -> None:
    """One measurement in this process: prints a JSON line."""
    import torch

    sys.path.insert(0, str(ROOT))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    torch.manual_seed(0)
    size, f = args.size, 8
    if args.impl == "diffusers":
        from diffusers import AutoencoderKL
        model = AutoencoderKL.from_pretrained(args.weights).to(device, dtype).eval()
        enc = lambda x: model.encode(x).latent_dist.mode()  # noqa: E731
        dec = lambda z: model.decode(z).sample  # noqa: E731
    else:
        from vae_core import load_vae
        vae = load_vae(args.weights, device=device, dtype=dtype)
        enc = lambda x: vae.encode(x, tile=False)  # noqa: E731
        dec = lambda z: vae.decode(z, tile=False)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
    z = torch.randn(1, 4, size // f, size // f, generator=g).to(device, dtype)
    fn, inp = (enc, x) if args.op == "encode" else (dec, z)
    times, peak = [], 0
    with torch.inference_mode():
        for i in range(args.reps + 1):  # first call warms up (allocator, oneDNN primitives)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with PeakRSS() as m:
                t0 = time.perf_counter()
                out = fn(inp)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            del out
            if device.type == "cuda":
                peak = max(peak, torch.cuda.max_memory_allocated() - base)
            else:
                peak = max(peak, m.peak - m.base)
            if i > 0 or args.reps == 0:
                times.append(dt)
    print(json.dumps({"time": sorted(times)[len(times) // 2], "peak": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--ops", nargs="+", default=["encode", "decode"])
    p.add_argument("--reps", type=int, default=1, help="timed calls after one warm-up call (median is reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--impl"), p.add_argument("--op"), p.add_argument("--size", type=int), p.add_argument("--weights")
    args = p.parse_args()
    if args.impl:
        return worker(args)

    import torch
    from diffusers import AutoencoderKL
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    AutoencoderKL(**SD1).save_pretrained(tmp / "sd1")
    print(f"AutoencoderKL SD1 config, seeded random weights, {args.device} {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.reps} after a warm-up; own subprocess per row")
    print(f"{'op':7} {'size':>5} | {'ours s':>8} {'diffusers s':>11} {'ratio':>6} | {'ours MiB':>9} {'diff. MiB':>9} {'ratio':>6}")
    for size in args.sizes:
        for op in args.ops:
            res = {}
            for impl in ("ours", "diffusers"):
                cmd = [sys.executable, __file__, "--impl", impl, "--op", op, "--size", str(size), "--weights",
                       str(tmp / "sd1"), "--reps", str(args.reps), "--device", args.device, "--dtype", args.dtype]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{impl} {op} {size} failed:\n{out.stderr[-3000:]}")
                res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            o, d = res["ours"], res["diffusers"]
            mib = 2 ** 20
            print(f"{op:7} {size:5d} | {o['time']:8.2f} {d['time']:11.2f} {o['time'] / d['time']:6.2f} | "
                  f"{o['peak'] / mib:9.0f} {d['peak'] / mib:9.0f} {o['peak'] / max(d['peak'], 1):6.2f}", flush=True)


if __name__ == "__main__":
    main()
