"""ComfyUI glue for the low-memory UNet tricks of linfusion/lowmem.py (and its banded pieces,
linfusion/banded.py): one context manager, `low_memory_unet`, that the high-res sampler holds
around a stage's sampling call.

While it is active:
* the ResBlocks of the UNet's two highest-resolution levels run GroupNorm -> SiLU -> conv in
  bands of rows, and LinFusion layers build q, k, v by chunks of tokens (instance-level
  forwards, removed on exit whatever happens);
* the Upsample layers that feed those levels run nearest x2 + conv in bands of rows;
* a DIFFUSION_MODEL wrapper in the sampling call's model_options adds block patches to a copy
  of each evaluation's transformer_options (so nothing else sees them), removed on exit:
  the decoder's skip concatenations at those levels are left to the banded ResBlocks
  (linfusion.lowmem.SkipConcat), and, when the model computes on another device than the
  CPU, the UNet's skip connections are parked in CPU memory.

Skip parking steps aside for an evaluation that carries ControlNet outputs for the output
blocks: the UNet adds those to each skip before any patch sees it (`apply_control`), and a
parked skip is on the wrong device for that.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager, nullcontext

import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import SpatialTransformer

from ..linfusion import banded, lowmem
from ..linfusion.lowmem import LowMemory
from ..linfusion.memory import low_memory_inference_bytes

log = logging.getLogger("ComfyUI-LinFusion")

WRAPPER_KEY = "linfusion_low_memory"
PARK_DEVICE = "auto"  # see low_memory_unet; tests set a device to exercise parking on a CPU


def _affine(norm: torch.nn.Module, x: torch.Tensor):
    """GroupNorm's (gamma, beta) in fp32 on x's device, through ComfyUI's weight casting when the
    layer uses it (partially loaded models, LoRA weight functions)."""
    if getattr(norm, "comfy_cast_weights", False) or getattr(norm, "weight_function", None) or \
            getattr(norm, "bias_function", None):
        w, b = comfy.ops.cast_bias_weight(norm, x, dtype=torch.float32)[:2]
        return w, b
    return banded.default_affine(norm, x)


def low_memory_wrapper(parking: lowmem.SkipParking | None, concat: lowmem.SkipConcat | None = None):
    """DIFFUSION_MODEL wrapper: runs the UNet with block patches added to a copy of its
    transformer_options: `parking`'s three (ours last among input patches, first among the
    others, so other patches always see device tensors) and `concat`'s output patch (last, so
    other patches see the real tensors). When no other output patch is present, the two
    output patches are one: a parked skip that a banded block consumes then stays in host
    memory and crosses one band at a time."""

    def wrapper(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kw):
        transformer_options = {} if transformer_options is None else transformer_options
        park = parking
        if control is not None and any(c is not None for c in control.get("output", []) or []):
            park = None  # the UNet adds these to each skip before any patch: a parked skip can't take them
        patches = {k: list(v) for k, v in transformer_options.get("patches", {}).items()}
        outputs = patches.setdefault("output_block_patch", [])
        alone = not outputs
        if park is not None:
            patches.setdefault("input_block_patch", []).append(park.park)
            patches.setdefault("input_block_patch_after_skip", []).insert(0, park.resume)
            park.moments = concat is not None and alone
            if not park.moments:
                outputs.insert(0, park.fetch)
        if concat is not None:
            concat.parking = park if park is not None and alone else None
            concat.overwrite = alone  # no other output patch can have kept the decoder's map
            outputs.append(concat.patch)
        if not outputs:
            del patches["output_block_patch"]
        for obj in (park, concat):
            if obj is not None:
                obj.reset()
        try:
            return executor(x, timesteps, context, y, control, {**transformer_options, "patches": patches}, **kw)
        finally:
            for obj in (park, concat):
                if obj is not None:
                    obj.reset()

    return wrapper


@contextmanager
def low_memory_unet(unet: torch.nn.Module, model_options: dict | None, settings: LowMemory | None = LowMemory(),
                    park_device: torch.device | str | None = "default"):
    """Low-memory mode (`settings`; None: off) for the duration of the block: feed-forward layers
    on chunks of tokens and, when settings.banded, everything `banded_unet` does. Yields the
    SkipParking (or None), whose counters say what moved."""
    if settings is None:
        yield None
        return
    with lowmem.chunked_token_forward(lowmem.feed_forward_layers(unet), settings.token_chunks,
                                      max_tokens=settings.max_chunk_tokens), \
            (banded_unet(unet, model_options, settings, park_device) if settings.banded else nullcontext()) as parking:
        yield parking


@contextmanager
def banded_unet(unet: torch.nn.Module, model_options: dict | None, settings: LowMemory,
                park_device: torch.device | str | None = "default"):
    """For the duration of the block: banded resnets, upsamplers and output head (the
    settings.levels highest levels), LinFusion layers with streamed queries, token-chunked
    cross-attention, and, through a DIFFUSION_MODEL wrapper in `model_options` (the sampling
    call's, extra_args'), the decoder's skip concatenations left to the banded resnets and,
    off-CPU, skip connections parked in CPU memory. park_device "auto": the CPU when the model
    computes elsewhere, else no parking; None: no parking; a device: park there (tests park CPU
    tensors on the CPU, which copies them); "default": the module's PARK_DEVICE. Yields the
    SkipParking (or None)."""
    min_chunk_bytes = settings.min_chunk_bytes
    if park_device == "default":
        park_device = PARK_DEVICE
    if park_device == "auto":
        compute = comfy.model_management.get_torch_device()
        park_device = None if torch.device(compute).type == "cpu" else torch.device("cpu")
    parking = lowmem.SkipParking(park_device) if park_device is not None and model_options is not None else None
    blocks = banded.top_level_resblocks(unet, settings.levels)
    concat = lowmem.SkipConcat(unet, blocks, min_chunk_bytes) if model_options is not None else None
    with ExitStack() as stack:
        stack.enter_context(banded.chunked_resblocks(blocks, min_bytes=min_chunk_bytes, affine=_affine,
                                                     pending=None if concat is None else concat.take))
        stack.enter_context(banded.banded_upsamples(banded.top_level_upsamples(unet, settings.levels),
                                                    min_bytes=min_chunk_bytes))
        stack.enter_context(banded.banded_sequences([getattr(unet, "out", None)], min_bytes=min_chunk_bytes,
                                                    affine=_affine))
        stack.enter_context(lowmem.token_chunked_linfusion(unet))
        stack.enter_context(lowmem.chunked_token_forward(lowmem.cross_attention_layers(unet), settings.token_chunks,
                                                         max_tokens=settings.max_chunk_tokens))
        if model_options is not None:
            # a new transformer_options with our wrapper replaces the call's for the duration:
            # restoring the old object leaves the options exactly as they were
            had, before = "transformer_options" in model_options, model_options.get("transformer_options")
            opts = dict(before or {})
            wrappers = {k: {key: list(fns) for key, fns in v.items()} for k, v in opts.get("wrappers", {}).items()}
            opts["wrappers"] = wrappers
            comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                         WRAPPER_KEY, low_memory_wrapper(parking, concat), opts)
            model_options["transformer_options"] = opts

            def restore():
                if had:
                    model_options["transformer_options"] = before
                else:
                    model_options.pop("transformer_options", None)

            stack.callback(restore)
        yield parking
    if parking is not None and parking.parked:
        log.debug("LinFusion low memory: %d skip connections parked, %.1f MB moved", parking.parked,
                  parking.bytes_moved / 1e6)


def attention_at_full_res(unet: torch.nn.Module) -> bool:
    """Whether an LDM UNet has transformer blocks at the latent's own resolution (SD1.x/2.x yes,
    SDXL no): the low-memory estimate differs (linfusion/memory.py)."""
    blocks = getattr(unet, "input_blocks", None)
    return bool(blocks) and len(blocks) > 1 and any(isinstance(m, SpatialTransformer) for m in blocks[1])


def low_memory_estimate():
    """OUTER_SAMPLE wrapper for the low-memory sampling clone: while it samples, ComfyUI's memory
    planning gets the low-memory estimate of one evaluation (linfusion/memory.py) instead of
    the normal one, so at 16K it neither offloads weights for memory the step never uses nor
    plans too little. Only for a LinFusion model, i.e. when Apply LinFusion's own wrapper
    (outside this one: wrappers run in the order they were added) has put its linear estimate
    on the base model; the previous method is put back afterwards, also on errors."""

    def wrapper(executor, noise, *args, **kwargs):
        base = executor.class_obj.model_patcher.model
        previous = vars(base).get("memory_required")
        if previous is None:  # not a LinFusion model: its own estimate stands
            return executor(noise, *args, **kwargs)
        unet = base.diffusion_model
        full_res_attention = attention_at_full_res(unet)
        dtype = base.manual_cast_dtype or base.get_dtype()
        size = comfy.model_management.dtype_size(dtype)
        per_eval = noise.shape[0]  # one cond at a time: an evaluation is the latent batch

        # newer callers pass cond_shapes=, memory_efficient_attention= (0.38) and may pass more
        def estimate(input_shape, *_args, **_kwargs):
            shape = [min(input_shape[0], per_eval), *input_shape[1:]]
            return low_memory_inference_bytes(shape, size, full_res_attention)

        base.memory_required = estimate
        try:
            return executor(noise, *args, **kwargs)
        finally:
            base.memory_required = previous

    return wrapper
