"""example_workflows/: every UI workflow matches its API twin, ComfyUI lists the UI ones (and only those) as
templates, and every API twin runs on the real host with model files written under the names it uses."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfy_host import PACK_NAME
from conftest import PHOTO, TAESD_WEIGHTS, require_file
from test_nodes_host import ASYM_SMALL, KL_CORE_SHAPED, KL_SMALL, _perturb, _to_ldm

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
UI = sorted(EXAMPLES.glob("*.json"))
UI_ONLY_WIDGETS = {"upload"}  # frontend-only widgets that are not prompt inputs


def test_every_ui_workflow_has_an_api_twin():
    assert len(UI) >= 5
    assert sorted(p.name for p in (EXAMPLES / "api").glob("*.json")) == sorted(p.name for p in UI)
    used = {n["type"] for p in UI for n in json.loads(p.read_text())["nodes"]}
    for node in ("VAESuiteLoader", "VAESuiteEncode", "VAESuiteDecodeTiled", "VAESuiteAsymInpaintDecode"):
        assert node in used, f"no example workflow uses {node}"


@pytest.fixture(scope="module")
def example_models(comfy_host):
    """The files the examples name, as small seeded random-weight VAEs (and the real TAEF2 pair)."""
    vae_dir = comfy_host.base / "models" / "vae"
    approx = comfy_host.base / "models" / "vae_approx"
    torch.manual_seed(0)
    kl = _perturb(diffusers.AutoencoderKL(**KL_SMALL), 21)
    save_file({k: v.contiguous() for k, v in kl.state_dict().items()}, vae_dir / "sdxl_vae.safetensors")
    torch.manual_seed(0)
    core_shaped = _perturb(diffusers.AutoencoderKL(**KL_CORE_SHAPED), 22)  # what the core VAELoader can build
    save_file({k: v.half() for k, v in _to_ldm(core_shaped.state_dict()).items()},
              vae_dir / "vae-ft-mse-840000-ema-pruned.safetensors")
    del core_shaped
    torch.manual_seed(0)
    _perturb(diffusers.AsymmetricAutoencoderKL(**ASYM_SMALL), 23).save_pretrained(
        vae_dir / "asymmetric-autoencoder-kl-x-1-5")
    for part in ("encoder", "decoder"):
        dst = approx / f"taef2_{part}.pth"
        if not dst.exists():
            shutil.copy(require_file(TAESD_WEIGHTS / f"taef2_{part}.pth"), dst)
    img = Image.open(require_file(PHOTO)).convert("RGB").resize((32, 32), Image.BICUBIC)
    img.save(comfy_host.base / "input" / "example.png")
    rgba = np.concatenate([np.asarray(img), np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    rgba[8:24, 8:24, 3] = 0  # transparent = inpaint
    Image.fromarray(rgba, "RGBA").save(comfy_host.base / "input" / "example_inpaint.png")
    return comfy_host


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the frontend sends for a UI workflow: links by (origin id, slot), widget values by input order."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        spec = object_info[node["type"]]["input"]
        values = list(node.get("widgets_values", []))
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for section in ("required", "optional"):
            for name, decl in spec.get(section, {}).items():
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
                    continue
                kind = decl[0]
                if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                    assert values, f"{node['type']} #{node['id']}: no widget value for {name}"
                    inputs[name] = values.pop(0)
                    opts = decl[1] if len(decl) > 1 else {}
                    if name in ("seed", "noise_seed") or opts.get("control_after_generate"):
                        values.pop(0)  # the frontend's control_after_generate widget
                    if opts.get("image_upload") and values and values[0] in ("image",):
                        values.pop(0)
        assert not values, f"{node['type']} #{node['id']}: unused widget values {values}"
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_example_runs_on_the_host(example_models, path):
    host = example_models
    info = host.object_info()
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4
    api = json.loads((EXAMPLES / "api" / path.name).read_text())
    from_ui = ui_to_api(ui, info)
    assert from_ui == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    entry = host.run(api)
    saves = [k for k, v in api.items() if v["class_type"] == "SaveImage"]
    for k in saves:
        images = host.images(entry, k)
        assert images and np.isfinite(images[0]).all() and images[0].std() > 0.01


def test_ui_workflows_are_listed_as_templates(comfy_host):
    templates = comfy_host.get("/workflow_templates").json().get(PACK_NAME, [])
    assert sorted(templates) == sorted(p.stem for p in UI)
    r = comfy_host.get(f"/api/workflow_templates/{PACK_NAME}/{UI[0].name}")
    assert r.status_code == 200 and r.json()["version"] == 0.4


def test_run_workflow_script(example_models):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_workflow.py"),
                        str(EXAMPLES / "api" / "taesd_roundtrip.json"), "--url", example_models.url, "--timeout", "300"],
                       capture_output=True, text=True, timeout=320)
    assert r.returncode == 0, r.stderr
    assert "/view?filename=" in r.stdout and "type=output" in r.stdout
