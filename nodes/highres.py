"""High-resolution sampling with LinFusion: progressive SDEdit / DemoFusion-style refinement
(LinFusion High-Res Sampler, simple and advanced) and super-resolution of an IMAGE. This file
holds the node classes and their schemas; the work lives beside it, one job per file:

    highres_settings.py   the settings, every 'auto' resolved for the model, the target size
    highres_sampling.py   ComfyUI sampling adapters: reference timesteps <-> sigmas, stage sigmas
    highres_refine.py     DemoFusion's step as a ComfyUI SAMPLER around the chosen sampler
    highres_vae.py        tiled VAE decode/encode and the resizes between stages
    highres_stages.py     the stage loop (run_stages): plan, sampling model, stages, progress
    highres_checks.py     input, size, memory and finiteness checks
    highres_tips.py       tooltip prose

Integration with ComfyUI sampling: every stage runs through `comfy.sample.sample_custom`
with the stage's sigmas: the chosen scheduler's shape from the stage's start noise level
(the model's sigma at the reference timestep of the stage's strength, see `stage_sigmas`)
down to 0, so every ComfyUI sampler and scheduler works and all start at the same noise
level. The refinement wraps the chosen sampler with a model proxy (highres_refine.py).

Tests and benches still reach tiling, _RefineModel, NoiseAxis, stage_sigmas, resolve,
VAE_TILE_OVERLAP, resize_image and vae_encode through this module (re-exported, noqa F401).
"""

from __future__ import annotations

import dataclasses
import logging

import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ..linfusion import highres as hr
from ..linfusion import tiling  # noqa: F401 (re-exported, as below)
from .highres_checks import check_finite_output, check_inputs
from .highres_refine import _RefineModel  # noqa: F401
from .highres_sampling import NoiseAxis, stage_sigmas  # noqa: F401
from .highres_settings import (
    ANCHOR_CHOICES,
    DEFAULT_VAE_TILE,
    METHODS,
    SIZE_CONDITIONING,
    STAGE_IMAGES,
    UPSCALE_METHODS,
    HighResSettings,
    resolve,  # noqa: F401
    target_latent_size,
)
from .highres_stages import run_stages
from .highres_tips import (
    SEARCH_ALIASES,
    TIP_LOW_MEM,
    TIP_METHOD,
    TIP_NATIVE,
    TIP_SCHEDULE,
    TIP_SIZE_COND,
    TIP_STAGE_IMAGES,
    TIP_STEPS,
    TIP_STRENGTH,
    TIP_TILE,
    TIP_UPSCALE,
)
from .highres_vae import VAE_TILE_OVERLAP, resize_image, vae_decode, vae_encode  # noqa: F401
from .schema import DISPLAY_NAMES, HIGHRES_CATEGORY, schema

log = logging.getLogger("ComfyUI-LinFusion")

SIMPLE_LOW_MEMORY_ABOVE = 4096  # px, long side: the simple node turns low-memory mode on above this


def _sampling_inputs() -> list:
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Noise seed; every stage uses the same seed (as the reference)."),
        io.Int.Input("steps", display_name="steps (full schedule)", default=50, min=1, max=10000, tooltip=TIP_STEPS),
        io.Float.Input("cfg", default=hr.GUIDANCE, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale. 7.5: every published LinFusion result (SD1.5 and "
                               "SDXL; the SDXL pipeline's bare default is 5). Lower it if large SDXL images look "
                               "over-saturated."),
        io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                       tooltip="Any ComfyUI sampler."),
        io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                       tooltip="Any ComfyUI scheduler; each stage runs its shape from the stage's start noise "
                               "level down. ddim_uniform reproduces the reference's timesteps (at 50 steps: "
                               "301, 281, ..., 1 for strength 0.32)."),
    ]


def _target_inputs(default_scale: float) -> list:
    return [
        io.Float.Input("scale_by", default=default_scale, min=1.0, max=64.0, step=0.25,
                       tooltip="Target size as a multiple of the input size (used when width and height are 0). "
                               "Stages double the size until the target; the last lands on it exactly."),
        io.Int.Input("width", default=0, min=0, max=65536, step=8,
                     tooltip="Target width in pixels; 0 = from scale_by (or from height, keeping the aspect). "
                             "Rounded to a multiple of 8 (logged)."),
        io.Int.Input("height", default=0, min=0, max=65536, step=8,
                     tooltip="Target height in pixels; 0 = from scale_by (or from width, keeping the aspect). "
                             "Rounded to a multiple of 8 (logged)."),
    ]


