"""ApplyLinFusion: MODEL -> MODEL with every UNet self-attention replaced by LinFusion."""

from __future__ import annotations

import logging
import uuid

import comfy.model_management
import comfy.utils
from comfy.patcher_extension import CallbacksMP, WrappersMP
from comfy_api.latest import io

from ..linfusion.attention import LinFusionAttention
from ..linfusion.families import supported_families_text
from ..linfusion.memory import DEFAULT_SOFTMAX_LAYERS, inference_bytes
from ..linfusion.patching import (
    IncompatibleModelError,
    attention_levels,
    build_replacements,
    describe_model,
    model_family,
    operations_like,
    plan_replacements,
)
from . import loaders, weights_store
from .highres_checks import check_number
from .loaders import UNET_PREFIX
from .schema import CATEGORY, DISPLAY_NAMES, schema

log = logging.getLogger("ComfyUI-LinFusion")
# LoRA-patchable tensors of a self-attention layer, by ComfyUI key suffix.
ATTN_TENSORS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")


def original_layer(model, path: str):
    """The model's own attention module at `path`, even while a LinFusion clone is loaded."""
    name = UNET_PREFIX + path
    obj = model.object_patches_backup.get(name)
    if obj is None:
        obj = comfy.utils.get_attr(model.model, name)
    if isinstance(obj, LinFusionAttention):  # defensive: never wrap a replacement in another
        obj = obj.softmax_attn
    return obj


def softmax_key_pairs(paths: list[str]) -> list[tuple[str, str]]:
    """(attn1 key, kept softmax layer's key) for every LoRA-patchable tensor of the layers at `paths`."""
    return [(f"{UNET_PREFIX}{p}.{t}", f"{UNET_PREFIX}{p}.softmax_attn.{t}") for p in paths for t in ATTN_TENSORS]


def _mirror(patches: dict, pairs: list[tuple[str, str]]) -> bool:
    """Make `patches[dst]` the same patch list as `patches[src]` (or absent with it). Returns
    whether anything changed. Patch entries are compared by identity: clones share them."""
    changed = False
    for src, dst in pairs:
        want, have = patches.get(src), patches.get(dst)
        if want is None:
            if have is not None:
                del patches[dst]
                changed = True
        elif have is None or len(have) != len(want) or any(a is not b for a, b in zip(want, have)):
            patches[dst] = list(want)
            changed = True
    return changed


def mirror_patches_to_softmax(patcher, paths: list[str]) -> bool:
    """Hybrid mode: weight patches (LoRA and others) on `<attn1>.to_q.weight` etc. reach
    LinFusion's projections, which sit at those keys while the model is patched; this registers
    the same patches on the kept softmax layer's own keys (`<attn1>.softmax_attn.to_q.weight`),
    in `patcher.patches` and in every hook's patches, so that ComfyUI itself applies them to
    whichever path runs: on load, per layer in low-VRAM mode, per operation with Dynamic VRAM,
    with its own backup and bit-identical restore. Nothing here writes a weight.

    Called when the node runs (LoRAs loaded before it) and at the start of every sampling run
    of the model actually sampled (LoRAs or hooks added after it, clones ComfyUI made). When
    something changed, `patches_uuid` is renewed as `add_patches` does, so a copy already
    loaded with the old patches is re-patched. Returns whether anything changed."""
    pairs = softmax_key_pairs(paths)
    changed = _mirror(patcher.patches, pairs)
    for hook_patches in getattr(patcher, "hook_patches", {}).values():
        changed |= _mirror(hook_patches, pairs)
    if changed:
        patcher.patches_uuid = uuid.uuid4()
    return changed


def bind_softmax_layers(patcher, paths: list[str]) -> None:
    """Point each replacement's kept softmax layer at the original attention module of the model
    `patcher` wraps, which may be another copy than the one the node saw (ComfyUI can re-create
    the model, e.g. a deep copy per GPU)."""
    for path in paths:
        layer = patcher.object_patches.get(UNET_PREFIX + path)
        if isinstance(layer, LinFusionAttention) and layer.softmax_attn is not None:
            orig = original_layer(patcher, path)
            if layer.softmax_attn is not orig:
                layer.softmax_attn = orig


