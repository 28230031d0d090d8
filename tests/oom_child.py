"""Decodes under a real address-space limit (RLIMIT_AS), in its own process; run by tests/test_oom.py.

usage: oom_child.py WEIGHTS LATENT OUT_DIR HEADROOM_GIB

Loads the VAE and the latent, then lowers its own soft RLIMIT_AS to (mapped now + HEADROOM_GIB) for each phase
and raises it back afterwards:
  tight  - auto, with 8 MiB of room (first, before the heap holds freed blocks it could reuse): even the
           smallest tile fails and a VAEError explains;
  cancel - an untiled decode (tile=False) with a quarter of the room (it runs out early) and a should_stop that
           is always True: it must stop instead of retrying;
  auto   - the default decode (tile=None);
  never  - tile=False: the untiled attempt really fails, then the fallback retries.
Writes OUT_DIR/auto.safetensors, OUT_DIR/never.safetensors and OUT_DIR/report.json.
"""
import json
import logging
import resource
import sys
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vae_core import VAEError, VAEInterrupted, load_vae  # noqa: E402

weights, latent, out_dir, headroom = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(2)
vae = load_vae(weights)
z = load_file(latent)["latent_tensor"]
warnings: list = []


class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())


logging.getLogger("vae_core").addHandler(Collect(level=logging.WARNING))
report: dict = {}


def limited(phase: str, room_bytes: int, fn):
    warnings.clear()
    soft = psutil.Process().memory_info().vms + room_bytes
    resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))
    entry: dict = {"limit_bytes": soft}
    try:
        out = fn()
        entry["ok"] = True
        save_file({"image": out.contiguous()}, str(out_dir / f"{phase}.safetensors"))
    except (VAEError, VAEInterrupted) as e:
        entry.update(ok=False, error=type(e).__name__, message=str(e))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    entry.update(warnings=list(warnings), vm_peak_kb=int(status["VmPeak"].split()[0]))
    report[phase] = entry
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))


room = int(headroom * (1 << 30))
for phase in sys.argv[5:] or ["tight", "cancel", "auto", "never"]:
    if phase == "cancel":
        limited("cancel", room // 4, lambda: vae.decode(z, tile=False, should_stop=lambda: True))
    elif phase == "auto":
        limited("auto", room, lambda: vae.decode(z))
    elif phase == "never":
        limited("never", room, lambda: vae.decode(z, tile=False))
    elif phase == "tight":
        limited("tight", 8 << 20, lambda: vae.decode(z))
print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "warnings"} for k, v in report.items()}))
