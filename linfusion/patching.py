"""Matching LinFusion weights to a UNet's self-attention layers and building the replacements.

Pure PyTorch: works on any module tree whose self-attention layers are named `...attn1` in
the original (LDM) layout, which is ComfyUI's. The host decides how to swap the modules in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .attention import LinFusionAttention
from .families import FAMILIES, Family, ModuleSpec, diffusers_to_ldm, supported_families_text
from .weights import LinFusionWeights


class IncompatibleModelError(ValueError):
    """The model is not one LinFusion weights exist for, or the weights are for another family."""


@dataclass(frozen=True)
class Replacement:
    path: str  # module path inside the UNet, e.g. "input_blocks.1.1.transformer_blocks.0.attn1"
    index: int  # layer index in the weights
    spec: ModuleSpec  # with the heads resolved


def self_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """UNet path -> self-attention module, for every `attn1` that has q/k/v projections."""
    return {
        name: m
        for name, m in unet.named_modules()
        if name.endswith(".attn1") and all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "to_out"))
    }


def attention_levels(unet: nn.Module, paths) -> dict[str, int | None]:
    """Downsampling level (0: the latent's own size) of each layer at `paths` of an LDM UNet
    (input_blocks, middle_block, output_blocks): a Downsample block lowers the level of the
    blocks after it, an Upsample at the end of an output block raises it. None for a path
    outside that layout."""
    starts: dict[str, int] = {}
    level = 0
    for i, block in enumerate(getattr(unet, "input_blocks", None) or []):
        starts[f"input_blocks.{i}."] = level
        level += any(type(m).__name__ == "Downsample" for m in block.children())
    if getattr(unet, "middle_block", None) is not None:
        starts["middle_block."] = level
    for i, block in enumerate(getattr(unet, "output_blocks", None) or []):
        starts[f"output_blocks.{i}."] = level
        level -= any(type(m).__name__ == "Upsample" for m in block.children())
    return {p: next((lv for prefix, lv in starts.items() if p.startswith(prefix)), None) for p in paths}


def _layer_dim_heads(m: nn.Module) -> tuple[int, int | None]:
    dim = m.to_q.weight.shape[1]
    heads = getattr(m, "heads", None)
    return int(dim), (int(heads) if heads is not None else None)


def model_family(unet: nn.Module) -> Family | None:
    """The family whose self-attention layout the UNet has: the same layer paths and the
    family's heads rule (8 heads for SD1.x, width/64 for SD2.x and SDXL). Widths are not
    compared, so small test models with the real layout are recognised too; the weights'
    widths are checked against the model's layer by layer in `plan_replacements`."""
    layers = self_attention_layers(unet)
    for fam in FAMILIES.values():
        if set(layers) != {diffusers_to_ldm(s.name) for s in fam.modules()}:
            continue
        dh = [_layer_dim_heads(m) for m in layers.values()]
        if all(h is None or h == fam.heads(d) for d, h in dh):
            return fam
    return None


def describe_model(unet: nn.Module) -> str:
    layers = self_attention_layers(unet)
    if not layers:
        return "a model without SD-style UNet self-attention layers (attn1)"
    fam = model_family(unet)
    dims = sorted({_layer_dim_heads(m)[0] for m in layers.values()})
    name = fam.label if fam else "an unsupported UNet"
    return f"{name} ({len(layers)} self-attention layers of widths {dims})"


def plan_replacements(weights: LinFusionWeights, unet: nn.Module) -> list[Replacement]:
    """Pair every weights layer with the UNet layer it replaces; every attn1 must be covered.

    Raises IncompatibleModelError naming what was found and what would fit.
    """
    layers = self_attention_layers(unet)
    fam = model_family(unet)
    hint = (f"Use the LinFusion weights for {fam.label}: {fam.repo_id}." if fam else
            f"LinFusion weights exist for: {supported_families_text()}.")

    def mismatch(difference: str) -> IncompatibleModelError:
        return IncompatibleModelError(
            f"LinFusion weights {weights.source or ''} are for {weights.describe()}, but the model is "
            f"{describe_model(unet)}: {difference}. {hint}"
        )

    if not layers:
        raise IncompatibleModelError(
            f"LinFusion cannot patch this model: it is {describe_model(unet)} (SD3, Flux, video and other "
            f"transformer models have none). LinFusion weights exist for: {supported_families_text()}."
        )
    if len(weights.modules) != len(layers):
        raise mismatch(f"the weights have {len(weights.modules)} layers, the model {len(layers)}")
    plan = []
    paths = []
    for spec in weights.modules:
        try:
            paths.append(diffusers_to_ldm(spec.name))
        except ValueError:
            raise mismatch(f"the weights' layer {spec.name!r} is not a UNet self-attention layer") from None
    if set(paths) != set(layers):
        missing = sorted(set(layers) - set(paths))
        raise mismatch(f"the model's layer {missing[0]} has no weights ({len(missing)} such layers)")
    for i, (spec, path) in enumerate(zip(weights.modules, paths)):
        dim, heads = _layer_dim_heads(layers[path])
        if spec.dim != dim:
            raise mismatch(f"layer {path} is {dim} wide in the model, {spec.dim} in the weights")
        if spec.heads is not None and heads is not None and spec.heads != heads:
            raise mismatch(f"layer {path} has {heads} heads in the model, {spec.heads} in the weights "
                           "(SD1.x uses 8 heads everywhere, SD2.x and SDXL one per 64 channels)")
        h = spec.heads if spec.heads is not None else heads
        if h is None:
            raise IncompatibleModelError(f"{path}: the weights have no config and the layer does not say its heads: "
                                         "put the config.json of the weights beside the file")
        plan.append(Replacement(path, i, ModuleSpec(spec.name, spec.dim, h, spec.mid_dim)))
    return plan


def operations_like(unet: nn.Module, path: str) -> SimpleNamespace:
    """Linear/LayerNorm classes of the kind the UNet builds the layer at `path` from.

    The replacement then behaves like the host's own layers (ComfyUI's layer classes add
    weight casting and partial loading). Linear comes from the layer's own `to_q`; LayerNorm
    from the first LayerNorm of the enclosing transformer block (`norm1`), else torch.nn.
    """
    attn = unet.get_submodule(path)
    parent = unet.get_submodule(path.rsplit(".", 1)[0]) if "." in path else unet
    norm = next((type(m) for m in parent.children() if isinstance(m, nn.LayerNorm)), nn.LayerNorm)
    return SimpleNamespace(Linear=type(attn.to_q), LayerNorm=norm)


def build_replacements(
    weights: LinFusionWeights,
    plan: list[Replacement],
    originals: dict[str, nn.Module],
    *,
    operations_for: Callable[[str], Any] = lambda path: nn,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = "cpu",
    softmax_max_tokens: int = 0,
    layer_class: type[LinFusionAttention] = LinFusionAttention,
) -> dict[str, LinFusionAttention]:
    """path -> a LinFusionAttention loaded with its weights.

    `operations_for(path)` gives the Linear/LayerNorm classes for each layer (see
    `operations_like`). With softmax_max_tokens > 0 (hybrid), each layer keeps the original module (from
    `originals`) for inputs of at most that many tokens. `layer_class`: LinFusionAttention or a
    host's subclass of it.
    """
    out = {}
    for r in plan:
        with torch.device("meta"):
            layer = layer_class(r.spec.dim, r.spec.heads, r.spec.mid_dim, operations=operations_for(r.path),
                                dtype=dtype)
        state = {k: v.to(dtype=dtype) if dtype is not None else v for k, v in weights.module_state(r.index).items()}
        layer = layer.to_empty(device=device)
        layer.load_state_dict(state, strict=True, assign=False)
        if softmax_max_tokens > 0:
            layer.softmax_attn = originals[r.path]
            layer.softmax_max_tokens = int(softmax_max_tokens)
        out[r.path] = layer.eval().requires_grad_(False)
    return out
