"""TAESD Preview in the real ComfyUI 0.3.75 host: live preview frames over the websocket during sampling.

The server runs with its default preview method (none). The test writes a seeded random-weight SD1.x UNet
(real shapes, so ComfyUI detects it as SD1.x) and a random-weight TAESD decoder (``vae_approx/taesd_decoder``),
then runs real samplers through the websocket API.
"""
from __future__ import annotations

import io
import json
import struct
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_host import collect_ws
from preview_models import sd15_unet_state_dict, taesd_decoder_state_dict

pytestmark = pytest.mark.slow

UNET = "vae_suite_preview_sd15_tiny.safetensors"
STEPS = 4
SIZE = 64  # EmptyLatentImage pixels -> an 8x8 latent -> 64x64 TAESD previews (a CPU shared by many: keep it small)


@pytest.fixture(scope="module")
def host(comfy_host):
    from safetensors.torch import save_file

    models = comfy_host.base / "models"
    if not (models / "diffusion_models" / UNET).exists():
        save_file(sd15_unet_state_dict(seed=0), str(models / "diffusion_models" / UNET))
    save_file(taesd_decoder_state_dict(4, seed=1), str(models / "vae_approx" / "taesd_decoder.safetensors"))
    return comfy_host


def workflow(seed: int, preview: dict | None, sampler: str = "KSampler", size: int = SIZE) -> dict:
    model = ["1", 0]
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}},
        "2": {"class_type": "VAESuiteTestZeroConditioning", "inputs": {"tokens": 77, "width": 768}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"vae_suite_pv_{seed}"}},
    }
    if preview is not None:
        p["4"] = {"class_type": "VAESuiteTAESDPreview", "inputs": {"model": model, **preview}}
        model = ["4", 0]
    if sampler == "KSampler":
        p["5"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0}}
    else:  # SamplerCustom, fed by KSamplerSelect + BasicScheduler
        p["8"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        p["9"] = {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "normal",
                                                             "steps": STEPS, "denoise": 1.0}}
        p["5"] = {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": seed, "cfg": 1.0, "positive": ["2", 0],
            "negative": ["2", 0], "sampler": ["8", 0], "sigmas": ["9", 0], "latent_image": ["3", 0]}}
    return p


def run(host, prompt: dict, metadata_client: bool, texts: bool = False):
    """Queue the prompt on a fresh websocket; returns (json messages, [(event type, metadata, PIL image)]).

    With ``texts``, progress-text frames come too, as (3, node id, text)."""
    client_id = uuid.uuid4().hex
    ws = host.websocket(client_id)
    try:
        if metadata_client:  # what the current frontend negotiates: previews come with their node id
            ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        prompt_id = host.queue(prompt, client_id)
        msgs, frames = collect_ws(ws, prompt_id, timeout=240)
    finally:
        ws.close()
    errors = [m for m in msgs if m["type"] == "execution_error"]
    assert not errors, errors[0]["data"].get("exception_message")
    previews = []
    for frame in frames:
        (event,) = struct.unpack(">I", frame[:4])
        if event == 1:  # PREVIEW_IMAGE: format, then the image
            previews.append((event, None, Image.open(io.BytesIO(frame[8:])).convert("RGB")))
        elif event == 4:  # PREVIEW_IMAGE_WITH_METADATA: json length, json, image
            (n,) = struct.unpack(">I", frame[4:8])
            meta = json.loads(frame[8:8 + n])
            previews.append((event, meta, Image.open(io.BytesIO(frame[8 + n:])).convert("RGB")))
        elif event == 3 and texts:  # TEXT: node id length, node id, text
            (n,) = struct.unpack(">I", frame[4:8])
            previews.append((event, frame[8:8 + n].decode(), frame[8 + n:].decode()))
    return msgs, previews


def saved_latent(host, seed: int) -> torch.Tensor:
    from safetensors.torch import load_file

    files = sorted((host.base / "output").glob(f"**/vae_suite_pv_{seed}_*.latent"))
    assert files, f"SaveLatent wrote nothing for seed {seed}"
    return load_file(str(files[-1]))["latent_tensor"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))  # identical pictures: 120 dB


