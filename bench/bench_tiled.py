"""Tiled decode bench: ours (exact streaming) vs diffusers' and ComfyUI core's tiled decode, one run.

SD1-config AutoencoderKL with seeded random weights (diffusers' own init, saved once and loaded by every
method), a latent with spatial structure (low-frequency noise), decoded at --size (1024 by default) with
--tile 512 / --overlap 64 pixels. Every method runs in its own subprocess, so peak memory is per method:

- ours_untiled: vae_core, tile=False (the reference every PSNR and time is relative to)
- ours_tiled:   vae_core, Tiling(tile, overlap, store) (store 'disk' on CPU, 'ram' (host) on CUDA by default);
                ours_tiled_ram / ours_tiled_disk / ours_tiled_device name the store explicitly
- diffusers:    AutoencoderKL.enable_tiling(), tile --tile px, overlap factor --overlap/--tile
- comfy:        comfy.sd.VAE(sd).decode_tiled(tile_x=tile/8, tile_y=tile/8, overlap=overlap/8) from .host/ComfyUI

Printed per method: PSNR of the decoded image (clamped to [0, 1]) against ours_untiled, peak memory and
time / ours_untiled time (wall clock, and process CPU time, which a busy shared machine disturbs less).
Peak memory: on CPU the process's peak RSS during the decode (VmHWM, reset after
loading) and its rise above the RSS after loading (weights, latent, imports); on CUDA
torch.cuda.max_memory_allocated during the decode (and the host RSS peak too).

    .venv/bin/python bench/bench_tiled.py                       # 1024^2 on CPU (a few minutes per method)
    .venv/bin/python bench/bench_tiled.py --size 2048 --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("ours_untiled", "ours_tiled", "diffusers", "comfy")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The RSS high-water mark (VmHWM) since the last ``reset_peak_rss`` (ru_maxrss if /proc lacks it)."""
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so loading the weights does not count as the decode's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def make_inputs(workdir: Path, size: int, seed: int) -> None:
    """The shared weights (diffusers folder) and latent."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    cfg = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
               sample_size=512, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)
    vae = AutoencoderKL(**cfg).eval()
    vae.save_pretrained(workdir / "vae", safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 1)
    h = size // 8
    z = torch.zeros(1, 4, h, h)
    for cells in (2, 4, 8, 16, 32):  # low-frequency noise: octaves of bilinearly upsampled noise
        n = torch.randn(1, 4, cells, cells, generator=g)
        z += torch.nn.functional.interpolate(n, size=(h, h), mode="bilinear", align_corners=False) / cells ** 0.5
    z = z / z.std()
    torch.save(z, workdir / "latent.pt")


def worker(args) -> None:
    workdir = Path(args.workdir)
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    z = torch.load(workdir / "latent.pt")
    method = args.worker
    if method.startswith("ours"):
        from vae_core import load_vae
        from vae_core.tiling import Tiling

        vae = load_vae(str(workdir / "vae"), device=device)
        store = args.store or ("ram" if device.type == "cuda" else "disk")
        if method.startswith("ours_tiled_"):  # ours_tiled_ram / _disk / _device: an explicit store
            store = method[len("ours_tiled_"):]
        tile = False if method == "ours_untiled" else Tiling(args.tile, args.overlap, store=store)
        run = lambda zz: vae.decode(zz.to(device), tile=tile)
    elif method == "diffusers":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(workdir / "vae").to(device).eval()
        vae.enable_tiling()
        vae.tile_sample_min_size = args.tile
        vae.tile_latent_min_size = args.tile // 8
        vae.tile_overlap_factor = args.overlap / args.tile
        run = lambda zz: vae.decode(zz.to(device)).sample
    elif method == "comfy":
        sys.argv = sys.argv[:1]  # comfy parses the command line on import
        sys.path.insert(0, str(ROOT / ".host" / "ComfyUI"))
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = device.type == "cpu"
        import comfy.sd
        from safetensors.torch import load_file

        sd = load_file(str(workdir / "vae" / "diffusion_pytorch_model.safetensors"))
        cvae = comfy.sd.VAE(sd=sd)
        t, o = args.tile // 8, args.overlap // 8
        run = lambda zz: cvae.decode_tiled(zz, tile_x=t, tile_y=t, overlap=o).movedim(-1, 1) * 2 - 1
    else:
        raise SystemExit(f"unknown method {method}")

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":  # warm up kernels on a small latent, then measure the real one
        run(z[..., :16, :16])
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_dev = torch.cuda.memory_allocated()
    import gc
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    times = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.repeat if device.type == "cuda" else 1):
        t0 = time.perf_counter()
        out = run(z)
        sync()
        times.append(time.perf_counter() - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / len(times)
    res = {"method": method, "time_s": sorted(times)[len(times) // 2], "cpu_s": cpu, "rss_peak": peak_rss_bytes(),
           "rss_base": base}
    if device.type == "cuda":
        res["dev_peak"] = torch.cuda.max_memory_allocated() - base_dev
    img = ((out.float().cpu().clamp(-1, 1) + 1) / 2)
    torch.save(img, workdir / f"{method}.pt")
    print("RESULT " + json.dumps(res), flush=True)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="image size in pixels (square); 2048+ wants a GPU")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--store", default=None, help="our store: ram | disk | device (default: disk on CPU, ram on CUDA)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method on CUDA (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse", action="store_true",
                    help="with --workdir: keep the inputs and the results of methods not in --methods from an earlier run")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="bench_tiled_") as tmp:
        workdir = Path(args.workdir or tmp)
        saved = workdir / "results.json"
        results = json.loads(saved.read_text()) if args.reuse and saved.is_file() else {}
        if not (args.reuse and (workdir / "latent.pt").is_file()):
            make_inputs(workdir, args.size, args.seed)
            results = {}
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", method, "--workdir", str(workdir), "--size", str(args.size),
                   "--tile", str(args.tile), "--overlap", str(args.overlap), "--device", args.device,
                   "--repeat", str(args.repeat)] + (["--store", args.store] if args.store else [])
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{method}: failed (rc {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
                continue
            results[method] = json.loads(line[0][7:])
            results[method]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            saved.write_text(json.dumps(results, indent=1))
            print(f"  {method} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

        ref_img = torch.load(workdir / "ours_untiled.pt") if "ours_untiled" in results else None
        ref = results.get("ours_untiled")
        print(f"\nSD1-config KL decode, {args.size}x{args.size}, tile {args.tile} / overlap {args.overlap} px, "
              f"device {args.device}, torch threads {torch.get_num_threads()}")
        if args.device == "cpu":
            print(f"{'method':16} {'PSNR dB':>8} {'peak RSS MB':>12} {'rise MB':>8} {'rise/untiled':>12} "
                  f"{'time s':>8} {'time/untiled':>12} {'CPU s':>8} {'CPU/untiled':>11}")
        else:
            print(f"{'method':14} {'PSNR dB':>8} {'GPU peak MB':>12} {'peak/untiled':>12} {'time s':>8} "
                  f"{'time/untiled':>12}")
        for method, r in results.items():
            p = psnr(torch.load(workdir / f"{method}.pt"), ref_img) if ref_img is not None else float("nan")
            rel_t = r["time_s"] / ref["time_s"] if ref else float("nan")
            if args.device == "cpu":
                rise = r["rss_peak"] - r["rss_base"]
                rel_m = rise / (ref["rss_peak"] - ref["rss_base"]) if ref else float("nan")
                rel_c = r["cpu_s"] / ref["cpu_s"] if ref else float("nan")
                print(f"{method:16} {p:8.2f} {r['rss_peak'] / 2**20:12.0f} {rise / 2**20:8.0f} {rel_m:12.3f} "
                      f"{r['time_s']:8.1f} {rel_t:12.3f} {r['cpu_s']:8.1f} {rel_c:11.3f}")
            else:
                rel_m = r["dev_peak"] / ref["dev_peak"] if ref else float("nan")
                print(f"{method:14} {p:8.2f} {r['dev_peak'] / 2**20:12.0f} {rel_m:12.3f} {r['time_s']:8.3f} "
                      f"{rel_t:12.3f}")


if __name__ == "__main__":
    main()
