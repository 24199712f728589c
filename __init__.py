"""ComfyUI-LinFusion: ComfyUI's entry point. Registers the pack's nodes and nothing else."""

# ComfyUI imports this folder as a package. pytest also imports this file while collecting the
# tests below it, as a plain module when the checkout's folder name is not a Python name
# (e.g. "ComfyUI-LinFusion"): there is nothing to register then.
if __package__:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
