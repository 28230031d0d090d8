"""What the bench scripts share: the peak resident memory of the process while a block of code runs."""
from __future__ import annotations

import threading
import time


def fix_mmap_threshold(argv: list[str], unless: str | None = None) -> None:
    """Re-run this script with a fixed mmap threshold (before torch is imported): freed activations then go back
    to the OS, so one call's peak-RSS rise is its own. It costs every implementation page faults on each fresh
    buffer. ``unless``: a flag that keeps glibc's adaptive threshold (as ComfyUI runs), for times as users see
    them (peaks then include memory the heap reuses)."""
    import os
    import sys

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536" and (unless is None or unless not in argv):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *argv])


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples the resident set size every 2 ms while the block runs: ``peak - base`` is the block's own rise."""

    def __enter__(self):
        self.base = rss()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss())


def one_call(fn, device) -> tuple[float, int]:
    """(seconds, peak memory rise) of one ``fn()``: CUDA: max_memory_allocated over the call; CPU: the process's
    peak RSS over the call. The result is dropped before the peak is read."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as m:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    del out
    return dt, (torch.cuda.max_memory_allocated() - base if device.type == "cuda" else m.peak - m.base)


def time_and_peak(fn, inp, reps: int, device) -> dict:
    """Median time of ``reps`` calls after one warm-up (or one cold call for reps=0) and the peak memory rise
    (``one_call``)."""
    import torch

    times, peak = [], 0
    with torch.inference_mode():
        for i in range(reps + 1):  # the first call warms up (allocator, oneDNN primitives)
            dt, pk = one_call(lambda: fn(inp), device)
            peak = max(peak, pk)
            if i > 0 or reps == 0:
                times.append(dt)
    return {"time": sorted(times)[len(times) // 2], "peak": peak}


def compare_rows(script: str, weights, args) -> None:
    """For every size and op, run ``script --impl ours|diffusers ...`` in fresh subprocesses and print one row:
    time and peak memory of each, and ours / diffusers."""
    import json
    import subprocess
    import sys

    print(f"{'op':7} {'size':>5} | {'ours s':>8} {'diffusers s':>11} {'ratio':>6} | {'ours MiB':>9} {'diff. MiB':>9} {'ratio':>6}")
    for size in args.sizes:
        for op in args.ops:
            res = {}
            for impl in ("ours", "diffusers"):
                cmd = [sys.executable, script, "--impl", impl, "--op", op, "--size", str(size), "--weights",
                       str(weights), "--reps", str(args.reps), "--device", args.device, "--dtype", args.dtype]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{impl} {op} {size} failed:\n{out.stderr[-3000:]}")
                res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            o, d = res["ours"], res["diffusers"]
            mib = 2 ** 20
            print(f"{op:7} {size:5d} | {o['time']:8.2f} {d['time']:11.2f} {o['time'] / d['time']:6.2f} | "
                  f"{o['peak'] / mib:9.0f} {d['peak'] / mib:9.0f} {o['peak'] / max(d['peak'], 1):6.2f}", flush=True)
