#!/usr/bin/env python3
"""Writes example_workflows/: one UI workflow per template (the file name is the title ComfyUI's template browser
shows) and its API-format twin in example_workflows/api/, from the specs below; with --thumbnails it also runs
every twin on a running ComfyUI and saves the picture it made as the template's thumbnail (<title>.jpg next to
the workflow, where the frontend looks for it).

    python scripts/make_examples.py                                   # workflows only
    python scripts/make_examples.py --thumbnails --url http://127.0.0.1:8188   # + thumbnails (scripts/start.sh running)

Each stand-in example carries a Note: with the random-weight stand-ins of scripts/make_demo_models.py it draws
noise until the real file is in place.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
PACK = "comfyui-vae-suite"
OUR = {"VAESuiteLoader", "VAESuiteEncode", "VAESuiteDecodeTiled", "VAESuiteAsymInpaintDecode", "VAESuiteTAESDPreview"}

SD_VAE = "vae-ft-mse-840000-ema-pruned.safetensors"
FLUX2_VAE = "flux2-vae.safetensors"
LOADER = {"hf_source": "", "family": "auto", "variant": "auto", "dtype": "auto"}


def standin_note(what: str) -> str:
    return ("Stand-in weights: until the real file is in place this example draws noise.\n\n" + what
            + "\n\nscripts/start.sh fetches the real files when the Hugging Face Hub is reachable; otherwise it "
              "writes random-weight stand-ins under these names (in .cache/comfy-base/models/). Drop the real "
              "files in with the same names and run again.")


# A node: (id, type, pos, widgets {input name: value} in the node's widget order, links {input name: (id, slot)},
# outputs [(name, type)], extra UI-only widget values appended after a named widget).
def node(nid, kind, pos, widgets=None, links=None, outputs=(), size=(320, 200), after=None):
    widgets = dict(widgets or {})
    if kind == "VAESuiteDecodeTiled":  # its last widget, the frontend shows it for every VAE
        widgets.setdefault("temporal_size", 4)
    return {"id": nid, "type": kind, "pos": pos, "widgets": widgets, "links": dict(links or {}),
            "outputs": list(outputs), "size": list(size), "after": dict(after or {})}


def note(nid, pos, text, size=(380, 220)):
    return {"id": nid, "type": "Note", "pos": pos, "text": text, "size": list(size)}


def load_image(nid, pos, image="example.png"):
    return node(nid, "LoadImage", pos, {"image": image}, outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                size=(300, 320), after={"image": "image"})


def save(nid, pos, src, prefix):
    return node(nid, "SaveImage", pos, {"filename_prefix": prefix}, {"images": src}, size=(360, 380))


def vae_loader(nid, pos, name):
    return node(nid, "VAESuiteLoader", pos, {"vae_name": name, **LOADER}, outputs=[("VAE", "VAE")], size=(340, 180))


def tiles(mode, size=512, overlap=64):
    return {"tiling": mode, "tile_size": size, "overlap": overlap}


TEMPLATES = {
    "Encode and decode 1536x1024 in 512 px tiles": {
        "description": "A photo scaled to 1536x1024, encoded and decoded by the real TAEF2 in 3x2 tiles of 512 px, "
                       "exactly as one pass would.",
        "nodes": [
            load_image(1, [40, 120]),
            node(2, "ImageScale", [380, 120], {"upscale_method": "bicubic", "width": 1536, "height": 1024,
                                               "crop": "center"}, {"image": (1, 0)}, [("IMAGE", "IMAGE")],
                 size=(300, 160)),
            vae_loader(3, [380, 330], "vae_approx/taef2"),
            node(4, "VAESuiteEncode", [740, 120], {"latent": "mean", "seed": 0, **tiles("always")},
                 {"pixels": (2, 0), "vae": (3, 0)}, [("LATENT", "LATENT")], size=(340, 330), after={"seed": "fixed"}),
            node(5, "VAESuiteDecodeTiled", [1120, 120], tiles("always"), {"samples": (4, 0), "vae": (3, 0)},
                 [("IMAGE", "IMAGE")], size=(340, 290)),
            save(6, [1500, 120], (5, 0), "vae_suite/tiled_1536x1024"),
            note(7, [40, 520], "Real weights: TAEF2 (taef2_encoder.pth + taef2_decoder.pth in models/vae_approx, "
                               "listed as vae_approx/taef2).\n\nBoth VAE Suite nodes tile at 512 px: the widget under "
                               "their inputs draws the 3x2 grid and the memory estimate; the output equals an untiled "
                               "pass (no seams)."),
        ],
    },
    "Load VAE into the core VAE nodes": {
        "description": "The VAE Suite loader's VAE in ComfyUI's own VAE Encode and VAE Decode.",
        "nodes": [
            load_image(1, [40, 120]),
            vae_loader(2, [40, 480], SD_VAE),
            node(3, "VAEEncode", [420, 120], {}, {"pixels": (1, 0), "vae": (2, 0)}, [("LATENT", "LATENT")],
                 size=(240, 100)),
            node(4, "VAEDecode", [700, 120], {}, {"samples": (3, 0), "vae": (2, 0)}, [("IMAGE", "IMAGE")],
                 size=(240, 100)),
            save(5, [980, 120], (4, 0), "vae_suite/core_nodes"),
            note(6, [420, 300], standin_note(f"models/vae/{SD_VAE} (stabilityai/sd-vae-ft-mse-original).")),
        ],
    },
    "Decode a checkpoint VAE in exact tiles": {
        "description": "ComfyUI's own VAE Loader, decoded by VAE Decode Tiled (VAE Suite) in 2x2 tiles without seams.",
        "nodes": [
            load_image(1, [40, 120]),
            node(2, "VAELoader", [40, 480], {"vae_name": SD_VAE}, outputs=[("VAE", "VAE")], size=(340, 90)),
            node(3, "VAEEncode", [420, 120], {}, {"pixels": (1, 0), "vae": (2, 0)}, [("LATENT", "LATENT")],
                 size=(240, 100)),
            node(4, "VAESuiteDecodeTiled", [700, 120], tiles("always", 256, 32), {"samples": (3, 0), "vae": (2, 0)},
                 [("IMAGE", "IMAGE")], size=(340, 290)),
            save(5, [1080, 120], (4, 0), "vae_suite/core_vae_tiled"),
            note(6, [420, 460], standin_note(f"models/vae/{SD_VAE} (stabilityai/sd-vae-ft-mse-original).")),
        ],
    },
    "Inpaint decode with the asymmetric VAE": {
        "description": "Asym Inpaint Decode (VAE Suite): the masked region decoded, the rest keeps the original's detail.",
        "nodes": [
            load_image(1, [40, 120], "example_inpaint.png"),
            vae_loader(2, [40, 480], "asymmetric-autoencoder-kl-x-1-5/"),
            node(3, "VAEEncodeForInpaint", [420, 120], {"grow_mask_by": 6},
                 {"pixels": (1, 0), "vae": (2, 0), "mask": (1, 1)}, [("LATENT", "LATENT")], size=(300, 140)),
            node(4, "VAESuiteAsymInpaintDecode", [760, 120], tiles("auto"),
                 {"samples": (3, 0), "vae": (2, 0), "image": (1, 0), "mask": (1, 1)}, [("IMAGE", "IMAGE")],
                 size=(340, 330)),
            save(5, [1140, 120], (4, 0), "vae_suite/asym_inpaint"),
            note(6, [420, 480], standin_note("models/vae/asymmetric-autoencoder-kl-x-1-5/ (the diffusers folder "
                                             "cross-attention/asymmetric-autoencoder-kl-x-1-5: config.json + "
                                             "diffusion_pytorch_model.safetensors)."), size=(380, 260)),
        ],
    },
    "Round-trip a photo through TAEF2": {
        "description": "The real TAEF2 tiny autoencoder encodes and decodes a photo in one pass.",
        "nodes": [
            load_image(1, [40, 120]),
            vae_loader(2, [380, 330], "vae_approx/taef2"),
            node(3, "VAESuiteEncode", [740, 120], {"latent": "mean", "seed": 0, **tiles("never")},
                 {"pixels": (1, 0), "vae": (2, 0)}, [("LATENT", "LATENT")], size=(340, 330), after={"seed": "fixed"}),
            node(4, "VAESuiteDecodeTiled", [1120, 120], tiles("never"), {"samples": (3, 0), "vae": (2, 0)},
                 [("IMAGE", "IMAGE")], size=(340, 290)),
            save(5, [1500, 120], (4, 0), "vae_suite/taef2"),
        ],
    },
    "Round-trip a photo through the FLUX.2 VAE": {
        "description": "The FLUX.2 VAE encodes a photo into FLUX.2's 128-channel LATENT and decodes it in exact tiles.",
        "nodes": [
            load_image(1, [40, 120]),
            vae_loader(2, [40, 480], FLUX2_VAE),
            node(3, "VAESuiteEncode", [420, 120], {"latent": "mean", "seed": 0, **tiles("auto")},
                 {"pixels": (1, 0), "vae": (2, 0)}, [("LATENT", "LATENT")], size=(340, 330), after={"seed": "fixed"}),
            node(4, "VAESuiteDecodeTiled", [800, 120], tiles("always", 256, 32), {"samples": (3, 0), "vae": (2, 0)},
                 [("IMAGE", "IMAGE")], size=(340, 290)),
            save(5, [1180, 120], (4, 0), "vae_suite/flux2"),
            note(6, [420, 500], standin_note(
                f"models/vae/{FLUX2_VAE}: the FLUX.2 VAE (Comfy-Org's flux2-vae.safetensors, or Black Forest Labs' "
                "ae.safetensors from FLUX.2-dev/klein under this name). Its LATENT is what FLUX.2 samplers and core "
                "VAE Decode use: [B,128,H/16,W/16], patchified and normalised. It is not fetched (gated), so without "
                "it this example runs on a random stand-in of the right shapes."), size=(380, 300)),
        ],
    },
    "Qwen-Image VAE round trip of a photo": {
        "description": "The Qwen-Image / Wan 2.1 VAE encodes a photo to a one-frame video latent [1,16,1,h,w] and "
                       "decodes it, as Qwen-Image workflows do.",
        "nodes": [
            load_image(1, [40, 120]),
            node(2, "ImageScale", [380, 120], {"upscale_method": "bicubic", "width": 256, "height": 256,
                                               "crop": "center"}, {"image": (1, 0)}, [("IMAGE", "IMAGE")],
                 size=(300, 160)),
            vae_loader(3, [380, 330], "qwen_image_vae.safetensors"),
            node(4, "VAESuiteEncode", [740, 120], {"latent": "mean", "seed": 0, **tiles("auto")},
                 {"pixels": (2, 0), "vae": (3, 0)}, [("LATENT", "LATENT")], size=(340, 330), after={"seed": "fixed"}),
            node(5, "VAESuiteDecodeTiled", [1120, 120], {**tiles("auto"), "temporal_size": 4},
                 {"samples": (4, 0), "vae": (3, 0)}, [("IMAGE", "IMAGE")], size=(340, 320)),
            save(6, [1500, 120], (5, 0), "vae_suite/qwen_image_roundtrip"),
            note(7, [40, 520], standin_note("models/vae/qwen_image_vae.safetensors (Comfy-Org/Qwen-Image_ComfyUI, "
                                            "split_files/vae). The image is scaled to 256 px so the CPU finishes "
                                            "quickly: raise it to 1024 for real use; tiling 'auto' tiles when a "
                                            "pass would not fit."), size=(420, 260)),
        ],
    },
    "Wan 2.1 VAE decode of a short video in tiles and chunks": {
        "description": "Five frames through the Wan 2.1 VAE to a [1,16,2,h,w] latent, decoded in 128 px tiles and "
                       "4-frame causal chunks: equal to the untiled decode.",
        "nodes": [
            load_image(1, [40, 120]),
            node(2, "ImageScale", [380, 120], {"upscale_method": "bicubic", "width": 160, "height": 128,
                                               "crop": "center"}, {"image": (1, 0)}, [("IMAGE", "IMAGE")],
                 size=(300, 160)),
            node(3, "RepeatImageBatch", [380, 330], {"amount": 5}, {"image": (2, 0)}, [("IMAGE", "IMAGE")],
                 size=(300, 90)),
            vae_loader(4, [40, 480], "wan_2.1_vae.safetensors"),
            node(5, "VAESuiteEncode", [740, 120], {"latent": "mean", "seed": 0, **tiles("auto")},
                 {"pixels": (3, 0), "vae": (4, 0)}, [("LATENT", "LATENT")], size=(340, 330), after={"seed": "fixed"}),
            node(6, "VAESuiteDecodeTiled", [1120, 120], {**tiles("always", 128, 0), "temporal_size": 4},
                 {"samples": (5, 0), "vae": (4, 0)}, [("IMAGE", "IMAGE")], size=(340, 320)),
            save(7, [1500, 120], (6, 0), "vae_suite/wan_video"),
            note(8, [420, 520], standin_note("models/vae/wan_2.1_vae.safetensors (Comfy-Org/Wan_2.1_ComfyUI_repackaged, "
                                             "split_files/vae). The frames repeat one photo; with a sampler, connect "
                                             "its LATENT to VAE Decode Tiled instead."), size=(420, 260)),
        ],
    },
    "Live TAESD previews while sampling": {
        "description": "TAESD Preview (VAE Suite) between the model and KSampler: a preview frame on the sampler at "
                       "every step.",
        "nodes": [
            node(1, "UNETLoader", [40, 120], {"unet_name": "vae_suite_demo_unet.safetensors", "weight_dtype": "default"},
                 outputs=[("MODEL", "MODEL")], size=(340, 90)),
            vae_loader(2, [40, 260], "taesd/"),
            node(3, "VAESuiteTAESDPreview", [420, 120], {"max_size": 512, "max_rate": 0.0},
                 {"model": (1, 0), "vae": (2, 0)}, [("MODEL", "MODEL")], size=(320, 130)),
            node(4, "LotusConditioning", [420, 300], {}, outputs=[("conditioning", "CONDITIONING")], size=(240, 50)),
            node(5, "EmptyLatentImage", [420, 400], {"width": 512, "height": 512, "batch_size": 1},
                 outputs=[("LATENT", "LATENT")], size=(300, 110)),
            node(6, "KSampler", [780, 120], {"seed": 1, "steps": 8, "cfg": 1.0, "sampler_name": "euler",
                                             "scheduler": "normal", "denoise": 1.0},
                 {"model": (3, 0), "positive": (4, 0), "negative": (4, 0), "latent_image": (5, 0)},
                 [("LATENT", "LATENT")], size=(320, 480), after={"seed": "fixed"}),
            node(7, "VAESuiteDecodeTiled", [1140, 120], tiles("auto"), {"samples": (6, 0), "vae": (2, 0)},
                 [("IMAGE", "IMAGE")], size=(340, 290)),
            save(8, [1520, 120], (7, 0), "vae_suite/taesd_preview"),
            note(9, [40, 560], "Stand-in weights: this example draws noise, by design of its model. The UNet "
                               "models/diffusion_models/vae_suite_demo_unet.safetensors is a seeded random-weight "
                               "SD2-shaped UNet (25.8 M parameters) that ComfyUI samples on the CPU in seconds, so "
                               "you see a preview frame arrive on KSampler at every step. For real pictures use your "
                               "own checkpoint (Load Checkpoint -> model, CLIP Text Encode -> positive/negative) and "
                               "keep TAESD Preview between the model and the sampler.\n\nThe previews and the final "
                               "decode use models/vae/taesd/ (madebyollin/taesd, fetched by scripts/start.sh when "
                               "online; a random stand-in otherwise).", size=(700, 200)),
        ],
    },
}


def build(spec: dict, title: str) -> tuple[dict, dict]:
    """-> (UI workflow, API prompt)."""
    nodes = spec["nodes"]
    by_id = {n["id"]: n for n in nodes}
    links = []  # [link id, from id, from slot, to id, to slot, type]
    ui_nodes = []
    api = {}
    for order, n in enumerate(nodes):
        if n["type"] == "Note":
            ui_nodes.append({"id": n["id"], "type": "Note", "pos": n["pos"], "size": n["size"], "flags": {},
                             "order": order, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                             "widgets_values": [n["text"]], "color": "#432", "bgcolor": "#653"})
            continue
        inputs = []
        for name, (src, slot) in n["links"].items():
            kind = by_id[src]["outputs"][slot][1]
            links.append([len(links) + 1, src, slot, n["id"], len(inputs), kind])
            inputs.append({"name": name, "type": kind, "link": links[-1][0]})
        values = []
        for name, v in n["widgets"].items():
            values.append(v)
            if name in n["after"]:
                values.append(n["after"][name])
        props = {"Node name for S&R": n["type"]}
        if n["type"] in OUR:
            props["cnr_id"] = PACK
        ui_nodes.append({"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n["size"], "flags": {},
                         "order": order, "mode": 0, "inputs": inputs,
                         "outputs": [{"name": o, "type": t, "slot_index": i, "links": []}
                                     for i, (o, t) in enumerate(n["outputs"])],
                         "properties": props, "widgets_values": values})
        api[str(n["id"])] = {"class_type": n["type"], "inputs": {
            **n["widgets"], **{k: [str(s), i] for k, (s, i) in n["links"].items()}}}
    for lid, src, slot, *_ in links:
        out = next(u for u in ui_nodes if u["id"] == src)["outputs"][slot]
        out["links"].append(lid)
    ui = {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links, "groups": [],
          "config": {}, "extra": {"title": title, "description": spec["description"], "ds": {"scale": 0.8,
                                                                                           "offset": [0, 0]}},
          "version": 0.4}
    return ui, api


def write_all() -> None:
    (EXAMPLES / "api").mkdir(parents=True, exist_ok=True)
    keep = set()
    for title, spec in TEMPLATES.items():
        ui, api = build(spec, title)
        for path, data in ((EXAMPLES / f"{title}.json", ui), (EXAMPLES / "api" / f"{title}.json", api)):
            path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
            keep.add(path)
    for stale in [*EXAMPLES.glob("*.json"), *(EXAMPLES / "api").glob("*.json")]:
        if stale not in keep:
            stale.unlink()
            print(f"removed {stale.relative_to(ROOT)}")
    print(f"wrote {len(TEMPLATES)} workflows and their API twins into {EXAMPLES.relative_to(ROOT)}/")


def call(url: str, path: str, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read() if payload is None and path.startswith("/view") else json.load(r)


def thumbnails(url: str, timeout: float) -> None:
    """Run every API twin and save the last image it wrote as <title>.jpg (at most 512 px wide, JPEG)."""
    from PIL import Image

    for title in TEMPLATES:
        prompt = json.loads((EXAMPLES / "api" / f"{title}.json").read_text())
        pid = call(url, "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = call(url, f"/history/{pid}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                break
            time.sleep(0.5)
        else:
            sys.exit(f"{title}: did not finish within {timeout} s")
        entry = h[pid]
        if entry["status"].get("status_str") != "success":
            sys.exit(f"{title}: {entry['status']}")
        refs = [r for o in entry["outputs"].values() for r in o.get("images", []) if r.get("type") == "output"]
        if not refs:
            sys.exit(f"{title}: no output image")
        q = urllib.parse.urlencode({"filename": refs[-1]["filename"], "subfolder": refs[-1].get("subfolder", ""),
                                    "type": "output"})
        img = Image.open(io.BytesIO(call(url, f"/view?{q}"))).convert("RGB")
        img.thumbnail((512, 512))
        img.save(EXAMPLES / f"{title}.jpg", quality=82)
        print(f"thumbnail {title}.jpg {img.size[0]}x{img.size[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thumbnails", action="store_true", help="also run each workflow and save its thumbnail")
    ap.add_argument("--url", default="http://127.0.0.1:8188")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()
    write_all()
    if a.thumbnails:
        thumbnails(a.url, a.timeout)


if __name__ == "__main__":
    main()
