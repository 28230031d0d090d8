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
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import compare_rows, time_and_peak  # noqa: E402

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
    print(json.dumps(time_and_peak(fn, inp, args.reps, device)))


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
    compare_rows(__file__, tmp / "sd1", args)

if __name__ == "__main__":
    main()
