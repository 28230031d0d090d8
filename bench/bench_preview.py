"""Cost of one TAESD Preview against one sampler step, measured in the same run.

Per step the preview does: x0 -> raw latents, TAESD decode (last upsamplings skipped for the size cap), uint8 picture, and the
JPEG (quality 95) the server encodes before sending. Timed for a 1024x1024 image (128x128 latent) with a decoder
of the released taesd size (seeded random weights: the cost does not depend on the values):

- ``ours@512``  the node's default (max_size 512): the decoder skips its last upsampling
- ``ours@256``  max_size 256: the last two upsamplings skipped
- ``ours@1024`` no cap: the full decode
- ``core``      ComfyUI's own TAESD previewer (``--preview-method taesd``: full decode, then the server scales the
                picture to its 512 preview size), from ``.host/ComfyUI`` when present

The sampler step is one forward of a UNet at SD1.5's released config (diffusers ``UNet2DConditionModel``, 860 M
parameters, seeded random weights) on the same latent, batch 1 (cfg 1; with cfg > 1 a step costs about twice).

    .venv/bin/python bench/bench_preview.py                    # CPU fp32, 1024x1024
    .venv/bin/python bench/bench_preview.py --step-size 512    # a cheaper UNet step (512x512 latent) if 1024 is too slow
    .venv/bin/python bench/bench_preview.py --device cuda
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from preview_models import taesd_decoder_state_dict  # noqa: E402


class SD15Format:  # stand-in for comfy.latent_formats.SD15 (what the node reads from the model)
    scale_factor = 0.18215
    latent_channels = 4

    def process_out(self, z):
        return z / self.scale_factor


def jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)  # as ComfyUI's server encodes previews
    return buf.getvalue()


def core_previewer(path: str, device: torch.device):
    host = ROOT / ".host" / "ComfyUI"
    if not (host / "latent_preview.py").is_file():
        return None
    sys.path.insert(0, str(host))
    from comfy.cli_args import args

    args.cpu = device.type == "cpu"
    import latent_preview
    from comfy.taesd.taesd import TAESD
    from PIL import Image, ImageOps

    impl = latent_preview.TAESDPreviewerImpl(TAESD(None, path, latent_channels=4).to(device))

    def run(x0):
        kind, image, size = impl.decode_latent_to_preview_image("JPEG", x0)
        return jpeg(ImageOps.contain(image, (size, size), Image.BILINEAR))  # what server.send_image does
    return run


def median_time(fn, reps: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (latent = size/8)")
    ap.add_argument("--step-size", type=int, default=None, help="image side for the UNet step (default: --size)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--step-reps", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-step", action="store_true", help="skip the UNet step (previews only)")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    import vae_core.preview as pv

    tmp = Path(tempfile.mkdtemp())
    from safetensors.torch import save_file

    save_file(taesd_decoder_state_dict(4, seed=0), str(tmp / "taesd_decoder.safetensors"))
    decoder, _ = pv.load_decoder("taesd", device, ["taesd_decoder.safetensors"], lambda n: str(tmp / n), False)
    x0 = torch.randn(1, 4, a.size // 8, a.size // 8, device=device)  # a sampler's x0 (model space)
    fmt = SD15Format()

    def ours(max_size):
        def run():
            raw = pv.x0_to_raw(x0, fmt, decoder.latent_channels)
            return jpeg(pv.render_preview(decoder, raw, max_size))
        return run

    previews = {"ours@256": ours(256), "ours@512": ours(512), f"ours@{a.size}": ours(a.size)}
    core = core_previewer(str(tmp / "taesd_decoder.safetensors"), device)
    if core is not None:
        previews["core"] = lambda: core(x0)
    with torch.inference_mode():
        for fn in previews.values():  # warm-up
            fn()
        results = {}
        for _ in range(a.reps):  # round-robin so that load drifting on a shared machine hits each alike
            for name, fn in previews.items():
                results.setdefault(name, []).append(median_time(fn, 1, device))
        results = {k: statistics.median(v) for k, v in results.items()}

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"image {a.size}x{a.size} (latent {a.size // 8}x{a.size // 8}), taesd-size decoder, reps {a.reps}")
    for name, t in results.items():
        print(f"  preview {name:>10}: {t * 1000:8.1f} ms per step")
    if "core" in results:
        print(f"  ratio ours@512 / core = {results['ours@512'] / results['core']:.2f} "
              f"(both send a 512 px preview; below 1.0 = ours cheaper)")

    if a.no_step:
        return
    from diffusers import UNet2DConditionModel

    step_size = a.step_size or a.size
    unet = UNet2DConditionModel(cross_attention_dim=768).eval().to(device)  # SD1.5's released UNet config
    lat = torch.randn(1, 4, step_size // 8, step_size // 8, device=device)
    ctx = torch.zeros(1, 77, 768, device=device)
    t = torch.tensor([500.0], device=device)
    with torch.inference_mode():
        step = median_time(lambda: unet(lat, t, encoder_hidden_states=ctx).sample, a.step_reps, device)
    print(f"  sampler step (SD1.5 UNet, {step_size}x{step_size}, batch 1): {step * 1000:8.1f} ms")
    for name, tp in results.items():
        print(f"  preview {name:>10} / step = {tp / step:.3f}"
              + ("" if step_size == a.size else f"  (step at {step_size}px: at {a.size}px it is several times "
                                                 "longer, so the real fraction is smaller)"))


if __name__ == "__main__":
    main()
