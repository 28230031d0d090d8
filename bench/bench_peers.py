"""AutoencoderKL against both peers in one process: vae_core, ComfyUI core and diffusers on the same seeded SD1
weights, interleaved, the order rotating every round (this machine drifts, so only same-run ratios mean much).

For each op and size it prints the median time, the achieved GFLOP/s (FLOPs counted once on the meta device,
2 per multiply-add), the peak rise of resident memory over the call (CPU) or of allocated device memory (CUDA),
and ours / peer for both. ``--tiled`` adds our exact tiled decode with the RAM store beside our untiled one.

    .venv/bin/python bench/bench_peers.py                                   # 512 and 1024, CPU fp32, 3 rounds
    .venv/bin/python bench/bench_peers.py --sizes 1024 --ops decode --rounds 5 --tiled 256
    .venv/bin/python bench/bench_peers.py --device cuda --dtype bf16 --sizes 1024 2048 4096 --tiled 512

Peers: ComfyUI core's ``comfy.sd.VAE(sd).first_stage_model`` (the network its VAE Decode runs, without its
memory management) from ``.host/ComfyUI``, and diffusers ``AutoencoderKL``. Ours is ``vae_core.VAE`` with
``tile=False`` (its latent scaling included).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

from measure import fix_mmap_threshold, one_call  # noqa: E402

fix_mmap_threshold(sys.argv, unless="--malloc-default")

import torch  # noqa: E402

SD1 = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flops(model, op: str, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    import copy
    meta = copy.deepcopy(model).to("meta")
    x = torch.zeros(1, 3, size, size, device="meta") if op == "encode" else torch.zeros(1, 4, size // 8, size // 8, device="meta")
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        meta.encode(x) if op == "encode" else meta.decode(x)
    return fc.get_total_flops()


def comfy_model(sd: dict, device, dtype):
    sys.argv = sys.argv[:1]  # ComfyUI parses the command line on import
    sys.path.insert(0, str(ROOT / ".host" / "ComfyUI"))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = device.type == "cpu"
    import comfy.sd

    return comfy.sd.VAE(sd=sd).first_stage_model.to(device, dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--ops", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiled", type=int, default=0, help="also our exact tiled decode, RAM store, this tile (px)")
    ap.add_argument("--malloc-default", action="store_true", help="glibc's adaptive mmap threshold (measure.py)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    a = ap.parse_args()
    device, dtype = torch.device(a.device), DTYPES[a.dtype]

    from diffusers import AutoencoderKL

    from vae_core import load_vae
    from vae_core.tiling import Tiling

    torch.manual_seed(0)
    ref = AutoencoderKL(**SD1).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = load_vae(tmp, device=device, dtype=dtype)
    core = comfy_model(ref.state_dict(), device, dtype)
    ref = ref.to(device, dtype)
    print(f"AutoencoderKL SD1 config, seeded weights, {device} {a.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {a.rounds} rounds interleaved (order rotating), medians; "
          f"peak = rise of {'allocated device memory' if device.type == 'cuda' else 'resident memory'} over the call"
          + ("; glibc's adaptive mmap threshold" if a.malloc_default else ""))
    mib = 2 ** 20
    for size in a.sizes:
        g = torch.Generator().manual_seed(1)
        x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
        z = torch.randn(1, 4, size // 8, size // 8, generator=g).to(device, dtype)
        for op in a.ops:
            with torch.inference_mode():
                if op == "decode":
                    impls = {"ours": lambda: ours.decode(z, tile=False),
                             "core": lambda: core.decode(z),
                             "diffusers": lambda: ref.decode(z).sample}
                    if a.tiled:
                        impls["ours tiled"] = lambda: ours.decode(z, tile=Tiling(a.tiled, store="ram"))
                else:
                    impls = {"ours": lambda: ours.encode(x, tile=False, sample=False),
                             "core": lambda: core.encode(x),
                             "diffusers": lambda: ref.encode(x).latent_dist.mode()}
                names = list(impls)
                for name in names:  # warm-up (oneDNN primitives, allocator)
                    impls[name]()
                times: dict[str, list[float]] = {n: [] for n in names}
                peaks: dict[str, int] = {n: 0 for n in names}
                for r in range(a.rounds):
                    for name in names[r % len(names):] + names[: r % len(names)]:
                        dt, pk = one_call(impls[name], device)
                        times[name].append(dt)
                        peaks[name] = max(peaks[name], pk)
            work = flops(ref, op, size)
            med = {n: statistics.median(t) for n, t in times.items()}
            print(f"\n{op} {size}² ({work / 1e12:.2f} TFLOP)")
            print(f"  {'impl':11} {'time s':>8} {'GFLOP/s':>8} {'peak MiB':>9} | {'t/core':>6} {'m/core':>6} "
                  f"{'t/diff':>6} {'m/diff':>6}")
            for n in names:
                print(f"  {n:11} {med[n]:8.2f} {work / med[n] / 1e9:8.1f} {peaks[n] / mib:9.0f} | "
                      f"{med[n] / med['core']:6.2f} {peaks[n] / max(peaks['core'], 1):6.2f} "
                      f"{med[n] / med['diffusers']:6.2f} {peaks[n] / max(peaks['diffusers'], 1):6.2f}", flush=True)
            if a.tiled and op == "decode":
                print(f"  ours tiled / ours untiled: time {med['ours tiled'] / med['ours']:.2f}, "
                      f"peak {peaks['ours tiled'] / max(peaks['ours'], 1):.2f}")


if __name__ == "__main__":
    main()
