#!/usr/bin/env python3
"""Run an API-format workflow on a running ComfyUI and print where its images went.

    python scripts/run_workflow.py "example_workflows/api/Encode and decode 1536x1024 in 512 px tiles.json" --url http://127.0.0.1:8188

Export your own with "Export (API)" in ComfyUI's workflow menu. Only the standard library is used.
"""
import argparse
import json
import time
import urllib.request
import uuid


def call(url, path, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workflow", help="API-format workflow JSON")
    ap.add_argument("--url", default="http://127.0.0.1:8188")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    prompt = json.load(open(a.workflow))
    pid = call(a.url, "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]
    deadline = time.time() + a.timeout
    while time.time() < deadline:
        entry = call(a.url, f"/history/{pid}").get(pid)
        if entry and entry.get("status", {}).get("completed") is not None:
            for kind, msg in entry["status"].get("messages", []):
                if kind == "execution_error":
                    raise SystemExit(f"node {msg['node_id']} ({msg['node_type']}): {msg['exception_message']}")
            for node, out in entry["outputs"].items():
                for img in out.get("images", []):
                    print(f"node {node}: {a.url}/view?filename={img['filename']}&subfolder={img['subfolder']}"
                          f"&type={img['type']}")
            return
        time.sleep(0.5)
    raise SystemExit(f"prompt {pid} did not finish within {a.timeout}s")


if __name__ == "__main__":
    main()
