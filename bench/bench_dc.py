"""AutoencoderDC speed and peak memory: vae_core against diffusers on the same weights, in the same run.

dc-ae-f32c32-sana-1.0 config (312M params, deterministic seeded weights), fp32 on the CPU by default. Each
(implementation, op, size) runs in its own fresh subprocess, so the peak memory figure is that op's own: the
high-water mark of the process's resident memory while the op runs, minus the resident memory just before it
(weights and input excluded). On CUDA the peak is torch.cuda.max_memory_allocated over the op. Ratios are
ours / diffusers: below 1.0 means ours is faster / smaller. Rows run ours and diffusers back to back; on a
shared machine compare ratios, not absolute times.

    .venv/bin/python bench/bench_dc.py                           # 512 and 1024, encode and decode, CPU fp32
    .venv/bin/python bench/bench_dc.py --sizes 512 --reps 3
    .venv/bin/python bench/bench_dc.py --variant dc-ae-f32c32-mix-1.0 --sizes 512
    .venv/bin/python bench/bench_dc.py --device cuda --dtype bf16 --sizes 1024 2048
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



def make_weights(variant: str, folder: Path) -> None:
    """diffusers' AutoencoderDC at the released config with the tests' seeded weights (fast: no random init)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from test_dc import deterministic_model

    deterministic_model(variant).save_pretrained(folder, safe_serialization=True)


def worker(args) -> None:
    """One measurement in this process: prints a JSON line."""
    import torch

    sys.path.insert(0, str(ROOT))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    if args.impl == "diffusers":
        from diffusers import AutoencoderDC
        model = AutoencoderDC.from_pretrained(args.weights).to(device, dtype).eval()
        enc = lambda x: model.encode(x).latent  # noqa: E731
        dec = lambda z: model.decode(z).sample  # noqa: E731
        f, c = model.spatial_compression_ratio, model.config.latent_channels
    else:
        from vae_core import load_vae
        vae = load_vae(args.weights, device=device, dtype=dtype)
        enc = lambda x: vae.encode(x, tile=False)  # noqa: E731
        dec = lambda z: vae.decode(z, tile=False)  # noqa: E731
        f, c = vae.downscale, vae.latent_channels
    g = torch.Generator().manual_seed(1)
    size = args.size
    x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
    z = torch.randn(1, c, size // f, size // f, generator=g).to(device, dtype)
    fn, inp = (enc, x) if args.op == "encode" else (dec, z)
    print(json.dumps(time_and_peak(fn, inp, args.reps, device)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sizes in pixels")
    p.add_argument("--ops", nargs="+", default=["encode", "decode"])
    p.add_argument("--reps", type=int, default=1, help="timed calls after one warm-up call (median is reported)")
    p.add_argument("--variant", default="dc-ae-f32c32-sana-1.0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--impl"), p.add_argument("--op"), p.add_argument("--size", type=int), p.add_argument("--weights")
    args = p.parse_args()
    if args.impl:
        return worker(args)

    import torch
    tmp = Path(tempfile.mkdtemp())
    make_weights(args.variant, tmp / "dc")
    print(f"AutoencoderDC {args.variant} config, seeded weights, {args.device} {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; " + (f"median of {args.reps} after a warm-up" if args.reps else
          "one cold call each (--reps 0)") + "; own subprocess per row")
    compare_rows(__file__, tmp / "dc", args)

if __name__ == "__main__":
    main()
