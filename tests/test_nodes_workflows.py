"""example_workflows/: every UI workflow matches its API twin, ComfyUI lists the UI ones (and only those) as
templates with a human title, a one-line description and a thumbnail the frontend finds, each stand-in example
says so in a Note, and every API twin runs on the real host with the model files the main job writes
(scripts/make_demo_models.py, stand-ins) and its outputs appear."""
from __future__ import annotations

import io
import json
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_host import PACK_NAME, collect_ws, execution_error
from conftest import PHOTO, TAESD_WEIGHTS, require_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_demo_models  # noqa: E402
import make_examples  # noqa: E402

EXAMPLES = ROOT / "example_workflows"
UI = sorted(EXAMPLES.glob("*.json"))
UI_ONLY = {"Note", "MarkdownNote"}  # frontend-only nodes, not in the prompt
OURS = ("VAESuiteLoader", "VAESuiteEncode", "VAESuiteDecodeTiled", "VAESuiteAsymInpaintDecode", "VAESuiteTAESDPreview")


def test_every_ui_workflow_has_an_api_twin():
    assert len(UI) >= 6
    assert sorted(p.name for p in (EXAMPLES / "api").glob("*.json")) == sorted(p.name for p in UI)
    used = {n["type"] for p in UI for n in json.loads(p.read_text())["nodes"]}
    for node in OURS:
        assert node in used, f"no example workflow uses {node}"


def test_workflows_are_what_the_generator_writes():
    """example_workflows/ is scripts/make_examples.py's output (edit the specs there, then rerun it)."""
    for title, spec in make_examples.TEMPLATES.items():
        ui, api = make_examples.build(spec, title)
        assert json.loads((EXAMPLES / f"{title}.json").read_text()) == ui, title
        assert json.loads((EXAMPLES / "api" / f"{title}.json").read_text()) == api, title
    assert sorted(make_examples.TEMPLATES) == sorted(p.stem for p in UI)


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_template_title_description_thumbnail_note(path):
    ui = json.loads(path.read_text())
    title, desc = ui["extra"]["title"], ui["extra"]["description"]
    assert title == path.stem and title[0].isupper() and "_" not in title
    assert "\n" not in desc and 20 < len(desc) < 160 and desc.lower() != title.lower()
    thumb = path.with_suffix(".jpg")  # the frontend asks /api/workflow_templates/<pack>/<name>.jpg
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and max(im.size) <= 512 and min(im.size) >= 128
        assert np.asarray(im.convert("L"), np.float32).std() > 1.0  # a picture, not a blank
    assert thumb.stat().st_size < 120_000
    # every model file the example names that the main job may have to stand in for is named in its Note
    standins = {Path(rel).name for rel in ("vae/" + make_demo_models.SD_VAE, "vae/taesd", make_demo_models.DEMO_UNET,
                                           "vae/asymmetric-autoencoder-kl-x-1-5", "vae/" + make_demo_models.FLUX2_VAE,
                                           make_demo_models.QWEN_VAE, make_demo_models.WAN_VAE)}
    named = {str(v).rstrip("/") for n in ui["nodes"] for v in n.get("widgets_values", []) if isinstance(v, str)}
    notes = " ".join(n["widgets_values"][0] for n in ui["nodes"] if n["type"] in UI_ONLY)
    for name in named & standins:
        assert name in notes and "noise" in notes, (path.stem, name)


def test_tiled_example_really_tiles():
    from vae_core.tiling import plan_grid

    api = json.loads((EXAMPLES / "api" / "Encode and decode 1536x1024 in 512 px tiles.json").read_text())
    scale = next(n["inputs"] for n in api.values() if n["class_type"] == "ImageScale")
    for n in api.values():
        if n["class_type"] in ("VAESuiteEncode", "VAESuiteDecodeTiled"):
            i = n["inputs"]
            assert (i["tiling"], i["tile_size"]) == ("always", 512)
            plan = plan_grid(width=scale["width"], height=scale["height"], tile_size=i["tile_size"],
                             overlap=i["overlap"], downscale=8, family="tiny", tiling="always")
            assert (plan["cols"], plan["rows"]) == (3, 2)


