"""Checks of the high-res nodes' inputs, run at the start of `execute`, before any sampling,
VAE work or allocation (issue 16).

Why at execute and not in ComfyUI's validation: ComfyUI 0.3.75 checks a widget's min/max
only for constants (a NaN passes `NaN < min` and `NaN > max`), skips the check entirely for
values that arrive through links, and does not check V3 combo values at all. So every input
is checked here against the node's own schema (one source of truth for ranges and choices),
with a message that names the node, the input, the bad value, what is allowed and the fix.

Size limits: a target above MAX_TARGET_PIXELS is refused outright (documented ceiling); below
it, `check_memory` estimates each stage's memory with the pack's own estimate
(linfusion/memory.py) and refuses, before anything is allocated, a stage that cannot fit the
device at all ("needs X GB, the device has Y").
"""

from __future__ import annotations

import math

import comfy.model_management
import torch
from comfy_api.latest import io

from ..linfusion.memory import inference_bytes, low_memory_inference_bytes
from .lowmem import attention_at_full_res

# The hard ceiling on a high-res target: 2**30 pixels (1.07 gigapixels, e.g. 32768 x 32768),
# four times the largest image the reference publishes (16384 x 16384). Above it even the
# float32 pixel image of one stage is 12.9 GB.
MAX_TARGET_PIXELS = 1 << 30
VAE_TILE_MIN = 64  # px: smaller tiles are all overlap (64 px) or divide by zero in the tiler
GB = 1e9
# The smallest latent side the nodes take: 2 cells (16 px, also the minimum of ComfyUI's Empty
# Latent Image). Measured (issue 25) with the SD1.5 layout (3 downsamplings): the UNet itself
# gives finite output down to 1x1, since each downsampling rounds up and ComfyUI's upsampling
# matches the skip's size; what breaks at one cell is the per-channel statistics the refinement
# anchors to (an unbiased std of one value is NaN), so a 1x1 latent ended all-NaN.
MIN_LATENT_SIDE = 2
# Latent values beyond this are refused: VAE latents stay within about +-50 (SD1.x/2.x/XL),
# noise within +-6; at 1e30 the sampler's arithmetic overflows to inf/NaN.
MAX_LATENT_ABS = 1e4


class HighResInputError(ValueError):
    """A high-res node input that cannot be used; the message says which, why and the fix."""


def _show(v) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)  # nan, inf, -inf
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)}"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(node: str, name: str, value, allowed: str, fix: str) -> HighResInputError:
    return HighResInputError(f"{node}: input '{name}' is {_show(value)}; {allowed}. Fix: {fix}")


_LINK_HINT = "set it in the node, or check the node linked to this input"


def check_number(node: str, inp, value, integer: bool):
    """A number input (io.Int / io.Float `inp`) checked against its schema's range, also when linked."""
    lo, hi = inp.min, inp.max
    span = f"from {lo} to {hi}" if lo is not None and hi is not None else ""
    kind = "a whole number" if integer else "a finite number"
    allowed = f"it must be {kind} {span}".rstrip()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(node, inp.id, value, allowed, _LINK_HINT)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(node, inp.id, value, allowed, _LINK_HINT)
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise _bad(node, inp.id, value, allowed, _LINK_HINT)
        value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(node, inp.id, value, allowed, _LINK_HINT)
    return value


def check_latent(node: str, name: str, latent, latent_channels: int | None = None) -> None:
    """A LATENT dict whose 'samples' is a (B, C, h, w) tensor with B, C, h, w >= 1 and finite
    values; C the model's latent channels unless the latent is all zeros (ComfyUI fills those)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise _bad(node, name, latent, "it must be a LATENT (a dict with a 'samples' tensor)",
                   "connect the LATENT output of a KSampler, VAE Encode or Empty Latent Image")
    shape = tuple(samples.shape)
    if samples.ndim != 4:
        raise _bad(node, name, samples, "it must be an image latent of shape (batch, channels, height, width)",
                   "connect an image latent (video and audio latents are not supported)")
    b, c, h, w = shape
    if b == 0:
        raise _bad(node, name, samples, "its batch is empty (0 latents)",
                   "connect a latent with at least one image (batch_size >= 1)")
    if c == 0 or h == 0 or w == 0:
        raise _bad(node, name, samples, "it has no channels or no pixels",
                   "connect a latent made by a VAE or an Empty Latent Image node")
    if latent_channels is not None and c != latent_channels and bool(samples.any()):
        raise _bad(node, name, samples, f"it has {c} channels, but this model's latents have {latent_channels}",
                   "encode the image with this model's VAE (the latent comes from another model family)")
    if not bool(torch.isfinite(samples).all()):
        raise _bad(node, name, samples, "it contains NaN or infinite values",
                   "re-run the node that made it (a NaN latent decodes to a black image)")
    if h < MIN_LATENT_SIDE or w < MIN_LATENT_SIDE:
        px = MIN_LATENT_SIDE * 8
        raise _bad(node, name, samples, f"it is {w * 8}x{h * 8} px; the smallest image these nodes take is "
                   f"{px}x{px} px (a {MIN_LATENT_SIDE}x{MIN_LATENT_SIDE} latent)",
                   f"start from an image of at least {px} px a side (e.g. Empty Latent Image at 512x512)")
    peak = float(samples.abs().max())
    if peak > MAX_LATENT_ABS:
        raise _bad(node, name, samples, f"it holds values up to {peak:.3g}, far beyond a real latent "
                   f"(|x| <= {MAX_LATENT_ABS:g}; VAE latents stay within about 50)",
                   "connect a latent made by a VAE Encode, KSampler or Empty Latent Image, not a scaled or "
                   "hand-made tensor")


def check_image(node: str, name: str, image) -> torch.Tensor:
    """An IMAGE (B, H, W, C) with B, H, W >= 1, C 3 or 4, finite values, sides of at least
    MIN_LATENT_SIDE latent cells. Returns it as float32: a bool image (0/1) or an 8-bit one
    (0..255, divided by 255) from a node that does not follow ComfyUI's float convention is
    converted; other integer types are refused (their scale is unknown)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise _bad(node, name, image, "it must be an IMAGE (batch, height, width, channels)",
                   "connect the IMAGE output of Load Image or VAE Decode")
    b, h, w, c = image.shape
    if b == 0 or h == 0 or w == 0:
        raise _bad(node, name, image, "it is empty (no image or no pixels)", "connect an image with pixels")
    if c not in (3, 4):
        raise _bad(node, name, image, "it must have 3 (RGB) or 4 (RGBA) channels",
                   "convert it to RGB first (e.g. a mask is not an image)")
    if image.dtype == torch.bool:
        image = image.float()
    elif image.dtype == torch.uint8:
        image = image.float() / 255.0
    elif not image.is_floating_point():
        raise _bad(node, name, image, f"its values are {str(image.dtype).replace('torch.', '')}, but a ComfyUI "
                   "IMAGE holds floats from 0 to 1",
                   "fix or replace the node that made it, or convert it to float (e.g. divide 8-bit values by 255)")
    if not bool(torch.isfinite(image).all()):
        raise _bad(node, name, image, "it contains NaN or infinite values", "re-run the node that made it")
    px = MIN_LATENT_SIDE * 8
    if h < px or w < px:
        raise _bad(node, name, image, f"it is {w}x{h} px; the smallest image these nodes take is {px}x{px} px",
                   f"upscale it to at least {px} px a side first (e.g. Upscale Image)")
    return image


def check_inputs(schema: io.Schema, values: dict, latent_channels: int | None = None) -> dict:
    """Check every input of a high-res node against its schema; returns the values with whole
    floats given to INT inputs turned into ints. Raises HighResInputError."""
    node = schema.display_name or schema.node_id
    out = dict(values)
    for inp in schema.inputs:
        name = inp.id
        if name not in values or values[name] is None:
            if inp.optional:
                continue
            raise _bad(node, name, None, "it is missing", "connect it or give it a value")
        v = values[name]
        if isinstance(inp, io.Float.Input):
            out[name] = float(check_number(node, inp, v, integer=False))
        elif isinstance(inp, io.Int.Input):
            out[name] = check_number(node, inp, v, integer=True)
        elif isinstance(inp, io.Boolean.Input):
            if not isinstance(v, bool):
                raise _bad(node, name, v, "it must be true or false", _LINK_HINT)
        elif isinstance(inp, io.Combo.Input):
            options = list(inp.options)
            if not isinstance(v, str) or v not in options:
                raise _bad(node, name, v, f"allowed values: {', '.join(options)}",
                           "choose one of these (a workflow saved with another version may name one this "
                           "ComfyUI or this pack does not have)")
        elif isinstance(inp, io.Latent.Input):
            check_latent(node, name, v, latent_channels)
        elif isinstance(inp, io.Image.Input):
            out[name] = check_image(node, name, v)
    tile = out.get("vae_tile_size")
    if tile is not None and 0 < tile < VAE_TILE_MIN:
        raise _bad(node, "vae_tile_size", tile, f"it must be 0 (never tile) or from {VAE_TILE_MIN} px on",
                   f"use 0, or a tile of at least {VAE_TILE_MIN} px (the default 2048 suits most machines)")
    return out


def check_finite_output(node: str, what: str, t: torch.Tensor, stage=None) -> None:
    """Refuse a non-finite result of a stage ('sampling', 'upscale', 'VAE decode'), naming the
    stage and the likely cause, instead of handing on an all-NaN latent as a success. The
    inputs were checked finite, small-enough and of sane size, so the cause is the model."""
    if bool(torch.isfinite(t).all()):
        return
    share = 1.0 - float(torch.isfinite(t).float().mean())
    where = "the output" if stage is None else f"stage {stage.index} ({stage.pixel_size[0]}x{stage.pixel_size[1]} px)"
    fix = ("run the VAE in float32 (ComfyUI's --fp32-vae) or use a VAE fixed for fp16" if what == "VAE decode" else
           "lower cfg, run the model in float32 (ComfyUI's --force-fp32), or check the model, LoRAs and LinFusion "
           "weights (one with NaN or huge values)")
    raise HighResInputError(
        f"{node}: {what} at {where} gave NaN or infinite values ({share:.0%} of the values); the inputs were "
        f"finite, so the model overflowed (fp16 overflow, an extreme cfg, or broken weights). Fix: {fix}.")


def check_target(node: str, target_px: tuple[int, int], source: str) -> None:
    """Refuse a target above the documented ceiling (MAX_TARGET_PIXELS); `source` names the
    inputs that set it, for the message."""
    w, h = target_px
    if w * h > MAX_TARGET_PIXELS:
        raise HighResInputError(
            f"{node}: the target {w}x{h} px ({w * h / 1e9:.2f} gigapixels, from {source}) is above the pack's "
            f"ceiling of {MAX_TARGET_PIXELS / 1e9:.2f} gigapixels (e.g. 32768x32768). Fix: a smaller "
            f"scale_by / width / height.")


def stage_bytes(model, batch: int, latent_hw: tuple[int, int], cfg: float, low_memory: bool,
                pixel_space: bool) -> dict[str, float]:
    """Bytes one stage needs, by where they live: 'unet' on the model's load device (the pack's
    estimate of one model evaluation's activations: the linear one, or in low-memory mode the
    low-memory one of a single cond), and 'pixels' on the intermediate device (the float32
    image before and after the bicubic resize, when the stage upscales in pixel space)."""
    h, w = latent_hw
    base = model.model
    channels = model.get_model_object("latent_format").latent_channels
    evals = 1 if (low_memory or math.isclose(cfg, 1.0)) else 2  # cond and uncond batched (CFG)
    size = comfy.model_management.dtype_size(base.get_dtype())
    if low_memory:
        unet = low_memory_inference_bytes((batch, channels, h, w), size, attention_at_full_res(base.diffusion_model))
    else:
        unet = inference_bytes((batch * evals, channels, h, w), size, getattr(base, "memory_usage_factor", 1.0))
    px = 2 * batch * (h * 8) * (w * 8) * 3 * 4 if pixel_space else 0.0
    return {"unet": unet, "pixels": px}


def check_memory(node: str, model, stages, batch: int, cfg: float, low_memory: bool, pixel_space: bool,
                 latent_possible: bool = True) -> None:
    """Refuse a plan whose largest stage cannot fit the device at all, before any allocation:
    '... needs X GB, the device has Y'. `latent_possible`: whether upscale_method 'latent' would
    avoid the pixel-space buffers (not for single-stage super-resolution)."""
    unet_dev = model.load_device
    pix_dev = comfy.model_management.intermediate_device()
    totals = {"unet": comfy.model_management.get_total_memory(unet_dev),
              "pixels": comfy.model_management.get_total_memory(pix_dev)}
    for st in stages:
        need = stage_bytes(model, batch, (st.height, st.width), cfg, low_memory, pixel_space)
        w, h = st.pixel_size
        if need["unet"] > totals["unet"]:
            raise HighResInputError(
                f"{node}: stage {st.index} ({w}x{h} px, batch {batch}) needs {need['unet'] / GB:.1f} GB for the "
                f"model, the device ({unet_dev}) has {totals['unet'] / GB:.1f} GB. Fix: "
                + ("a smaller target or batch (low_memory is on)." if low_memory else
                   "turn on low_memory, or a smaller target or batch."))
        if need["pixels"] > totals["pixels"]:
            raise HighResInputError(
                f"{node}: stage {st.index} ({w}x{h} px, batch {batch}) needs {need['pixels'] / GB:.1f} GB for its "
                f"pixel-space upscale, the device ({pix_dev}) has {totals['pixels'] / GB:.1f} GB. Fix: a smaller "
                f"target or batch" + (", or upscale_method 'latent'." if latent_possible else "."))
