"""Builds the UNet in a band-parallel worker process (nodes/multigpu.py's extra devices).

Loaded by file path inside the worker (linfusion.parallel.serve), so it has no relative
imports: it puts the pack root on sys.path and imports ComfyUI and the pack's `linfusion`.
"""

from __future__ import annotations

import sys

import torch


def build_unet(payload: dict, device: torch.device) -> torch.nn.Module:
    """ComfyUI's UNetModel from `payload` (unet_config, LinFusion layer list, state dict) on `device`."""
    if payload["pack_root"] not in sys.path:
        sys.path.append(payload["pack_root"])  # last: the pack's `nodes` must not shadow ComfyUI's
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    import linfusion

    with torch.device("meta"):
        unet = UNetModel(**payload["unet_config"], operations=comfy.ops.disable_weight_init)
        for path, dim, heads, mid, softmax_max_tokens in payload["layers"]:
            layer = linfusion.LinFusionAttention(dim, heads, mid)
            if softmax_max_tokens:
                layer.softmax_attn = unet.get_submodule(path)
                layer.softmax_max_tokens = softmax_max_tokens
            unet.set_submodule(path, layer)
    unet.load_state_dict(payload["state"], strict=True, assign=True)
    return unet.to(device).eval().requires_grad_(False)