def linfusion_memory_required(base_model, input_shape, softmax_max_tokens: int = 0,
                              softmax_layers=DEFAULT_SOFTMAX_LAYERS) -> float:
    """Bytes of inference memory a LinFusion-patched ComfyUI model needs for `input_shape`;
    `softmax_layers`: (downsampling level, heads) of the hybrid layers (linfusion/memory.py)."""
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    return inference_bytes(input_shape, comfy.model_management.dtype_size(dtype), base_model.memory_usage_factor,
                           softmax_max_tokens, softmax_layers)


def softmax_layers_of(unet, layers: dict) -> tuple:
    """(downsampling level, heads) of each replacement, for hybrid mode's estimate; the
    conservative default when a layer's level is unknown (not an LDM UNet layout)."""
    levels = attention_levels(unet, list(layers))
    if any(v is None for v in levels.values()):
        return DEFAULT_SOFTMAX_LAYERS
    return tuple(sorted({(levels[p], int(layer.heads)) for p, layer in layers.items()}))


def sampling_wrapper(paths: list[str], softmax_max_tokens: int, softmax_layers=DEFAULT_SOFTMAX_LAYERS):
    """OUTER_SAMPLE wrapper, run before ComfyUI loads the model for sampling.

    Hybrid mode: binds the kept softmax layers to the sampled model and mirrors its weight
    patches onto them (see `mirror_patches_to_softmax`). Memory: while this model samples,
    ComfyUI's memory planning (load and offload decisions, cond/uncond batching) uses the
    linear estimate above instead of the softmax one; the shared base model gets its own
    method back afterwards, also on errors."""

    def wrapper(executor, *args, **kwargs):
        patcher = executor.class_obj.model_patcher
        loaders.settle_before_load(patcher, paths)
        if softmax_max_tokens > 0:
            bind_softmax_layers(patcher, paths)
            mirror_patches_to_softmax(patcher, paths)
        base = patcher.model

        # Newer ComfyUI memory helpers pass more arguments (cond_shapes, keywords): accept any.
        def memory_required(input_shape, *_args, **_kwargs):
            return linfusion_memory_required(base, input_shape, softmax_max_tokens, softmax_layers)

        before = vars(base).get("memory_required")  # another LinFusion wrapper's, when applied twice
        base.memory_required = memory_required
        try:
            return executor(*args, **kwargs)
        finally:
            if before is None:
                del base.memory_required
            else:
                base.memory_required = before

    return wrapper


