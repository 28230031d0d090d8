"""The tile-settings widget (web/) in a real Chromium against the real ComfyUI 0.3.75 host, on two frontends
(the host's own 1.32.9, and 1.58.1 from PyPI served with --front-end-root) x two renderers (the classic canvas
and the Vue node renderer, setting Comfy.VueNodes.Enabled).

Needs Debian chromium, tests/browser/node_modules and .cache/frontend-1.58.1 (scripts/setup_browser.sh installs
all three). The driver, tests/browser/widget_test.mjs, does under each renderer what a person does: clicks a
preset button, an input's arrow, the fix line and the Run button, links and unlinks the latent, changes its
size, loads the saved workflow; it checks the widget's values and drawing after each, and the prompt the queue
sent. One host start serves both renderers of a frontend. Screenshots go to artifacts/.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSER_DIR = ROOT / "tests" / "browser"
DRIVER = BROWSER_DIR / "widget_test.mjs"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "artifacts"
VAE_FILE = "widget_test_kl.safetensors"
NEW_FRONTEND = "1.58.1"
NEW_FRONTEND_ROOT = ROOT / ".cache" / f"frontend-{NEW_FRONTEND}" / "comfyui_frontend_package" / "static"
HOST_FRONTEND = "1.32.9"  # what ComfyUI 0.3.75's requirements install


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, BROWSER_DIR / "node_modules" / "playwright-core") if not p.exists()]
    if shutil.which("node") is None:
        missing.append("node")
    if missing:
        msg = f"browser test needs {', '.join(missing)}: run scripts/setup_browser.sh"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _write_small_vae(path: Path) -> None:
    """A seeded one-level AutoencoderKL without mid attention: decodes a 1536x1024 EmptyLatentImage in ~1 s."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                      up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=4,
                      norm_num_groups=32, mid_block_add_attention=False)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def new_frontend_host(tmp_path_factory):
    """The same ComfyUI serving the newest frontend on PyPI."""
    from comfy_host import ComfyHost

    index = NEW_FRONTEND_ROOT / "index.html"
    if not index.is_file():
        msg = f"frontend {NEW_FRONTEND} missing at {NEW_FRONTEND_ROOT}: run scripts/setup_browser.sh"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    host = ComfyHost(tmp_path_factory.mktemp("comfy_fe"), ["--front-end-root", str(NEW_FRONTEND_ROOT)])
    host.start()
    yield host
    host.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("frontend", [HOST_FRONTEND, NEW_FRONTEND])
def test_tile_widget_in_browser(frontend, request):
    _require_browser()
    host = request.getfixturevalue("comfy_host" if frontend == HOST_FRONTEND else "new_frontend_host")
    vae = host.base / "models" / "vae" / VAE_FILE
    if not vae.exists():
        _write_small_vae(vae)
    # the pack is loaded, its JS is listed, and the page serves the frontend asked for
    assert "VAESuiteDecodeTiled" in host.object_info("VAESuiteDecodeTiled")
    exts = host.get("/extensions").json()
    assert "/extensions/comfyui-vae-suite/vae_suite_tiles.js" in exts, exts
    assert host.post("/settings/Comfy.TutorialCompleted", True).ok
    served = host.get("/").text
    if frontend == NEW_FRONTEND:
        assert served == (NEW_FRONTEND_ROOT / "index.html").read_text()
    else:
        import comfyui_frontend_package  # the host's own frontend
        assert (Path(comfyui_frontend_package.__file__).parent / "static" / "index.html").read_text() == served

    # help pages where the frontend's node help looks, the zh locale, the search aliases
    for node in ("VAESuiteLoader", "VAESuiteEncode", "VAESuiteDecodeTiled", "VAESuiteAsymInpaintDecode",
                 "VAESuiteTAESDPreview"):
        page = host.get(f"/extensions/comfyui-vae-suite/docs/{node}.md")
        assert page.status_code == 200 and "## Inputs" in page.text and "## Example" in page.text, node
    zh = host.get("/i18n").json()["zh"]["nodeDefs"]
    assert zh["VAESuiteDecodeTiled"]["display_name"] == "VAE分块解码（VAE Suite）"
    assert zh["VAESuiteEncode"]["inputs"]["tile_size"]["tooltip"]
    aliases = host.get("/vae_suite/search_aliases").json()
    assert "tiled vae" in aliases["VAESuiteDecodeTiled"] and "taesd" in aliases["VAESuiteTAESDPreview"]
    assert "inpaint vae" in aliases["VAESuiteAsymInpaintDecode"]

    ARTIFACTS.mkdir(exist_ok=True)
    env = {**os.environ, "COMFY_URL": host.url, "VAE_NAME": VAE_FILE, "ARTIFACTS": str(ARTIFACTS),
           "CHROMIUM": str(CHROMIUM), "FRONTEND": frontend, "RENDERERS": "classic,vue"}
    proc = subprocess.run(["node", str(DRIVER)], cwd=BROWSER_DIR, env=env, capture_output=True, text=True,
                          timeout=540)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"driver printed no result (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    facts = json.loads(lines[-1])
    (ARTIFACTS / f"widget_facts_{frontend}.json").write_text(json.dumps(facts, indent=1))
    failed = {k: v for k, v in facts.get("checks", {}).items() if not v["ok"]}
    assert proc.returncode == 0 and not failed and "crash" not in facts, (
        f"rc {proc.returncode}; failed checks: {json.dumps(failed, indent=1)[:4000]}\n"
        f"crash: {facts.get('crash')}\nstderr: {proc.stderr[-3000:]}")
    per_renderer = {"renderer_is_active", "search_aliases_reach_frontend", "widget_shows_linked_grid", "grid_is_the_routes_plan",
                    "unlinked_shows_size_unknown", "relinked_shows_grid", "upstream_size_change_redraws",
                    "preset_768_click_sets_inputs", "preset_768_shown", "overlap_arrow_steps_value",
                    "overlap_arrow_redraws", "bad_overlap_shown", "fix_line_click_fixes", "fix_does_not_loop",
                    "prompt_carries_values", "prompt_accepted", "workflow_widgets_values", "finished_run_redraws",
                    "loaded_workflow_keeps_values", "loaded_workflow_drawn", "no_console_error_from_pack",
                    "no_failed_request_from_pack"}
    expected = {f"{r}_{c}" for r in ("classic", "vue") for c in per_renderer}
    expected |= {"without_js_values_kept", "without_js_prompt_same"}
    assert expected <= set(facts["checks"]), sorted(expected - set(facts["checks"]))

    # the prompts the page queued ran on the server with those values
    for renderer in ("classic", "vue"):
        entry = host.wait(facts[f"{renderer}_prompt_id"], timeout=120)
        assert entry["status"]["status_str"] == "success", entry["status"]
        dec = next(n for n in entry["prompt"][2].values() if n["class_type"] == "VAESuiteDecodeTiled")
        assert (dec["inputs"]["tile_size"], dec["inputs"]["overlap"]) == (768, 96)
        assert any(o.get("images") for o in entry["outputs"].values())
        png = ARTIFACTS / f"widget_{frontend}_{renderer}.png"
        assert png.is_file() and png.stat().st_size > 2000


