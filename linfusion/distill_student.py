"""The student of a distillation run (linfusion/distill.py): its LinFusion layers, and putting
them in the place of the UNet's attn1 modules while it runs.

`init_student` builds the layers, from released weights or from the UNet's own projections.
`student_in_place` swaps a `_StudentSlot` (which calls a layer and records its output) in at
every attn1 path, optionally with gradient checkpointing of the transformer blocks and
ResBlocks, and always restores the original modules. DistillError, the error of every
distillation module, is defined here, the lowest of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .attention import LinFusionAttention
from .families import ModuleSpec, diffusers_to_ldm
from .forwards import forwards_replaced
from .patching import IncompatibleModelError, build_replacements, describe_model, model_family, plan_replacements
from .weights import LinFusionWeights


class DistillError(ValueError):
    """A distillation run that cannot start or continue; the message says why and what to do."""


def _attn_dim_heads(layer: nn.Module, fallback_heads: Callable[[int], int]) -> tuple[int, int]:
    dim = int(layer.to_q.weight.shape[1])
    heads = getattr(layer, "heads", None)
    return dim, int(heads) if heads is not None else fallback_heads(dim)


def init_student(
    unet: nn.Module, weights: LinFusionWeights | None = None, seed: int = 0
) -> tuple[list[ModuleSpec], list[str], nn.ModuleList]:
    """The LinFusion layers of a student, in the official order: (specs, UNet paths, layers, fp32, CPU).

    With `weights`: loaded from them (checked against the UNet layer by layer). Without: each
    layer copies its attn1's to_q/to_k/to_v/to_out, and the last Linear of to_q_/to_k_ is zero,
    so q = to_q(x) and k = to_k(x) at the start; the rest of to_q_/to_k_ gets torch's default
    initialisation from `seed`.
    """
    fam = model_family(unet)
    if fam is None:
        raise IncompatibleModelError(
            f"cannot distill LinFusion for this model: it is {describe_model(unet)}; distillation supports the "
            "SD1.x, SD2.x and SDXL UNet layouts (every self-attention layer at its usual place)"
        )
    if weights is not None:
        plan = plan_replacements(weights, unet)
        layers = build_replacements(weights, plan, {}, dtype=torch.float32, device="cpu")
        specs = [r.spec for r in plan]
        paths = [r.path for r in plan]
        mods = nn.ModuleList([layers[p] for p in paths])
    else:
        specs, paths, mods = [], [], nn.ModuleList()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for s in fam.modules():
                path = diffusers_to_ldm(s.name)
                attn = unet.get_submodule(path)
                dim, heads = _attn_dim_heads(attn, fam.heads)
                spec = ModuleSpec(s.name, dim, heads, fam.mid_dim(dim))
                layer = LinFusionAttention(dim, heads, spec.mid_dim, dtype=torch.float32, device="cpu")
                with torch.no_grad():
                    for name in ("to_q", "to_k", "to_v"):
                        src = getattr(attn, name)
                        if getattr(src, "bias", None) is not None:
                            raise IncompatibleModelError(f"{path}.{name} has a bias; LinFusion's {name} has none")
                        getattr(layer, name).weight.copy_(src.weight.float())
                    layer.to_out[0].weight.copy_(attn.to_out[0].weight.float())
                    layer.to_out[0].bias.copy_(attn.to_out[0].bias.float())
                    for proj in (layer.to_q_, layer.to_k_):
                        proj[3].weight.zero_()
                        proj[3].bias.zero_()
                specs.append(spec)
                paths.append(path)
                mods.append(layer)
    for m in mods:
        m.softmax_attn, m.softmax_max_tokens = None, 0
    mods.train().requires_grad_(True)
    return specs, paths, mods


class _StudentSlot(nn.Module):
    """Sits at `...attn1` while the student runs: calls its LinFusion layer (casting to the layer's
    dtype when the UNet runs in another dtype without autocast) and records the output. The
    layer's own forward is differentiable (out-of-place when gradients are recorded), so
    training and inference run the same code."""

    def __init__(self, layer: LinFusionAttention, sink: list) -> None:
        super().__init__()
        self.layer = layer
        self.sink = sink

    def forward(self, x: torch.Tensor, context=None, value=None, mask=None, transformer_options=None, **_kw):
        dt = self.layer.to_q.weight.dtype
        cast = x.dtype != dt and not torch.is_autocast_enabled(x.device.type)
        c = (lambda t: None if t is None else t.to(dt)) if cast else (lambda t: t)
        if mask is not None:
            raise DistillError("a self-attention mask reached a LinFusion layer during distillation; "
                               "linear attention has no masked form")
        out = self.layer(c(x), context=c(context), value=c(value))
        if self.sink is not None:
            self.sink.append(out)
        return out.to(x.dtype) if cast else out


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _checkpoint_targets(unet: nn.Module, paths: Sequence[str]) -> list[nn.Module]:
    """Modules whose activations are recomputed in the backward pass: the transformer block that
    holds each attn1 (attention, cross-attention, feed-forward) and every ResBlock (a module with
    in_layers/emb_layers/out_layers, the LDM layout)."""
    blocks = {id(m): m for m in (unet.get_submodule(p.rpartition(".")[0]) for p in paths)}
    for m in unet.modules():
        if all(hasattr(m, a) for a in ("in_layers", "emb_layers", "out_layers")):
            blocks[id(m)] = m
    return list(blocks.values())


def _checkpointed(fn: Callable) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return _checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def student_in_place(unet: nn.Module, paths: Sequence[str], layers: nn.ModuleList, sink: list | None,
                     checkpointing: bool) -> Iterator[nn.Module]:
    """`unet` with a slot calling each of `layers` at its attn1 path (outputs appended to `sink`),
    and with gradient checkpointing of the blocks when `checkpointing`, for the body of the block.
    Always puts the original modules back, also on errors."""
    originals = {p: unet.get_submodule(p) for p in paths}
    try:
        for path, layer in zip(paths, layers):
            _set_submodule(unet, path, _StudentSlot(layer, sink))
        with forwards_replaced(_checkpoint_targets(unet, paths) if checkpointing else [],
                               lambda m: _checkpointed(m.forward)):
            yield unet
    finally:
        for path, orig in originals.items():
            _set_submodule(unet, path, orig)
