"""Wan 2.1 / Qwen-Image VAE speed and peak memory: vae_core against diffusers' AutoencoderKLWan and ComfyUI
core's WanVAE (comfy/ldm/wan/vae.py) on the same seeded weights (released config, base_dim 96), in the same run.

Cases: an image (one frame) encoded and decoded; a short video decoded; a long video decoded untiled and tiled,
to show that the tiled peak is set by the tile and the chunk, not by frames x pixels. Each (implementation, mode,
case) runs in its own fresh subprocess, so each peak is that run's own: the high-water mark of the process's
resident memory while it runs minus the resident memory just before (weights and input excluded); on CUDA
torch.cuda.max_memory_allocated. Times are one cold call unless --reps is given.

Modes: ours untiled (every frame at once), ours tiled (``--tile`` px tiles, one latent frame per causal chunk;
exact), diffusers (its own causal chunks of one latent frame over whole frames; and with enable_tiling, its
blended tiles, which are not exact), core (WanVAE.encode/decode: causal chunks over whole frames).

    .venv/bin/python bench/bench_wan.py                                  # 1024 image, 480x832x17 video (slow on CPU)
    .venv/bin/python bench/bench_wan.py --image 256 --video 240x416x5 --long 96x96x41
    .venv/bin/python bench/bench_wan.py --device cuda --image 1024 --video 480x832x81
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import time_and_peak  # noqa: E402


def make_weights(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from wan_layout import to_original

    torch.manual_seed(0)
    ref = AutoencoderKLWan().eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("gamma"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    ref.save_pretrained(folder / "diffusers")
    save_file({k: v.contiguous() for k, v in to_original(ref.state_dict()).items()}, folder / "wan_2.1_vae.safetensors")


def worker(a) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    w = Path(a.weights)
    if a.impl == "diffusers":
        from diffusers import AutoencoderKLWan
        m = AutoencoderKLWan.from_pretrained(w / "diffusers").to(device, dtype).eval()
        if a.mode == "tiled":
            m.enable_tiling()
        enc = lambda x: m.encode(x).latent_dist.mode()  # noqa: E731
        dec = lambda z: m.decode(z).sample  # noqa: E731
    elif a.impl == "core":
        sys.path.insert(0, str(ROOT / ".host" / "ComfyUI"))
        import comfy.options

        if device.type == "cpu":  # core's model management looks for CUDA unless started with --cpu
            comfy.options.enable_args_parsing()
            sys.argv = [sys.argv[0], "--cpu"]
        from safetensors.torch import load_file

        from comfy.ldm.wan.vae import WanVAE
        m = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True], dropout=0.0)
        m.load_state_dict(load_file(w / "wan_2.1_vae.safetensors"))
        m = m.to(device, dtype).eval()
        enc, dec = m.encode, m.decode
    else:
        from vae_core import load_vae
        vae = load_vae(w / "wan_2.1_vae.safetensors", device=device, dtype=dtype)
        tile = False if a.mode == "untiled" else {"tile_size": a.tile, "time_chunk": 1}
        enc = lambda x: vae.encode(x, tile=tile)  # noqa: E731
        dec = lambda z: vae.decode(z, tile=tile)  # noqa: E731
    h, wd, t = a.shape
    g = torch.Generator().manual_seed(1)
    if a.op == "encode":
        fn, inp = enc, (torch.rand(1, 3, t, h, wd, generator=g) * 2 - 1).to(device, dtype)
    else:
        fn, inp = dec, torch.randn(1, 16, 1 + (t - 1) // 4, h // 8, wd // 8, generator=g).to(device, dtype)
    print(json.dumps(time_and_peak(fn, inp, a.reps, device)))


def shape(text: str) -> tuple[int, int, int]:
    parts = [int(v) for v in text.lower().split("x")]
    return (parts[0], parts[0], 1) if len(parts) == 1 else (parts[0], parts[1], parts[2])


RUNS = [("ours", "untiled"), ("ours", "tiled"), ("diffusers", "untiled"), ("diffusers", "tiled"), ("core", "untiled")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=int, default=1024, help="image edge (one frame), encode and decode (0: skip)")
    p.add_argument("--video", default="480x832x17", help="HxWxT of the short video decode ('': skip)")
    p.add_argument("--long", default="", help="HxWxT of a long video decoded by ours untiled and tiled only")
    p.add_argument("--tile", type=int, default=256, help="tile edge in image pixels for the tiled runs")
    p.add_argument("--reps", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--only", nargs="*", default=None, help="impl:mode pairs to run (default: all)")
    p.add_argument("--impl"), p.add_argument("--mode"), p.add_argument("--op"), p.add_argument("--weights")
    p.add_argument("--shape", type=shape)
    a = p.parse_args()
    if a.impl:
        return worker(a)
    cases = [("encode", shape(str(a.image))), ("decode", shape(str(a.image)))] if a.image else []
    cases += [("decode", shape(a.video))] if a.video else []
    runs = [r for r in RUNS if a.only is None or f"{r[0]}:{r[1]}" in a.only]
    with tempfile.TemporaryDirectory() as tmp:
        make_weights(Path(tmp))
        print(f"device {a.device}, {a.dtype}, tiles {a.tile} px, chunks of 1 latent frame (4 video frames)")
        print(f"{'op':6} {'HxWxT':>12} | {'impl':9} {'mode':8} | {'time s':>8} {'peak MiB':>9}")
        todo = [(op, s, r) for op, s in cases for r in runs]
        results: dict = {}
        if a.long:
            todo += [("decode", shape(a.long), r) for r in (("ours", "untiled"), ("ours", "tiled"))]
        for op, s, (impl, mode) in todo:
            cmd = [sys.executable, __file__, "--impl", impl, "--mode", mode, "--op", op, "--weights", tmp,
                   "--shape", "x".join(map(str, s)), "--tile", str(a.tile), "--reps", str(a.reps),
                   "--device", a.device, "--dtype", a.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{op:6} {'x'.join(map(str, s)):>12} | {impl:9} {mode:8} | failed: "
                      f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[op, s, impl, mode] = r
            print(f"{op:6} {'x'.join(map(str, s)):>12} | {impl:9} {mode:8} | {r['time']:8.2f} {r['peak'] / 2**20:9.0f}",
                  flush=True)
        print_ratios(results)


def print_ratios(results: dict) -> None:
    """Ours (untiled and tiled) over each peer's untiled run of the same case: time and peak."""
    print("\nours / peer (untiled peer), time and peak:")
    for (op, s, impl, mode), r in results.items():
        if impl != "ours":
            continue
        cells = []
        for peer in ("diffusers", "core"):
            q = results.get((op, s, peer, "untiled"))
            if q and q["time"] > 0 and q["peak"] > 0:
                cells.append(f"{peer} {r['time'] / q['time']:.2f} time, {r['peak'] / q['peak']:.2f} peak")
        print(f"{op:6} {'x'.join(map(str, s)):>12} | ours {mode:8} | " + ("; ".join(cells) or "no peer measured"))


if __name__ == "__main__":
    main()
