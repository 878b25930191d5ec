"""ComfyUI loads this folder as a custom node package (ComfyUI/custom_nodes/remote-vae, copied or linked)."""

from .remote_vae_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
