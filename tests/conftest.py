"""Shared fixtures. Fixtures that a test needs and cannot find fail loudly in CI (CI=true), never skip."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHARED = Path(os.environ.get("VAE_SUITE_SHARED", ROOT.parent / "shared"))
TAESD_WEIGHTS = Path(os.environ.get("VAE_SUITE_TAESD_WEIGHTS", SHARED / "weights" / "taesd"))
PHOTO = Path(os.environ.get("VAE_SUITE_PHOTO", SHARED / "data" / "taesd_shiba_512.png"))


def require_file(path: Path) -> Path:
    """A fixture file from ../shared: in CI its absence is a failure, elsewhere a visible skip."""
    if not Path(path).is_file():
        msg = f"missing test fixture {path} (set VAE_SUITE_SHARED or VAE_SUITE_TAESD_WEIGHTS)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return Path(path)


@pytest.fixture(scope="session")
def photo():
    """The shared 512x512 photo as [1,3,H,W] in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    img = np.asarray(Image.open(require_file(PHOTO)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0) * 2 - 1


@pytest.fixture(scope="session")
def taesd_dir() -> Path:
    for name in ("taef2_encoder.pth", "taef2_decoder.pth", "taesana_encoder.pth"):
        require_file(TAESD_WEIGHTS / name)
    return TAESD_WEIGHTS


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    """One real ComfyUI server for the whole session, with this pack in custom_nodes/.

    Tests write their model files into ``comfy_host.base / "models" / <folder>`` (ComfyUI rescans folders
    whose mtime changed) and talk to it over HTTP.
    """
    from comfy_host import ComfyHost

    host = ComfyHost(tmp_path_factory.mktemp("comfy"))
    host.start()
    yield host
    host.stop()