def _refine_inputs() -> list:
    s1, s2, s3 = hr.COSINE_SCALES
    return [
        io.Combo.Input("method", options=list(METHODS), default="auto", tooltip=TIP_METHOD),
        io.Float.Input("upscale_strength", display_name="upscale_strength (0 = reference)", default=0.0, min=0.0,
                       max=1.0, step=0.01, tooltip=TIP_STRENGTH),
        io.Combo.Input("strength_schedule", options=list(hr.STRENGTH_SCHEDULES), default="auto",
                       tooltip=TIP_SCHEDULE),
        io.Combo.Input("upscale_method", options=list(UPSCALE_METHODS), default="pixel", tooltip=TIP_UPSCALE),
        io.Float.Input("cosine_scale_1", default=s1, min=0.0, max=100.0, step=0.1,
                       tooltip="demofusion: skip-residual weight cf^scale (cf falls from 1 to 0 along the "
                               "schedule). Higher = weaker pull toward the upscaled image. Reference 3."),
        io.Float.Input("cosine_scale_2", default=s2, min=0.0, max=100.0, step=0.1,
                       tooltip="demofusion: weight cf^scale of the dilated (global structure) branch. Higher = "
                               "weaker. Reference 1."),
        io.Float.Input("cosine_scale_3", default=s3, min=0.0, max=100.0, step=0.1,
                       tooltip="demofusion: blur of the dilated branch's input, sigma x (0.99 cf^scale + 0.01). "
                               "Reference 1."),
        io.Float.Input("gaussian_sigma", default=hr.GAUSSIAN_SIGMA, min=0.01, max=10.0, step=0.01,
                       tooltip="demofusion: base sigma of that blur (kernel 2r-1 for dilation r). 0.8: every "
                               "published run (the pipeline's bare default is 1.0)."),
        io.Combo.Input("anchor_stats", options=list(ANCHOR_CHOICES), default="auto",
                       tooltip="Re-standardise each stage's result to the per-channel mean/std of the base latent "
                               "(keeps colours from drifting). auto: on for demofusion, off for sdedit (as the "
                               "reference)."),
        io.Boolean.Input("low_memory", default=False, tooltip=TIP_LOW_MEM),
        io.Int.Input("vae_tile_size", default=DEFAULT_VAE_TILE, min=0, max=16384, step=64, tooltip=TIP_TILE),
        # optional: API prompts written before these inputs existed keep working (defaults apply)
        io.Combo.Input("size_conditioning", options=list(SIZE_CONDITIONING), default="final", optional=True,
                       tooltip=TIP_SIZE_COND),
        io.Int.Input("native_size", default=0, min=0, max=4096, step=8, optional=True, tooltip=TIP_NATIVE),
        io.Combo.Input("stage_images", options=list(STAGE_IMAGES), default="off", optional=True,
                       tooltip=TIP_STAGE_IMAGES),
    ]


def _conditioning_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The model, ideally with Apply LinFusion (linear attention makes large "
                                        "sizes affordable)."),
        io.Conditioning.Input("positive", tooltip="What the image shows (CLIP Text Encode); every stage uses it, "
                                                  "ControlNets and other conditioning included."),
        io.Conditioning.Input("negative", tooltip="What to avoid. For SDXL the reference uses zeros: "
                                                  "ConditioningZeroOut of the positive."),
    ]


def _settings(seed, steps, cfg, sampler_name, scheduler, **kw) -> HighResSettings:
    scales = (kw.pop("cosine_scale_1", hr.COSINE_SCALES[0]), kw.pop("cosine_scale_2", hr.COSINE_SCALES[1]),
              kw.pop("cosine_scale_3", hr.COSINE_SCALES[2]))
    anchor = kw.pop("anchor_stats", "auto")
    return HighResSettings(seed, steps, cfg, sampler_name, scheduler, cosine_scales=scales, anchor=anchor, **kw)


_SETTING_INPUTS = ("seed", "steps", "cfg", "sampler_name", "scheduler", "method", "upscale_strength",
                   "strength_schedule", "upscale_method", "cosine_scale_1", "cosine_scale_2", "cosine_scale_3",
                   "gaussian_sigma", "anchor_stats", "low_memory", "vae_tile_size", "size_conditioning",
                   "native_size")


