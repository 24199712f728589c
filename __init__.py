"""ComfyUI-LinFusion: ComfyUI's entry point. Registers the pack's nodes and nothing else; on a
ComfyUI too old for the pack, it logs one line saying so and registers nothing."""

from __future__ import annotations

import importlib.util
import logging
import re

# The oldest ComfyUI this pack's tests pass on (the version matrix: scripts/dev_setup.sh). It is
# also `requires-comfyui` in pyproject.toml (tests/test_compat.py checks that both agree).
MIN_COMFYUI = (0, 3, 52)


def comfyui_too_old() -> str | None:
    """None when the running ComfyUI can host the pack, else how to name the version it has.

    The node API (comfy_api.latest) appeared in ComfyUI 0.3.48; a ComfyUI without
    comfyui_version.py predates it too."""
    try:
        from comfyui_version import __version__ as have
    except ImportError:
        have = None
    nums = re.match(r"(\d+)\.(\d+)\.(\d+)", have or "")
    if nums and tuple(int(n) for n in nums.groups()) < MIN_COMFYUI:
        return have
    try:
        api = importlib.util.find_spec("comfy_api.latest")
    except ImportError:  # no comfy_api package at all
        api = None
    if api is None:
        return have or "an older one (no comfyui_version, no comfy_api.latest)"
    return None


# ComfyUI imports this folder as a package. pytest also imports this file while collecting the
# tests below it, as a plain module when the checkout's folder name is not a Python name
# (e.g. "ComfyUI-LinFusion"): there is nothing to register then.
if __package__:
    _have = comfyui_too_old()
    if _have is not None:
        logging.getLogger("ComfyUI-LinFusion").error(
            "ComfyUI-LinFusion needs ComfyUI >= %s; you have %s: update ComfyUI",
            ".".join(map(str, MIN_COMFYUI)), _have)
        # Loaded, with nothing to register: ComfyUI goes on without a traceback or a warning.
        NODE_CLASS_MAPPINGS: dict = {}
        __all__ = ["NODE_CLASS_MAPPINGS"]
    else:
        from .nodes import comfy_entrypoint

        __all__ = ["comfy_entrypoint"]
