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

    # device by keyword (UNetModel(..., device=None, operations=ops) in ComfyUI 0.3.52 to 0.38): the
    # layers are built on the meta device, without memory, whatever a ComfyUI does with the default
    # device; the LinFusion layers below take it from the context.
    config = {k: v for k, v in payload["unet_config"].items() if k not in ("device", "operations")}
    with torch.device("meta"):
        unet = UNetModel(**config, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)
        for path, dim, heads, mid, softmax_max_tokens in payload["layers"]:
            layer = linfusion.LinFusionAttention(dim, heads, mid)
            if softmax_max_tokens:
                layer.softmax_attn = unet.get_submodule(path)
                layer.softmax_max_tokens = softmax_max_tokens
            unet.set_submodule(path, layer)
    unet.load_state_dict(payload["state"], strict=True, assign=True)
    return unet.to(device).eval().requires_grad_(False)
