"""ComfyUI nodes of the pack. Imported only inside the ComfyUI host (see the top-level __init__.py)."""
from .codec import VAESuiteAsymInpaintDecode, VAESuiteDecodeTiled, VAESuiteEncode
from .loader import VAESuiteLoader
from .preview import TAESDPreview

NODE_CLASS_MAPPINGS: dict = {
    "VAESuiteLoader": VAESuiteLoader,
    "VAESuiteEncode": VAESuiteEncode,
    "VAESuiteDecodeTiled": VAESuiteDecodeTiled,
    "VAESuiteAsymInpaintDecode": VAESuiteAsymInpaintDecode,
    "VAESuiteTAESDPreview": TAESDPreview,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "VAESuiteLoader": "Load VAE (VAE Suite)",
    "VAESuiteEncode": "VAE Encode (VAE Suite)",
    "VAESuiteDecodeTiled": "VAE Decode Tiled (VAE Suite)",
    "VAESuiteAsymInpaintDecode": "Asym Inpaint Decode (VAE Suite)",
    "VAESuiteTAESDPreview": "TAESD Preview (VAE Suite)",
}

try:  # the HTTP route for the tile-settings widget; needs the running server
    from . import routes  # noqa: F401
except ImportError:  # outside the host
    pass
