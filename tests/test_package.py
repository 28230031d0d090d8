"""The pack as a package: registry metadata, the README's commands, what must never be committed."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_is_registry_ready():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert project["name"] == "comfyui-vae-suite" and re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert "dynamic" not in project  # comfy-cli reads dependencies literally
    names = {re.split(r"[<>=!~\[ ]", d)[0].lower().replace("-", "_") for d in project["dependencies"]}
    assert {"torch", "safetensors", "huggingface_hub", "numpy", "pillow"} <= names
    assert "diffusers" not in names  # a test oracle, never a runtime dependency
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"]


def test_comfy_node_validate_passes():
    comfy = ROOT / ".venv-tools" / "bin" / "comfy"
    assert comfy.exists(), "comfy-cli missing: run scripts/setup_env.sh"
    r = subprocess.run([str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert not re.search(r"\b(S102|S307|E702)\b", out), out  # exec / eval / several statements on one line
    assert re.search(r"valid|success|passed|✓", out, re.I), out


def test_readme_commands_are_the_scripts_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/start.sh" in readme and "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_no_weights_committed():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    weights = [f for f in files if re.search(r"\.(pth|pt|ckpt|safetensors|bin|onnx|sft)$", f, re.I)]
    assert not weights, weights


def test_vae_core_is_usable_on_its_own(tmp_path):
    """vae_core imports without ComfyUI or diffusers on the path, from a copy outside the pack."""
    import shutil
    shutil.copytree(ROOT / "vae_core", tmp_path / "vae_core", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, torch, vae_core; from vae_core import load_vae, VAE, VAEError; "
            "assert not any(m.split('.')[0] in ('diffusers', 'comfy', 'folder_paths', 'nodes') for m in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_pack_uses_relative_imports_only():
    """ComfyUI has its own top-level `nodes` module: the pack must never `import nodes` or `from vae_core`."""
    import ast

    bad = []
    for path in [ROOT / "__init__.py", *(ROOT / "nodes").rglob("*.py"), *(ROOT / "vae_core").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n.split(".")[0] in ("nodes", "vae_core") for n in names):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad
