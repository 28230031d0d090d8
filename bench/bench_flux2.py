"""FLUX.2 VAE speed and peak memory: vae_core against diffusers' AutoencoderKLFlux2 and ComfyUI core's FLUX.2 VAE,
same seeded weights (released config, 84 M parameters, non-trivial BatchNorm statistics), in one process.

Every op goes from ComfyUI's FLUX.2 LATENT space, as a FLUX.2 workflow uses the VAE: decode takes the
diffusion-space latent [1,128,S/16,S/16] (diffusers: the pipeline's un-normalise + unpatchify, then
``decode``), encode returns it (diffusers: ``encode`` mean, then the pipeline's patchify + normalise).
- untiled: ours ``decode_diffusion/encode_diffusion(tile=False)``; diffusers plain; core ``VAE.decode/encode``.
- tiled (512 px tiles): ours exact ``Tiling(512, 64)``; diffusers ``enable_tiling()`` with 512 px tiles;
  core ``decode_tiled``/``encode_tiled`` with the settings its VAE Decode (Tiled) node passes for 512/64.
Rounds are interleaved (each round runs every implementation once per op, in a rotating order); the median of
the rounds is printed. Memory: the rise of the process's peak RSS over the call (CPU) or
torch.cuda.max_memory_allocated (CUDA). Ratios are ours / peer: below 1.0 is faster or smaller. The max abs
difference of each output from our untiled one is printed too (images clamped to [-1, 1], as core returns them;
ours tiled is exact, the other tilers are not).

    .venv/bin/python bench/bench_flux2.py                       # 1024², 1 round, CPU fp32
    .venv/bin/python bench/bench_flux2.py --size 256 --rounds 1 # a quick check of the script
    .venv/bin/python bench/bench_flux2.py --device cuda --dtype bf16 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

from measure import PeakRSS  # noqa: E402

TILE, OVERLAP = 512, 64


def build_peers(device, dtype, work: Path):
    import diffusers
    from safetensors.torch import save_file

    from ldm_layout import HOST, to_ldm_flux2
    from vae_core import load_vae

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLFlux2().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ref.bn.running_mean.copy_(torch.randn(128, generator=g) * 0.5)
        ref.bn.running_var.copy_(torch.rand(128, generator=g) * 3 + 0.2)
    ref.save_pretrained(work / "vae")
    save_file({k: v.contiguous() for k, v in to_ldm_flux2(ref.state_dict()).items()}, str(work / "ae.safetensors"))
    ours = load_vae(str(work / "vae"), device=device, dtype=dtype)
    ref = ref.to(device, dtype)

    sys.argv = sys.argv[:1]  # comfy parses the command line on import
    sys.path.insert(0, str(HOST))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = device.type == "cpu"
    import comfy.sd
    import comfy.utils

    core = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(work / "ae.safetensors")), dtype=dtype)
    assert core.latent_channels == 128 and core.downscale_ratio == 16
    return ours, ref, core


def impls(ours, ref, core, device):
    from vae_core.tiling import Tiling

    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline as P

    def d_dec(z):
        return ref.decode(P._unpatchify_latents(z * std + mean)).sample

    def d_enc(x):
        return (P._patchify_latents(ref.encode(x).latent_dist.mode()) - mean) / std

    def d_tiled(fn):
        def run(v):
            ref.enable_tiling()
            ref.tile_sample_min_size, ref.tile_latent_min_size = TILE, TILE // 8
            try:
                return fn(v)
            finally:
                ref.disable_tiling()
        return run

    to_px = lambda x: ((x + 1) / 2).movedim(1, -1)  # noqa: E731  [-1,1] NCHW -> ComfyUI IMAGE
    from_px = lambda y: (y.movedim(-1, 1) * 2 - 1)  # noqa: E731
    f = 16
    return {
        "decode": {
            "ours": lambda z: ours.decode_diffusion(z, tile=False),
            "diffusers": d_dec,
            "core": lambda z: from_px(core.decode(z)),
        },
        "decode tiled": {
            "ours": lambda z: ours.decode_diffusion(z, tile=Tiling(TILE, OVERLAP)),
            "diffusers": d_tiled(d_dec),
            "core": lambda z: from_px(core.decode_tiled(z, tile_x=TILE // f, tile_y=TILE // f, overlap=OVERLAP // f)),
        },
        "encode": {
            "ours": lambda x: ours.encode_diffusion(x, tile=False),
            "diffusers": d_enc,
            "core": lambda x: core.encode(to_px(x)),
        },
        "encode tiled": {
            "ours": lambda x: ours.encode_diffusion(x, tile=Tiling(TILE, OVERLAP)),
            "diffusers": d_tiled(d_enc),
            "core": lambda x: core.encode_tiled(to_px(x), tile_x=TILE, tile_y=TILE, overlap=OVERLAP),
        },
    }


def measure(fn, inp, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.inference_mode(), PeakRSS() as m:
        t0 = time.perf_counter()
        out = fn(inp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else m.peak - m.base
    return dt, peak, out.float().cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--ops", nargs="+", default=["decode", "decode tiled", "encode", "encode tiled"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref, core = build_peers(device, dtype, Path(tmp))
    runs = impls(ours, ref, core, device)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(1, 3, a.size, a.size, generator=g) * 2 - 1).to(device, dtype)
    z = torch.randn(1, 128, a.size // 16, a.size // 16, generator=g).to(device, dtype)
    names = ["ours", "diffusers", "core"]
    res = {op: {n: [] for n in names} for op in a.ops}
    outs: dict = {}
    print(f"FLUX.2 VAE, {a.size}x{a.size}, {a.device} {a.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {a.rounds} round(s)", flush=True)
    for r in range(a.rounds):
        for k, op in enumerate(a.ops):
            inp = z if op.startswith("decode") else x
            order = names[(r + k) % 3:] + names[:(r + k) % 3]
            for n in order:
                dt, peak, out = measure(runs[op][n], inp, device)
                res[op][n].append((dt, peak))
                outs[(op, n)] = out
                print(f"  round {r + 1} {op:13} {n:9} {dt:8.2f} s {peak / 2**20:8.0f} MiB", flush=True)
    mib = 2 ** 20
    print()
    print("| op | ours | diffusers | core | time ours/diffusers | time ours/core | MiB ours | MiB diffusers | "
          "MiB core | mem ours/diffusers | mem ours/core | max diff from ours untiled: ours, diffusers, core |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for op in a.ops:
        t = {n: statistics.median(v[0] for v in res[op][n]) for n in names}
        m = {n: statistics.median(v[1] for v in res[op][n]) for n in names}
        clamp = (lambda t: t.clamp(-1, 1)) if op.startswith("decode") else (lambda t: t)  # core clamps images
        base = clamp(outs[(op.split()[0], "ours")])
        diffs = ", ".join(f"{(clamp(outs[(op, n)]) - base).abs().max().item():.1e}" for n in names)
        print(f"| {op} | {t['ours']:.1f} s | {t['diffusers']:.1f} s | {t['core']:.1f} s | "
              f"**{t['ours'] / t['diffusers']:.2f}** | **{t['ours'] / t['core']:.2f}** | {m['ours'] / mib:.0f} | "
              f"{m['diffusers'] / mib:.0f} | {m['core'] / mib:.0f} | {m['ours'] / max(m['diffusers'], 1):.2f} | "
              f"{m['ours'] / max(m['core'], 1):.2f} | {diffs} |")


if __name__ == "__main__":
    main()