def apply_linfusion(model, weights_choice: str, softmax_max_tokens: int = 0):
    """Clone `model` and object-patch every attn1 with LinFusion. Returns (clone, summary)."""
    unet = model.get_model_object("diffusion_model")
    fam = model_family(unet)
    if weights_choice == weights_store.AUTO:
        if fam is None:
            raise IncompatibleModelError(
                f"LinFusion 'auto' found no LinFusion weights for this model: it is {describe_model(unet)}. "
                f"LinFusion weights exist for: {supported_families_text()}."
            )
        path = weights_store.auto_folder(fam)
        if not (path / weights_store.WEIGHTS_NAME).is_file():
            weights_store.download(fam, path)
    else:
        path = weights_store.resolve(weights_choice)
    weights = weights_store.CACHE.get(path, check=lambda header: plan_replacements(header, unet))
    plan = plan_replacements(weights, unet)

    def build(patcher, loaded=None):
        """The LinFusion layers for the model `patcher` wraps: ComfyUI's layer classes, dtype and
        offload device of that model, the hybrid softmax path bound to its own attention. The
        weights come from the cache (not held here: a model rebuilt later reads them again)."""
        weights = loaded if loaded is not None else weights_store.CACHE.get(path)
        target = patcher.get_model_object("diffusion_model")
        originals = {r.path: original_layer(patcher, r.path) for r in plan}
        sample = originals[plan[0].path].to_q.weight
        layers = build_replacements(
            weights, plan, originals,
            operations_for=lambda p: operations_like(target, p),
            dtype=sample.dtype if sample.is_floating_point() and sample.element_size() >= 2 else None,
            device=patcher.offload_device,
            softmax_max_tokens=softmax_max_tokens,
            layer_class=loaders.ComfyLinFusionAttention,
        )
        for p, layer in layers.items():
            layer.bind(originals[p])
        return layers

    layers = build(model, weights)
    m = model.clone()
    for path_, layer in layers.items():
        m.add_object_patch(UNET_PREFIX + path_, layer)
    if softmax_max_tokens > 0:
        mirror_patches_to_softmax(m, list(layers))
    m.add_wrapper(WrappersMP.OUTER_SAMPLE, sampling_wrapper(list(layers), softmax_max_tokens,
                                                            softmax_layers_of(unet, layers)))
    m.set_injections(loaders.INJECTION_KEY, [loaders.backup_injection(list(layers))])
    m.add_callback(CallbacksMP.ON_CLONE, loaders.LayerSets(build, model.model, layers).on_clone)
    summary = (f"LinFusion: {len(layers)} self-attention layers of {fam.label if fam else 'the model'} replaced "
               f"with {path}" + (f"; softmax kept at <= {softmax_max_tokens} tokens" if softmax_max_tokens else ""))
    log.info(summary)
    return m, summary


class ApplyLinFusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ApplyLinFusion",
            display_name=DISPLAY_NAMES["ApplyLinFusion"],
            category=CATEGORY,
            search_aliases=["apply linfusion", "linear attention", "high resolution", "16K", "ultra", "patch model"],
            description=(
                "Replaces every self-attention layer of an SD1.x, SD2.x or SDXL UNet with LinFusion's linear "
                "attention, whose cost grows linearly with the number of pixels: high resolutions become "
                "affordable. Cross-attention, LoRAs, ControlNets, IP-Adapters and every sampler keep working. "
                "The incoming model is not changed."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x or SDXL model (any fine-tune, LoRAs allowed)."),
                io.Combo.Input(
                    "weights", options=weights_store.choices(), default=weights_store.AUTO,
                    tooltip=(
                        "LinFusion weights from models/linfusion. 'auto' picks the release matching the model's "
                        "family (Yuanshi/LinFusion-1-5, -2-1 or -XL) and downloads it into "
                        "models/linfusion/<repo name> on first use (198 MB for SD1.x/2.x, 871 MB for SDXL)."
                    ),
                ),
                io.Int.Input(
                    "softmax_max_tokens", default=0, min=0, max=1 << 24, step=64,
                    tooltip=(
                        "Hybrid mode. 0: LinFusion in every self-attention layer. Above 0: a layer whose input has "
                        "at most this many tokens (latent height x width at that UNet level) keeps the model's own "
                        "softmax attention, so only expensive layers use LinFusion. Example: 4096 keeps softmax for "
                        "all levels of a 512x512 SD1.5 image (64x64 latent) and uses LinFusion above that size. "
                        "LoRAs reach both paths."
                    ),
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with LinFusion self-attention (a patched clone).")],
        )

    @classmethod
    def execute(cls, model, weights: str, softmax_max_tokens: int) -> io.NodeOutput:
        # linked values reach here unchecked by ComfyUI: the same range and type as the widget
        (tokens,) = [i for i in cls.define_schema().inputs if i.id == "softmax_max_tokens"]
        softmax_max_tokens = check_number("Apply LinFusion", tokens, softmax_max_tokens, integer=True)
        # a linked `weights` of another type is refused by weights_store.resolve, with its one message
        m, _ = apply_linfusion(model, weights, softmax_max_tokens)
        return io.NodeOutput(m)