@pytest.fixture(scope="module")
def example_models(comfy_host):
    """What the main job writes offline (scripts/make_demo_models.py: stand-ins under the examples' names, the demo
    UNet), the real TAEF2 pair, and small input images."""
    approx = comfy_host.base / "models" / "vae_approx"
    for part in ("encoder", "decoder"):
        dst = approx / f"taef2_{part}.pth"
        if not dst.exists():
            shutil.copy(require_file(TAESD_WEIGHTS / f"taef2_{part}.pth"), dst)
    img = Image.open(require_file(PHOTO)).convert("RGB").resize((64, 64), Image.BICUBIC)
    img.save(comfy_host.base / "input" / "example.png")
    rgba = np.concatenate([np.asarray(img), np.full((64, 64, 1), 255, np.uint8)], axis=-1)
    rgba[16:48, 16:48, 3] = 0  # transparent = inpaint
    Image.fromarray(rgba, "RGBA").save(comfy_host.base / "input" / "example_inpaint.png")
    assert not make_demo_models.main(comfy_host.base / "models", comfy_host.base / "input", fetch=False)
    return comfy_host


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the frontend sends for a UI workflow: links by (origin id, slot), widget values by input order."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in UI_ONLY:
            continue
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
    client = uuid.uuid4().hex
    ws = host.websocket(client)
    try:
        pid = host.queue(api, client)
        msgs, frames = collect_ws(ws, pid, timeout=600)
    finally:
        ws.close()
    entry = host.wait(pid)
    assert execution_error(entry) is None, execution_error(entry)
    saves = [k for k, v in api.items() if v["class_type"] == "SaveImage"]
    assert saves
    for k in saves:
        images = host.images(entry, k)
        assert images and np.isfinite(images[0]).all() and images[0].std() > 0.002
    scale = [v["inputs"] for v in api.values() if v["class_type"] == "ImageScale"]
    if scale:  # the tiled example: the output has the size it tiled
        assert images[0].shape[:2] == (scale[0]["height"], scale[0]["width"])
    sampler = [k for k, v in api.items() if v["class_type"] == "KSampler"]
    if sampler:  # the TAESD Preview example: a preview frame on the sampler node at every step
        steps = api[sampler[0]]["inputs"]["steps"]
        previews = [f for f in frames if int.from_bytes(f[:4], "big") in (1, 4)]
        assert len(previews) >= steps, (len(previews), steps)
        jpeg = next(f for f in previews if b"\xff\xd8" in f[:400])
        im = Image.open(io.BytesIO(jpeg[jpeg.index(b"\xff\xd8"):]))
        assert im.size == (512, 512)


def test_ui_workflows_are_listed_as_templates(comfy_host):
    templates = comfy_host.get("/workflow_templates").json().get(PACK_NAME, [])
    assert sorted(templates) == sorted(p.stem for p in UI)
    for p in UI:
        r = comfy_host.get(f"/api/workflow_templates/{PACK_NAME}/{p.name}")
        assert r.status_code == 200 and r.json()["version"] == 0.4
        t = comfy_host.get(f"/api/workflow_templates/{PACK_NAME}/{p.stem}.jpg")
        assert t.status_code == 200 and t.content[:2] == b"\xff\xd8", p.stem


def test_run_workflow_script(example_models):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_workflow.py"),
                        str(EXAMPLES / "api" / "Round-trip a photo through TAEF2.json"), "--url", example_models.url, "--timeout", "300"],
                       capture_output=True, text=True, timeout=320)
    assert r.returncode == 0, r.stderr
    assert "/view?filename=" in r.stdout and "type=output" in r.stdout


def test_all_five_nodes_are_in_vae_suite_documented_and_translated(comfy_host):
    """One category and "(VAE Suite)" names for all five; every input and output has a tooltip, a help page and a
    zh-CN name and tooltip; the registry icon the pyproject points at is shipped."""
    import tomllib

    info = comfy_host.object_info()
    zh = json.loads((ROOT / "locales" / "zh" / "nodeDefs.json").read_text())
    for node in OURS:
        d = info[node]
        assert d["category"] == "VAE Suite" and d["display_name"].endswith("(VAE Suite)"), (node, d["category"])
        assert d.get("output_tooltips") and all(d["output_tooltips"]), node
        page = (ROOT / "web" / "docs" / f"{node}.md").read_text()
        assert page.startswith(f"# {d['display_name']}") and "## Inputs" in page and "## Example" in page, node
        assert zh[node]["display_name"].endswith("（VAE Suite）") and zh[node]["description"], node
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
                assert name in page, f"{node} help page lacks {name}"
                assert zh[node]["inputs"][name]["name"] and zh[node]["inputs"][name]["tooltip"], (node, name)
        assert zh[node]["outputs"]["0"]["tooltip"], node
    assert info["VAESuiteTAESDPreview"]["display_name"] == "TAESD Preview (VAE Suite)"
    icon = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]["Icon"]
    assert icon.endswith("/web/icon.svg") and (ROOT / "web" / "icon.svg").read_text().startswith("<svg")
