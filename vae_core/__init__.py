"""vae_core: the VAE families ComfyUI users meet, as diffusers defines them, in plain torch (no diffusers, no ComfyUI).

    from vae_core import load_vae
    vae = load_vae("sdxl_vae.safetensors")          # family and variant detected
    z = vae.encode(images)                          # [B,3,H,W] in [-1,1] -> raw latents
    images = vae.decode(z)
"""
from .errors import VAEError, VAEInterrupted
from .loading import load_vae
from .registry import FAMILIES
from .vae import VAE

__all__ = ["load_vae", "VAE", "VAEError", "VAEInterrupted", "FAMILIES"]
__version__ = "0.1.0"
