"""comfyui-vae-suite: VAE nodes for ComfyUI backed by the self-contained vae_core engine.

ComfyUI imports this file as a package from custom_nodes/; everything inside uses relative imports
(ComfyUI has its own top-level ``nodes`` module).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
