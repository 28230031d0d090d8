"""Before/after: untiled speed of this checkout's vae_core against another checkout's (e.g. the commit before a
refactor), on the same seeded weights, in one process, interleaved with the order rotating every round.

    git worktree add --detach /tmp/old <commit>
    .venv/bin/python bench/bench_ab.py --old /tmp/old                  # kl, tiny, dc at 256 and 512, CPU fp32
    .venv/bin/python bench/bench_ab.py --old /tmp/old --families kl --sizes 512 --rounds 5

Prints the median time of each and new / old (below 1.0: the new one is faster). The two packages are loaded
under different names, so both run in the same process on the same threads.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {  # released configs, seeded random weights
    "kl": ("kl", "sd1"),
    "tiny": ("tiny", "taesd"),
    "dc": ("dc", "dc-ae-f32c32-sana-1.0"),
}


def load_package(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path / "vae_core" / "__init__.py",
                                                  submodule_search_locations=[str(path / "vae_core")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def weights(pkg, family: str, variant: str) -> dict:
    mod = pkg.registry.get(family).module
    torch.manual_seed(0)
    model = mod.build(dict(mod.VARIANTS[variant]))
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        p.data = (1 + 0.1 * torch.randn(p.shape, generator=g)) if "norm" in name and name.endswith("weight") \
            else 0.05 * torch.randn(p.shape, generator=g)
    return {k: v.clone() for k, v in model.state_dict().items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="a checkout of the project to compare with")
    p.add_argument("--families", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--ops", nargs="+", default=["decode", "encode"])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import vae_core as new
    import vae_core.registry  # noqa: F401
    old = load_package(a.old.resolve(), "vae_core_old")
    print(f"new: {ROOT}  old: {a.old}  torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32; "
          f"median of {a.rounds} interleaved rounds after a warm-up")
    print(f"{'family':6} {'op':6} {'size':>5} | {'new s':>7} {'old s':>7} {'new/old':>7}")
    for fam in a.families:
        family, variant = CONFIGS[fam]
        sd = weights(new, family, variant)
        vaes = {"new": new.load_vae(dict(sd), family=family, variant=variant),
                "old": old.load_vae(dict(sd), family=family, variant=variant)}
        for size in a.sizes:
            for op in a.ops:
                g = torch.Generator().manual_seed(1)
                f = vaes["new"].downscale
                inp = (torch.rand(1, 3, size, size, generator=g) * 2 - 1 if op == "encode"
                       else torch.randn(1, vaes["new"].latent_channels, size // f, size // f, generator=g))
                times = {"new": [], "old": []}
                outs = {}
                for r in range(a.rounds + 1):
                    order = ["new", "old"] if r % 2 == 0 else ["old", "new"]
                    for who in order:
                        t0 = time.perf_counter()
                        outs[who] = getattr(vaes[who], op)(inp, tile=False)
                        if r:
                            times[who].append(time.perf_counter() - t0)
                diff = (outs["new"] - outs["old"]).abs().max().item()
                tn, to = statistics.median(times["new"]), statistics.median(times["old"])
                print(f"{fam:6} {op:6} {size:5d} | {tn:7.2f} {to:7.2f} {tn / to:7.2f}   (max abs diff {diff:.1e})",
                      flush=True)


if __name__ == "__main__":
    main()
