"""The high-res nodes' settings: what the user chose (HighResSettings), every 'auto' decided
for the model at hand (Resolved, `resolve`), the target size, and what a run did (HighResReport)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.latent_formats
import comfy.model_base

from ..linfusion import highres as hr

log = logging.getLogger("ComfyUI-LinFusion")

METHODS = ("auto", "sdedit", "demofusion")
UPSCALE_METHODS = ("pixel", "latent")
ANCHOR_CHOICES = ("auto", "on", "off")
SIZE_CONDITIONING = ("final", "per stage")
STAGE_IMAGES = ("off", "preview", "save")
DEFAULT_VAE_TILE = 2048  # the SD1.5 notebook tiles the VAE from 4K on, with 2048 px tiles


@dataclass
class HighResSettings:
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    method: str = "auto"  # auto | sdedit | demofusion
    upscale_strength: float = 0.0  # 0: the method's reference value
    strength_schedule: str = "auto"  # auto | notebook | linear | constant
    upscale_method: str = "pixel"
    cosine_scales: tuple[float, float, float] = hr.COSINE_SCALES
    gaussian_sigma: float = hr.GAUSSIAN_SIGMA
    anchor: str = "auto"  # auto | on | off
    low_memory: bool = False
    vae_tile_size: int = DEFAULT_VAE_TILE
    size_conditioning: str = "final"  # final | per stage (SDXL-like models)
    native_size: int = 0  # px, the model's native long side; 0: the family's (NATIVE_LONG_SIDE)
    dilated_min_weight: float = hr.DILATED_MIN_WEIGHT  # skip the dilated pass below this weight


@dataclass
class Resolved:
    """Settings with every 'auto' decided for the model at hand."""

    refine: bool
    strength: float
    anchor: bool
    style: str  # what the log says about the choice
    schedule: str = "linear"  # notebook | linear | constant
    rounding: str = "ceil"  # steps per stage: ceil (SDXL pipelines) | int (diffusers img2img)
    native_px: int = 512  # the long side (px) the dilation counts from


@dataclass
class HighResReport:
    """What a run did: its stages and the wall time of each (seconds), for logs and benches."""

    stages: list[hr.Stage]
    seconds: list[float] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # latent shape each stage produced
    progress_total: int = 0
    start_sigmas: list[float] = field(default_factory=list)  # the model's sigma each stage starts from


def is_sdxl_like(model) -> bool:
    """SDXL and its relatives (same latent space): the reference's SDXL defaults apply."""
    fmt = model.get_model_object("latent_format")
    return isinstance(fmt, (comfy.latent_formats.SDXL, comfy.latent_formats.SDXL_Playground_2_5))


def native_long_side(model) -> int:
    """The model family's native long side in px: SDXL-like 1024, SD2.x 768 (v-prediction;
    512 for the eps SD2 base), SD1.x 512 (the UNets' default sample sizes)."""
    if is_sdxl_like(model):
        return hr.NATIVE_LONG_SIDE["sdxl"]
    base = model.model
    if base.model_config.unet_config.get("context_dim") == 1024:
        v = base.model_type == comfy.model_base.ModelType.V_PREDICTION
        return hr.NATIVE_LONG_SIDE["sd2"] if v else hr.NATIVE_LONG_SIDE["sd1"]
    return hr.NATIVE_LONG_SIDE["sd1"]


def resolve(model, s: HighResSettings) -> Resolved:
    if s.method not in METHODS:
        raise ValueError(f"LinFusion high-res: unknown method {s.method!r}; use one of {', '.join(METHODS)}")
    if s.upscale_method not in UPSCALE_METHODS:
        raise ValueError(f"LinFusion high-res: unknown upscale method {s.upscale_method!r}; "
                         f"use one of {', '.join(UPSCALE_METHODS)}")
    sdxl = is_sdxl_like(model)
    method = s.method if s.method != "auto" else ("demofusion" if sdxl else "sdedit")
    refine = method == "demofusion"
    strength = s.upscale_strength or (hr.DEMOFUSION_STRENGTH if refine else hr.SDEDIT_STRENGTH)
    anchor = refine if s.anchor == "auto" else s.anchor == "on"
    style = method
    if s.method == "auto":
        style += " (auto: SDXL-like model)" if sdxl else " (auto: SD1.x/2.x-like model)"
    schedule = s.strength_schedule
    if schedule == "auto":  # the reference's own rule for each method
        schedule = "linear" if refine else "notebook"
    return Resolved(refine, float(strength), anchor, style, schedule, "ceil" if refine else "int",
                    s.native_size or native_long_side(model))


def target_latent_size(base_px: tuple[int, int], scale_by: float, width: int, height: int) -> tuple[int, int]:
    """Target (width, height) in pixels, multiples of 8. width/height 0: from scale_by (or
    from the other side, keeping the aspect ratio). Rounding is logged."""
    bw, bh = base_px
    if width <= 0 and height <= 0:
        want = (bw * scale_by, bh * scale_by)
    elif width > 0 and height > 0:
        want = (width, height)
    elif width > 0:
        want = (width, bh * width / bw)
    else:
        want = (bw * height / bh, height)
    w, h = hr.round_to_grid(want[0]), hr.round_to_grid(want[1])
    if (w, h) != tuple(want):
        log.info("LinFusion high-res: target %sx%s px is not a multiple of %d px (the latent grid); using %dx%d",
                 _fmt(want[0]), _fmt(want[1]), hr.LATENT_GRID, w, h)
    return w, h


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"

