"""The weights a Multi-GPU worker gets (nodes/multigpu.py): the UNet's state dict as ComfyUI
computes with it, every weight patch (e.g. a LoRA) applied however the model was loaded, and the
key that tells when the workers' copy is out of date."""

from __future__ import annotations

import comfy.float
import comfy.lora
import comfy.model_patcher
import comfy.utils
import torch

from ..linfusion import LinFusionAttention
from ..linfusion.parallel import BandParallelError
from .loaders import UNET_PREFIX


def _weight_patches(patcher) -> tuple[dict, dict]:
    """(patches, unpatched weights) of the UNet's keys in `patcher` (None: no patcher): its weight
    patches (LoRA and the like) by UNet state-dict key, and the original weights of the keys whose
    live tensor holds a patch (ModelPatcher.backup: patch_weight_to_device records the original
    there before it writes the patched weight)."""
    if patcher is None:
        return {}, {}
    n = len(UNET_PREFIX)
    patches = {k[n:]: v for k, v in patcher.patches.items() if k.startswith(UNET_PREFIX) and v}
    originals = {k[n:]: b.weight for k, b in patcher.backup.items() if k.startswith(UNET_PREFIX)}
    return patches, originals


def _sampled_values(tensors) -> bytes:
    """Eight values spread over each tensor, as bytes (part of a change detector, not a checksum):
    gathered per device and dtype, so a UNet call pays a few copies to the CPU, not one per tensor."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            flat = t.detach().reshape(-1)
            groups.setdefault((flat.device, flat.dtype), []).append(flat[::max(1, flat.numel() // 8)][:8])
    return b"".join(torch.cat(v).to("cpu", torch.float64).numpy().tobytes() for v in groups.values())


def _patch_identity(patch: tuple) -> tuple:
    """A weight patch (strength, data, strength_model, offset, function) as a hashable tuple: its
    numbers as they are, its data and function by identity."""
    return tuple(e if isinstance(e, (int, float, str, type(None))) else id(e) for e in patch)


def weights_key(unet: torch.nn.Module, patcher) -> tuple:
    """What the workers' copy of the UNet depends on: the UNet object, its LinFusion layers, the
    patcher's weight patches (their set's uuid, and each patch's strengths and data identity) and
    values sampled from every unpatched weight; it changes when any of them does (a LoRA added,
    changed or removed, other LinFusion weights, another model)."""
    patches, originals = _weight_patches(patcher)
    state = unet.state_dict()
    base = {k: originals.get(k, v) if k in patches else v for k, v in state.items()}
    layers = tuple((n, id(m)) for n, m in unet.named_modules() if isinstance(m, LinFusionAttention))
    summary = tuple((k, tuple(_patch_identity(p) for p in v)) for k, v in sorted(patches.items()))
    values = _sampled_values(base.values())
    shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in base.items())
    return id(unet), getattr(patcher, "patches_uuid", None), summary, layers, shapes, values


def effective_weights(unet: torch.nn.Module, patcher) -> dict[str, torch.Tensor]:
    """The UNet's state dict as ComfyUI computes with it, on the CPU: every weight patch applied.

    A fully loaded model holds its patches in its tensors; a partially loaded one (legacy low-VRAM
    loads: LowVramPatch in a layer's weight_function) or a Dynamic VRAM one (newer ComfyUI: the
    patch applied in each op's cast) holds the original, and the patch lives only in the cast. So
    each patched key is computed here from the original weight as ModelPatcher.patch_weight_to_device
    computes it (float32 copy on the load device, comfy.lora.calculate_weight, rounded to the
    weight's dtype), whatever the load did; the layer's per-op weight wrappers follow."""
    patches, originals = _weight_patches(patcher)
    state = unet.state_dict()
    unknown = sorted(set(patches) - set(state))
    if unknown:
        raise BandParallelError(f"LinFusion Multi-GPU: {len(unknown)} weight patches name no UNet weight (e.g. "
                                f"{unknown[0]!r}); remove the node adding them, or the Multi-GPU node")
    seed = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed
    wrappers = {k[len(UNET_PREFIX):]: v for k, v in getattr(patcher, "weight_wrapper_patches", {}).items()
                if k.startswith(UNET_PREFIX)}
    out = {}
    for k, v in state.items():
        if k in patches:
            original = originals.get(k, v)
            key = UNET_PREFIX + k
            w = original.detach().to(patcher.load_device, torch.float32, copy=True)
            w = comfy.lora.calculate_weight(patches[k], w, key)
            v = comfy.float.stochastic_rounding(w, original.dtype, seed=seed(key))
        for f in wrappers.get(k, ()):
            v = f(v)
        out[k] = v.detach().to("cpu", copy=True)
    return out
