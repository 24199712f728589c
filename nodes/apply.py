"""ApplyLinFusion: MODEL -> MODEL with every UNet self-attention replaced by LinFusion."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.utils
from comfy.patcher_extension import CallbacksMP, WrappersMP
from comfy_api.latest import io

from ..linfusion.attention import LinFusionAttention
from ..linfusion.families import supported_families_text
from ..linfusion.memory import inference_bytes
from ..linfusion.patching import (
    IncompatibleModelError,
    build_replacements,
    describe_model,
    model_family,
    operations_like,
    plan_replacements,
)
from . import weights_store

log = logging.getLogger("ComfyUI-LinFusion")
PREFIX = "diffusion_model."
# LoRA-patchable tensors of a self-attention layer, by ComfyUI key suffix.
ATTN_TENSORS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")


def original_layer(model, path: str):
    """The model's own attention module at `path`, even while a LinFusion clone is loaded."""
    name = PREFIX + path
    obj = model.object_patches_backup.get(name)
    if obj is None:
        obj = comfy.utils.get_attr(model.model, name)
    if isinstance(obj, LinFusionAttention):  # defensive: never wrap a replacement in another
        obj = obj.softmax_attn
    return obj


def mirror_lora_to_softmax(paths: list[str]):
    """ON_LOAD callback for hybrid mode: weight patches (LoRA) on `<attn1>.to_q.weight` etc.
    reach LinFusion's projections, which sit at those keys; this copies them onto the kept
    softmax layer (`<attn1>.softmax_attn.*`) too, so LoRA affects whichever path runs.
    ComfyUI backs the mirrored weights up and restores them on unload like any patch."""
    pairs = [(f"{PREFIX}{p}.{t}", f"{PREFIX}{p}.softmax_attn.{t}") for p in paths for t in ATTN_TENSORS]

    def on_load(patcher, device_to, *_args) -> None:
        for src, dst in pairs:
            want, have = patcher.patches.get(src), patcher.patches.get(dst)
            if want is None and have is None:
                continue
            same = want is not None and have is not None and len(want) == len(have)
            if same and all(a is b for a, b in zip(want, have)):
                continue  # already mirrored and applied by load()
            if want is None:
                patcher.patches.pop(dst, None)
            else:
                patcher.patches[dst] = list(want)
                patcher.patch_weight_to_device(dst, device_to=device_to)

    return on_load


def linfusion_memory_required(base_model, input_shape, softmax_max_tokens: int = 0) -> float:
    """Bytes of inference memory a LinFusion-patched ComfyUI model needs for `input_shape`."""
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    return inference_bytes(input_shape, comfy.model_management.dtype_size(dtype), base_model.memory_usage_factor,
                           softmax_max_tokens)


def linear_memory_estimate(softmax_max_tokens: int):
    """OUTER_SAMPLE wrapper: while this model samples, ComfyUI's memory planning (load and
    offload decisions, cond/uncond batching) uses the linear estimate above instead of the
    softmax one. The shared base model gets its own method back afterwards, also on errors."""

    def wrapper(executor, *args, **kwargs):
        base = executor.class_obj.model_patcher.model
        base.memory_required = lambda input_shape, cond_shapes=None: linfusion_memory_required(
            base, input_shape, softmax_max_tokens)
        try:
            return executor(*args, **kwargs)
        finally:
            del base.memory_required

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
    weights = weights_store.CACHE.get(path)
    plan = plan_replacements(weights, unet)
    originals = {r.path: original_layer(model, r.path) for r in plan}
    sample = originals[plan[0].path].to_q.weight
    layers = build_replacements(
        weights, plan, originals,
        operations_for=lambda p: operations_like(unet, p),
        dtype=sample.dtype if sample.is_floating_point() and sample.element_size() >= 2 else None,
        device=model.offload_device,
        softmax_max_tokens=softmax_max_tokens,
    )
    m = model.clone()
    for path_, layer in layers.items():
        m.add_object_patch(PREFIX + path_, layer)
    if softmax_max_tokens > 0:
        m.add_callback(CallbacksMP.ON_LOAD, mirror_lora_to_softmax(list(layers)))
    m.add_wrapper(WrappersMP.OUTER_SAMPLE, linear_memory_estimate(softmax_max_tokens))
    summary = (f"LinFusion: {len(layers)} self-attention layers of {fam.label if fam else 'the model'} replaced "
               f"with {path}" + (f"; softmax kept at <= {softmax_max_tokens} tokens" if softmax_max_tokens else ""))
    log.info(summary)
    return m, summary


class ApplyLinFusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyLinFusion",
            display_name="Apply LinFusion",
            category="model_patches/LinFusion",
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
        m, _ = apply_linfusion(model, weights, softmax_max_tokens)
        return io.NodeOutput(m)
