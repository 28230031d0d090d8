"""A real ComfyUI server (0.3.75, unpacked from PyPI by scripts/setup_env.sh) with this pack loaded.

Used by the end-to-end tests: start it in a throw-away base directory, write model files into its model
folders, post API-format prompts, read /history, the websocket and /view.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
HOST_DIR = ROOT / ".host" / "ComfyUI"
PACK_NAME = "comfyui-vae-suite"
HELPER_PACKS = ROOT / "tests" / "host_packs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyHost:
    def __init__(self, base_dir: Path, extra_args: list[str] | None = None, port: int | None = None):
        self.base = Path(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "comfyui.log"
        for sub in ("models/vae", "models/vae_approx", "models/checkpoints", "models/diffusion_models", "models/unet",
                    "custom_nodes", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        for pack in sorted(HELPER_PACKS.iterdir()) if HELPER_PACKS.is_dir() else []:  # test-only node packs
            if (pack / "__init__.py").is_file() and not (self.base / "custom_nodes" / pack.name).exists():
                (self.base / "custom_nodes" / pack.name).symlink_to(pack, target_is_directory=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 120.0) -> "ComfyHost":
        if not (HOST_DIR / "main.py").is_file():
            raise RuntimeError(f"ComfyUI host missing at {HOST_DIR}: run scripts/setup_env.sh")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base), *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=HOST_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(f"{self.url}/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------ HTTP
    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, payload: Any = None, **kw) -> requests.Response:
        return requests.post(self.url + path, json=payload, timeout=kw.pop("timeout", 30), **kw)

    def object_info(self, node: str | None = None) -> dict:
        r = self.get(f"/object_info/{node}" if node else "/object_info")
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises AssertionError with node_errors on a 400."""
        r = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if r.status_code != 200:
            raise AssertionError(f"/prompt rejected ({r.status_code}): {r.text[:3000]}")
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt finished (successfully or not); returns its history entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}").json()
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                if entry["status"].get("status_str") in ("success", "error") or entry.get("outputs"):
                    return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s\n{self.log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue a prompt and wait for it; raise with the server's own error message if it failed."""
        entry = self.wait(self.queue(prompt), timeout)
        err = execution_error(entry)
        if err is not None:
            raise AssertionError(f"prompt failed: {err.get('exception_type')}: {err.get('exception_message')}\n"
                                 f"{''.join(err.get('traceback', []))[-3000:]}")
        return entry

    def images(self, entry: dict, node_id: str) -> list:
        """The images an output node (SaveImage/PreviewImage) produced, as float32 numpy arrays in [0,1]."""
        import io

        import numpy as np
        from PIL import Image

        out = []
        for ref in entry["outputs"][node_id]["images"]:
            r = self.get("/view", params={"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                          "type": ref.get("type", "output")})
            r.raise_for_status()
            out.append(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.float32) / 255.0)
        return out

    def websocket(self, client_id: str):
        import websocket  # websocket-client

        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=30)
        return ws


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def collect_ws(ws, prompt_id: str, timeout: float = 300.0) -> tuple[list[dict], list[bytes]]:
    """Read websocket messages until the prompt ends; returns (json messages, binary frames)."""
    msgs: list[dict] = []
    frames: list[bytes] = []
    deadline = time.time() + timeout
    ws.settimeout(5)
    while time.time() < deadline:
        try:
            data = ws.recv()
        except Exception:
            continue
        if isinstance(data, bytes):
            frames.append(data)
            continue
        m = json.loads(data)
        msgs.append(m)
        d = m.get("data", {})
        if d.get("prompt_id") == prompt_id and (
                m["type"] in ("execution_error", "execution_interrupted", "execution_success")
                or (m["type"] == "executing" and d.get("node") is None)):
            break
    return msgs, frames
