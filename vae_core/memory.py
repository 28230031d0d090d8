"""How much memory this process can really use, and what an allocation failure looks like.

``available(device)`` is what auto tiling and the out-of-memory fallback compare estimates with. On CPU it is the
smallest of: the free memory psutil reports, the room left under this process's cgroup memory limit (v2
``memory.max`` or v1 ``memory.limit_in_bytes``), and the room left under ``RLIMIT_AS`` / ``RLIMIT_DATA`` (the
limit minus the address space already mapped). On CUDA it is the device's free memory plus what torch's caching
allocator holds unused (it reuses that before asking the driver).
"""
from __future__ import annotations

import gc
import resource
from pathlib import Path

import torch

from .errors import VAEError, VAEInterrupted

# The CPU allocator's failures are plain RuntimeErrors; these are the messages torch and the C++ runtime give.
_HOST_OOM_TEXT = ("can't allocate memory", "cannot allocate memory", "not enough memory", "std::bad_alloc",
                  "out of memory")


def is_oom(e: BaseException) -> bool:
    """An allocation failure: torch.OutOfMemoryError (CUDA's included), MemoryError, or the CPU allocator's
    RuntimeError."""
    if isinstance(e, (VAEError, VAEInterrupted)):
        return False
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _HOST_OOM_TEXT)


def host_ran_out(e: BaseException, device: torch.device) -> bool:
    """Whether host memory (not the accelerator's) is what ran out."""
    if device.type == "cpu":
        return True
    return not isinstance(e, torch.OutOfMemoryError) and "cuda" not in str(e).lower()


def release(device: torch.device) -> None:
    """Return what the failed attempt held: collect its tensors, hand cached device blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def available(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return host_available()


def host_available() -> int:
    import psutil

    room = [psutil.virtual_memory().available]
    cg = _cgroup_room()
    if cg is not None:
        room.append(cg)
    mapped = None
    for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY and soft > 0:
            if mapped is None:
                mapped = psutil.Process().memory_info().vms
            room.append(soft - mapped)
    return max(0, int(min(room)))


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit, or None where there is no limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            pairs = [(root / path.lstrip("/"), "memory.max", "memory.current")]
        elif "memory" in controllers.split(","):
            pairs = [(root / "memory" / path.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"),
                     (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]
        else:
            continue
        for folder, limit_file, usage_file in pairs:
            try:
                limit = (folder / limit_file).read_text().strip()
                usage = int((folder / usage_file).read_text().strip())
            except (OSError, ValueError):
                continue
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes a huge number for "no limit"
                return None
            return int(limit) - usage
    return None
