"""ComfyUI nodes of the pack. Imported only inside the ComfyUI host (see the top-level __init__.py)."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
