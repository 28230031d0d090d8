"""Import the pack the way ComfyUI does: as a package made from the repo root, so relative imports work.

ComfyUI loads ``custom_nodes/<pack>/__init__.py`` as a package; outside the host its ComfyUI-only parts (the HTTP
route) are skipped, and node modules import ComfyUI inside functions, so tests and benches can use them too.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vae_suite_pack"


def import_pack_module(name: str = ""):
    """``import_pack_module("nodes.preview")`` -> the module, inside the pack package."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = pack
        spec.loader.exec_module(pack)
    return importlib.import_module(f"{PACKAGE}.{name}" if name else PACKAGE)