def _pick(values: dict, names) -> dict:
    return {k: values[k] for k in names if k in values}


# The names messages use: the display names carry search words too (schema.py), which would
# only clutter an error line.
MESSAGE_NAMES = {"LinFusionHighResSampler": "LinFusion High-Res Sampler",
                 "LinFusionHighResSamplerAdvanced": "LinFusion High-Res Sampler (advanced)",
                 "LinFusionSuperResolution": "LinFusion Super-Resolution"}


def _name(cls) -> str:
    return MESSAGE_NAMES[cls.define_schema().node_id]


def _checked(cls, values: dict) -> dict:
    """Every input checked against the node's schema before anything runs (issue 16); returns
    them with whole floats on INT inputs made ints."""
    values = {k: v for k, v in values.items() if k not in ("cls", "kw", "__class__")}
    model = values.get("model")
    fmt = model.get_model_object("latent_format") if hasattr(model, "get_model_object") else None
    named = dataclasses.replace(cls.define_schema(), display_name=_name(cls))
    return check_inputs(named, values, getattr(fmt, "latent_channels", None))


class StageImages:
    """stage_images: writes each stage's decoded image as it comes (PNG, temp or output folder)
    and keeps only the file names for the node's UI."""

    def __init__(self, node_cls, mode: str):
        self.node_cls, self.mode = node_cls, mode
        self.results: list = []

    @property
    def hook(self):
        return None if self.mode == "off" else self._save

    def _save(self, stage: hr.Stage, image: torch.Tensor) -> None:
        w, h = stage.pixel_size
        if self.mode == "save":
            prefix, folder, level = f"LinFusion/stage_{stage.index}_{w}x{h}", io.FolderType.output, 4
        else:
            prefix, folder, level = f"LinFusion_stage_{stage.index}_temp", io.FolderType.temp, 1
        cls = self.node_cls if getattr(self.node_cls, "hidden", None) else None  # PNG metadata from the prompt
        self.results += ui.ImageSaveHelper.save_images(image, prefix, folder, cls, compress_level=level)
        log.info("LinFusion high-res: stage %d image (%dx%d px) written to the %s folder", stage.index, w, h,
                 folder.value)

    def ui(self):
        return ui.SavedImages(self.results) if self.results else None


def _latent_px(latent: dict) -> tuple[int, int]:
    h, w = latent["samples"].shape[-2:]
    return w * hr.LATENT_GRID, h * hr.LATENT_GRID


class LinFusionHighResSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LinFusionHighResSampler",
            search_aliases=SEARCH_ALIASES,
            display_name=DISPLAY_NAMES["LinFusionHighResSampler"],
            category=HIGHRES_CATEGORY,
            description=(
                "Upscales a generated latent to a high resolution in x2 stages, re-denoising each stage with the "
                "model (LinFusion reference pipelines). Defaults follow the model: SD1.x/2.x get progressive "
                "SDEdit (strengths 0.4, 0.3, 0.2, 0.1 from a 512 px base), SDXL gets DemoFusion-style refinement "
                "(0.32, 0.24, 0.16, 0.08 from a 1024 px base). Low-memory mode switches on above "
                f"{SIMPLE_LOW_MEMORY_ABOVE} px. The advanced node exposes every setting."
            ),
            inputs=[
                *_conditioning_inputs(),
                io.Latent.Input("latent_image", tooltip="The base image's latent (e.g. from a KSampler)."),
                io.Vae.Input("vae", tooltip="Decodes and re-encodes between stages (pixel-space upscaling)."),
                io.Float.Input("scale_by", default=4.0, min=1.0, max=64.0, step=0.25,
                               tooltip="Final size as a multiple of the base (4 = two x2 stages)."),
                *_sampling_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="The final high-resolution latent.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, vae, scale_by, seed, steps, cfg, sampler_name,
                scheduler) -> io.NodeOutput:
        v = _checked(cls, locals())
        target = target_latent_size(_latent_px(latent_image), v["scale_by"], 0, 0)
        s = _settings(v["seed"], v["steps"], v["cfg"], sampler_name, scheduler,
                      low_memory=max(target) > SIMPLE_LOW_MEMORY_ABOVE)
        out, _ = run_stages(model, positive, negative, latent_image, vae, target, s, node_name=_name(cls))
        return io.NodeOutput(out)


class LinFusionHighResSamplerAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LinFusionHighResSamplerAdvanced",
            search_aliases=SEARCH_ALIASES,
            display_name=DISPLAY_NAMES["LinFusionHighResSamplerAdvanced"],
            category=HIGHRES_CATEGORY,
            description=(
                "High-resolution generation from a base latent in x2 stages: progressive SDEdit or DemoFusion-style "
                "refinement (skip residual, dilated global branch, statistics anchoring), as in the LinFusion "
                "reference. One progress bar over all stages with previews; works with every sampler and "
                "scheduler; the model is left as it came."
            ),
            inputs=[
                *_conditioning_inputs(),
                io.Latent.Input("latent_image", tooltip="The base image's latent (e.g. from a KSampler)."),
                io.Vae.Input("vae", optional=True, tooltip="Needed for upscale_method 'pixel'."),
                *_target_inputs(4.0),
                *_sampling_inputs(),
                *_refine_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="The final high-resolution latent.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, scale_by, width, height, seed, steps, cfg,
                sampler_name, scheduler, vae=None, **kw) -> io.NodeOutput:
        v = _checked(cls, {**locals(), **kw})
        target = target_latent_size(_latent_px(latent_image), v["scale_by"], v["width"], v["height"])
        saver = StageImages(cls, v.get("stage_images") or "off")
        out, _ = run_stages(model, positive, negative, latent_image, vae, target,
                            _settings(**_pick(v, _SETTING_INPUTS)), node_name=_name(cls), stage_image=saver.hook)
        return io.NodeOutput(out, ui=saver.ui())


class LinFusionSuperResolution(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LinFusionSuperResolution",
            search_aliases=["upscale", "upscale image", "super resolution", "hires", "img2img upscale", "demofusion"],
            display_name=DISPLAY_NAMES["LinFusionSuperResolution"],
            category=HIGHRES_CATEGORY,
            description=(
                "Upscales an existing image with the model: 'single' goes straight to the target in one stage "
                "(the reference super-resolution pipeline: bicubic to the target, encode, refine with dilation "
                "ceil(target long side / the model's native long side, 1024 for SDXL)); 'progressive' runs x2 "
                "stages like the high-res sampler. The reference's only repeated super-resolution (its low-memory "
                "SDXL notebook: x2 calls at 0.32, 0.24, 0.16, 0.08, the linear schedule, each conditioned on its "
                "own output size) is stages 'progressive' with strength_schedule 'auto' (linear for demofusion) "
                "and size_conditioning 'per stage', in one node."
            ),
            inputs=[
                *_conditioning_inputs(),
                io.Image.Input("image", tooltip="Any size; rounded to a multiple of 8 px if needed (logged)."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the image and decodes the result."),
                *_target_inputs(2.0),
                io.Combo.Input("stages", options=["single", "progressive"], default="single",
                               tooltip=("single: one stage to the target (the reference pipeline). progressive: x2 "
                                        "stages, with strength_schedule auto/linear the reference notebook's chain "
                                        "(0.32, 0.24, 0.16, 0.08 over four x2 stages).")),
                *_sampling_inputs(),
                *_refine_inputs(),
            ],
            outputs=[io.Image.Output(display_name="IMAGE"), io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, positive, negative, image, vae, scale_by, width, height, stages, seed, steps, cfg,
                sampler_name, scheduler, **kw) -> io.NodeOutput:
        v = _checked(cls, {**locals(), **kw})
        image = v["image"]  # float32 (an 8-bit or bool image from a non-conforming node converted)
        h, w = image.shape[1:3]
        target = target_latent_size((w, h), v["scale_by"], v["width"], v["height"])
        s = _settings(**_pick(v, _SETTING_INPUTS))
        saver = StageImages(cls, v.get("stage_images") or "off")
        out, _ = run_stages(model, positive, negative, None, vae, target, s, image=image,
                            single_stage=stages == "single", node_name=_name(cls), stage_image=saver.hook)
        decoded = vae_decode(vae, out["samples"], s.vae_tile_size)
        check_finite_output(_name(cls), "VAE decode", decoded)
        return io.NodeOutput(decoded, out, ui=saver.ui())


NODES = [LinFusionHighResSampler, LinFusionHighResSamplerAdvanced, LinFusionSuperResolution]
