"""ComfyUI-LinFusion: ComfyUI's entry point. Registers the pack's nodes and nothing else."""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