def require_node() -> None:
    if shutil.which("node") is None:
        if os.environ.get("CI"):
            pytest.fail("node is missing")
        pytest.skip("node is missing")


def run_module(script: str):
    """Run an ES module snippet with node in the repo root; returns the JSON it printed."""
    require_node()
    out = subprocess.run(["node", "--input-type=module", "-e", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_js_grid_matches_vae_core_plan_grid():
    """The widget's offline grid (web/lib/tile_plan.js) cuts tiles exactly as vae_core.tiling.plan_grid."""
    from vae_core.tiling import plan_grid

    cases = [(1536, 1024, 512, 64, 8), (1100, 700, 512, 64, 8), (1000, 256, 512, 0, 32), (4096, 2304, 768, 96, 8),
             (333, 1201, 256, 32, 8), (2048, 2048, 1024, 128, 32), (512, 512, 512, 64, 8), (97, 4000, 64, 16, 8)]
    script = ("import { planGrid } from './web/lib/tile_plan.js';\n"
              f"const cases = {json.dumps(cases)};\n"
              "console.log(JSON.stringify(cases.map(([w, h, t, o, d]) => planGrid({ width: w, height: h, "
              "tileSize: t, overlap: o, downscale: d }).tiles.map((r) => [r.x, r.y, r.x + r.w, r.y + r.h]))));\n")
    for (w, h, t, o, d), tiles in zip(cases, run_module(script)):
        py = plan_grid(width=w, height=h, tile_size=t, overlap=o, downscale=d, family="kl", tiling="always")
        assert tiles == py["tiles"], (w, h, t, o, d)


def test_js_correction_matches_vae_core():
    """The widget corrects tile_size/overlap exactly as the nodes do (vae_core.tiling.correct_tiling)."""
    from vae_core.tiling import NODE_TILE_MAX, NODE_TILE_MIN, correct_tiling

    cases = [(512, 64, 8), (500, 500, 8), (768, 96, 8), (100, 0, 32), (4096, 3000, 8), (70, 70, 8), (64, -5, 8),
             (1000, 130, 32), (9000, 64, 8), (512, 255, 1), (640, 320, 16), (96, 47, 8)]
    script = ("import { correctTiling } from './web/lib/tile_plan.js';\n"
              f"const cases = {json.dumps(cases)};\n"
              "console.log(JSON.stringify(cases.map(([t, o, d]) => { const r = correctTiling({ tileSize: t, "
              "overlap: o, downscale: d }); return [r.tileSize, r.overlap, r.changed]; })));\n")
    for (t, o, d), js in zip(cases, run_module(script)):
        size, lap, notes = correct_tiling(t, o, d, NODE_TILE_MIN, NODE_TILE_MAX, min_latent=8)
        assert js == [size, lap, bool(notes)], ((t, o, d), js, (size, lap, notes))


def test_js_unit_tests_pass():
    """The widget's pure logic (web/lib/tile_plan.js) under node's own test runner (tests/js/)."""
    require_node()
    out = subprocess.run(["node", "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    passed = int(re.search(r"^# pass (\d+)", out.stdout, re.M).group(1))
    assert passed >= 10 and re.search(r"^# fail 0$", out.stdout, re.M), out.stdout[-2000:]
