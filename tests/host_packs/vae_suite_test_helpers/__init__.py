"""Test-only ComfyUI nodes, loaded by tests/comfy_host.py next to the pack (never shipped in the pack itself).

``VAESuiteTestZeroConditioning`` gives a KSampler the CONDITIONING it needs without a text encoder: zero token
embeddings of the width the test's diffusion model expects (768 for an SD1.x UNet).
"""
import torch


class ZeroConditioning:
    CATEGORY = "testing"
    FUNCTION = "make"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 77, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 768, "min": 1, "max": 8192})}}

    def make(self, tokens, width):
        return ([[torch.zeros(1, tokens, width), {}]],)


NODE_CLASS_MAPPINGS = {"VAESuiteTestZeroConditioning": ZeroConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"VAESuiteTestZeroConditioning": "Zero Conditioning (VAE Suite tests)"}