def expected_last_preview(host, seed: int) -> np.ndarray:
    """The TAESD decode of the prompt's saved (raw) latent, through the server's JPEG (quality 95), in [0, 1].

    Euler's last x0 is the final sample, so the last preview must be this picture: that also checks that the
    preview undid the model's latent scaling exactly once.
    """
    from vae_core import load_vae

    decoder = load_vae(str(host.base / "models" / "vae_approx" / "taesd_decoder.safetensors"), family="tiny",
                       variant="taesd")
    image = decoder.decode(saved_latent(host, seed).float(), tile=False)[0].clamp(-1, 1).add(1).mul(127.5).round()
    buf = io.BytesIO()
    Image.fromarray(image.to(torch.uint8).permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255


def test_ksampler_gets_one_taesd_preview_per_step(host):
    msgs, previews = run(host, workflow(101, {"max_size": 512, "max_rate": 0.0}), metadata_client=True)
    assert len(previews) == STEPS, f"{len(previews)} preview frames for {STEPS} steps"
    for event, meta, image in previews:
        assert event == 4 and meta["node_id"] == "5", (event, meta)  # shown on the KSampler node
        assert meta["image_type"] == "image/jpeg"
        assert image.size == (SIZE, SIZE)
    progress = [m["data"]["value"] for m in msgs if m["type"] == "progress" and m["data"].get("node") == "5"]
    assert progress and max(progress) == STEPS

    got = np.asarray(previews[-1][2], dtype=np.float32) / 255
    assert psnr(got, expected_last_preview(host, 101)) >= 40.0
    first = np.asarray(previews[0][2], dtype=np.float32) / 255
    assert psnr(first, got) < 30.0  # the previews follow x0 step by step, they are not one repeated image


def test_vae_input_decodes_the_previews(host):
    # A decode-only TAESD loaded by the suite's loader, given to the node: the previews go through its VAE.
    prompt = workflow(104, {"max_size": 512, "max_rate": 0.0})
    prompt["6"] = {"class_type": "VAESuiteLoader", "inputs": {
        "vae_name": "vae_approx/taesd_decoder.safetensors", "hf_source": "", "family": "auto", "variant": "auto",
        "dtype": "auto"}}
    prompt["4"]["inputs"]["vae"] = ["6", 0]
    msgs, previews = run(host, prompt, metadata_client=True)
    assert len(previews) == STEPS
    got = np.asarray(previews[-1][2], dtype=np.float32) / 255
    assert got.shape == (SIZE, SIZE, 3)
    assert psnr(got, expected_last_preview(host, 104)) >= 40.0


def test_missing_weights_fall_back_to_latent2rgb_and_say_so(host):
    decoder = host.base / "models" / "vae_approx" / "taesd_decoder.safetensors"
    parked = host.base / "parked_taesd_decoder.safetensors"
    decoder.rename(parked)
    try:
        msgs, previews = run(host, workflow(105, {"max_size": 512, "max_rate": 0.0}), metadata_client=True,
                             texts=True)
    finally:
        parked.rename(decoder)
    texts = [t for t in previews if t[0] == 3]
    images = [t for t in previews if t[0] != 3]
    assert len(images) == STEPS  # sampling ran, with latent2rgb previews (one RGB pixel per latent pixel)
    assert all(image.size == (SIZE // 8, SIZE // 8) for _, _, image in images)
    assert len(texts) == 1, texts  # said once, on the sampler node, naming the files and the folder
    node, text = texts[0][1], texts[0][2]
    assert node == "5" and "taesd_decoder.pth" in text and "vae_approx" in text


def test_no_previews_without_the_node(host):
    msgs, previews = run(host, workflow(102, None), metadata_client=True)
    assert previews == []
    assert any(m["type"] == "progress" and m["data"]["value"] == STEPS for m in msgs)  # it did sample


def test_sampler_custom_size_cap_and_legacy_client(host):
    msgs, previews = run(host, workflow(103, {"max_size": 64, "max_rate": 0.0}, sampler="SamplerCustom", size=128),
                         metadata_client=False)
    assert len(previews) == STEPS
    for event, _, image in previews:
        assert event == 1  # clients without preview metadata get the plain PREVIEW_IMAGE frame
        assert image.size == (64, 64)  # the 16x16 latent was area-downscaled to 8x8 before decoding
