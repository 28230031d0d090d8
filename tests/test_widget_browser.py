"""The tile-settings widget (web/) in a real Chromium against the real ComfyUI 0.3.75 host (frontend 1.32.9).

Needs Debian chromium and tests/browser/node_modules (scripts/setup_browser.sh installs both). The driver,
tests/browser/widget_test.mjs, checks: the extension loads, the node shows the widget with the tile grid of
the linked latent, a preset chosen with the mouse writes the INT widgets, a value that does not fit is
shown and fixed by a click, the queued prompt carries the values, a saved and reloaded workflow keeps them
(also in a page without our JS), and the pack logs no console error. Screenshots go to artifacts/.
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


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tile_widget_in_browser(comfy_host):
    _require_browser()
    _write_small_vae(comfy_host.base / "models" / "vae" / VAE_FILE)
    # the pack is loaded and its JS is listed
    assert "VAESuiteDecodeTiled" in comfy_host.object_info("VAESuiteDecodeTiled")
    exts = comfy_host.get("/extensions").json()
    assert "/extensions/comfyui-vae-suite/vae_suite_tiles.js" in exts, exts
    assert comfy_host.post("/settings/Comfy.TutorialCompleted", True).ok

    ARTIFACTS.mkdir(exist_ok=True)
    env = {**os.environ, "COMFY_URL": comfy_host.url, "VAE_NAME": VAE_FILE, "ARTIFACTS": str(ARTIFACTS),
           "CHROMIUM": str(CHROMIUM)}
    proc = subprocess.run(["node", str(DRIVER)], cwd=BROWSER_DIR, env=env, capture_output=True, text=True,
                          timeout=180)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"driver printed no result (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    facts = json.loads(lines[-1])
    (ARTIFACTS / "widget_facts.json").write_text(json.dumps(facts, indent=1))
    failed = {k: v for k, v in facts.get("checks", {}).items() if not v["ok"]}
    assert proc.returncode == 0 and not failed and "crash" not in facts, (
        f"rc {proc.returncode}; failed checks: {json.dumps(failed, indent=1)[:4000]}\n"
        f"crash: {facts.get('crash')}\nstderr: {proc.stderr[-3000:]}")
    expected = {"extension_registered", "pack_js_served", "widget_added", "widget_drawn_with_grid",
                "server_plan_used", "preset_768_sets_ints", "preset_768_grid", "bad_overlap_shown",
                "bad_overlap_fixed_by_click", "prompt_carries_values", "prompt_accepted",
                "workflow_widgets_values", "reloaded_workflow_keeps_values", "page_reload_keeps_values",
                "without_js_values_kept", "without_js_prompt_same", "encode_and_asym_nodes_have_widget",
                "no_console_error_from_pack", "no_failed_request_from_pack"}
    assert expected <= set(facts["checks"]), sorted(expected - set(facts["checks"]))

    # the prompt the page queued ran on the server with those values
    entry = comfy_host.wait(facts["prompt_id"], timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    prompt = entry["prompt"][2]
    dec = next(n for n in prompt.values() if n["class_type"] == "VAESuiteDecodeTiled")
    assert (dec["inputs"]["tile_size"], dec["inputs"]["overlap"]) == (768, 96)
    assert any(o.get("images") for o in entry["outputs"].values())

    png = ARTIFACTS / "widget_node.png"
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
