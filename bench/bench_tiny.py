"""Speed and peak memory of vae_core's AutoencoderTiny against its peers, measured in the same run.

Peers, all holding the same seeded random weights at the released TAESD layout (4 latent channels):
- diffusers ``AutoencoderTiny`` (encode(x).latents / decode(z).sample)
- ComfyUI core ``comfy.taesd.taesd.TAESD`` from ``.host/ComfyUI`` (skipped when that checkout is absent)
Ours is timed through the public API (``VAE.encode``/``VAE.decode``: input checks, raw<->diffusion scaling) and
as the bare network (``ours-net``).
Ratios are ours / peer (time, peak memory rise over the call): below 1.0 means ours is faster or lighter.

    .venv/bin/python bench/bench_tiny.py --size 512 --reps 5            # CPU fp32
    .venv/bin/python bench/bench_tiny.py --device cuda --dtype fp16 --size 1024
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

from measure import fix_mmap_threshold, one_call  # noqa: E402

fix_mmap_threshold(sys.argv)

import torch  # noqa: E402

from vae_core import load_vae  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timed(impls: dict, reps: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """name -> (median seconds, peak memory rise in MiB: resident memory on CPU, allocated memory on CUDA). A
    warm-up call each, then ``reps`` rounds in an order rotating every round, so that load drifting on a shared
    machine hits every implementation alike."""
    names = list(impls)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, int] = {name: 0 for name in names}
    with torch.inference_mode():
        for name in names:
            impls[name]()
        for r in range(reps):
            for name in names[r % len(names):] + names[: r % len(names)]:
                dt, pk = one_call(impls[name], device)
                times[name].append(dt)
                peaks[name] = max(peaks[name], pk)
    return {name: (statistics.median(times[name]), peaks[name] / 2**20) for name in names}


def comfy_peer(ref_sd: dict, device: torch.device, dtype: torch.dtype):
    host = ROOT / ".host" / "ComfyUI"
    if not (host / "comfy" / "taesd" / "taesd.py").is_file():
        return None
    sys.path.insert(0, str(host))
    from comfy.cli_args import args

    args.cpu = device.type == "cpu"
    from comfy.taesd.taesd import TAESD

    m = TAESD(latent_channels=4)
    sd = {}
    for k, v in ref_sd.items():  # diffusers names -> ComfyUI's (decoder index + 1 for its clamp module)
        if mm := re.match(r"encoder\.layers\.(\d+)\.(.*)", k):
            sd[f"taesd_encoder.{mm.group(1)}.{mm.group(2)}"] = v
        elif mm := re.match(r"decoder\.layers\.(\d+)\.(.*)", k):
            sd[f"taesd_decoder.{int(mm.group(1)) + 1}.{mm.group(2)}"] = v
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)
    m.load_state_dict(sd, strict=True)
    return m.eval().to(device, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side in px (latent side = size/8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]

    import diffusers

    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny(latent_channels=4).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(Path(tmp) / "taesd")
        ours = load_vae(Path(tmp) / "taesd", device=device, dtype=dtype)
    comfy = comfy_peer(ref.state_dict(), device, dtype)
    ref = ref.to(device, dtype)

    x = (torch.rand(a.batch, 3, a.size, a.size, device=device) * 2 - 1).to(dtype)
    with torch.inference_mode():
        z_diff = ref.encode(x).latents  # diffusion-space latent, what diffusers and ComfyUI's TAESD decoder take
        z_raw = ours.from_diffusion(z_diff)  # what our API and ComfyUI's VAE.decode take
        err_enc = (ours.to_diffusion(ours.encode(x)).float() - z_diff.float()).abs().max().item()
        err_dec = (ours.decode(z_raw).float() - ref.decode(z_diff).sample.float()).abs().max().item()

    runs = {
        "encode": {"ours": lambda: ours.encode(x), "ours-net": lambda: ours.model.encode(x)[0],
                   "diffusers": lambda: ref.encode(x).latents},
        "decode": {"ours": lambda: ours.decode(z_raw), "ours-net": lambda: ours.model.decode(z_diff),
                   "diffusers": lambda: ref.decode(z_diff).sample},
    }
    if comfy is not None:
        runs["encode"]["comfy"] = lambda: comfy.encode(x)  # ComfyUI's TAESD takes [-1,1] and returns raw latents
        runs["decode"]["comfy"] = lambda: comfy.decode(z_raw)

    print(f"AutoencoderTiny bench: {a.batch}x3x{a.size}x{a.size}, {device} {a.dtype}, threads "
          f"{torch.get_num_threads()}, median of {a.reps}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"parity vs diffusers (max abs): encode {err_enc:.2e}, decode {err_dec:.2e}")
    for op, impls in runs.items():
        res = timed(impls, a.reps, device)
        t_ours, m_ours = res["ours"]
        line = f"{op:6s} ours {t_ours * 1e3:8.1f} ms peak {m_ours:6.0f} MiB"
        for name, (t, m) in res.items():
            if name != "ours":
                line += f" | {name} {t * 1e3:8.1f} ms {m:6.0f} MiB, ratio time {t_ours / t:.2f} peak {m_ours / max(m, 1e-9):.2f}"
        print(line)


if __name__ == "__main__":
    main()
