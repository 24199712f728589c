"""High-resolution sampling with LinFusion: progressive SDEdit / DemoFusion-style refinement
(LinFusion High-Res Sampler, simple and advanced) and super-resolution of an IMAGE.

Integration with ComfyUI sampling: every stage runs through `comfy.sample.sample_custom`
with the stage's sigmas: the chosen scheduler's shape from the stage's start noise level
(the model's sigma at the reference timestep of the stage's strength, see `stage_sigmas`)
down to 0, so every ComfyUI sampler and scheduler works and all start at the same noise
level. The refinement wraps
the chosen sampler (a `comfy.samplers.KSAMPLER` whose sampler function is the original
one, given a model proxy). The proxy sees the sampler's state x and the sigma of every
model evaluation and does, in sigma space:

    t  = model_sampling.timestep(sigma)           (nearest training timestep, 0..999; EDM
                                                   models: the reference noise level's t)
    x <- (1 - c1) x + c1 * noise_scaling(sigma, noise, x0_upscaled)   in place, so the
         sampler steps from the blended state exactly as the reference steps from it
    D_local   = model(x)                         (CFG, ControlNets, hooks: ComfyUI's own path)
    D_dilated = model(blur(x)) with every UNet Conv2d dilated, taken back to x:
                + calculate_denoised(sigma, 0, x - blur(x))  (the reference steps the
                dilated branch's noise prediction from x, not from the blurred input)
    return (1 - c2) D_local + c2 D_dilated       (D_local alone when c2 < 0.02: skipped)

A k-diffusion step is affine in the denoised prediction for a given state, so mixing the
predictions equals mixing the two branches' step results as the reference does. Samplers
that evaluate the model once per step (euler, euler_ancestral, dpmpp_2m, the SDE samplers,
lcm, ...) reproduce the reference step; samplers with intermediate evaluations (heun,
dpm_2, dpmpp_2s_ancestral, dpmpp_sde) get the same treatment at every evaluation.

Nothing is left on the model: dilation and the low-memory feed-forward chunking are
contexts around the sampling call that restore every module, also on interrupt or error;
the low-memory cond/uncond split lives in a clone's model_options.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..linfusion import highres as hr
from ..linfusion import tiling
from .highres_checks import check_finite_output, check_inputs, check_memory, check_target
from .lowmem import LowMemory, low_memory_estimate, low_memory_unet
from .multigpu import is_band_parallel
from .schema import DISPLAY_NAMES, HIGHRES_CATEGORY, schema

log = logging.getLogger("ComfyUI-LinFusion")

METHODS = ("auto", "sdedit", "demofusion")
UPSCALE_METHODS = ("pixel", "latent")
ANCHOR_CHOICES = ("auto", "on", "off")
SIZE_CONDITIONING = ("final", "per stage")
STAGE_IMAGES = ("off", "preview", "save")
DEFAULT_VAE_TILE = 2048  # the SD1.5 notebook tiles the VAE from 4K on, with 2048 px tiles
SIMPLE_LOW_MEMORY_ABOVE = 4096  # px, long side: the simple node turns low-memory mode on above this
VAE_TILE_OVERLAP = 64  # px


# -- settings ----------------------------------------------------------------------------------
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


# -- ComfyUI pieces ----------------------------------------------------------------------------
class NoiseAxis:
    """Reference timesteps <-> the model's sigmas. Discrete models (ComfyUI's
    ModelSamplingDiscrete and its subclasses: SD1.x/2.x/XL, LCM, v-prediction) use their own
    model_sampling, which is the reference's schedule. Models without a timestep axis (EDM,
    continuous v: Playground v2.5, ModelSamplingContinuousEDM) use the signal-to-noise ratio
    the reference timestep means (SD's training schedule, linfusion.highres.reference_sigmas,
    on latents of unit scale): sigma = sigma_data x the reference sigma, since an EDM latent
    has std sigma_data (0.5 for Playground v2.5) and SNR = (sigma_data / sigma)^2. So a
    strength and DemoFusion's cosine factor mean the same SNR on every model (issue 23: the
    bare reference sigma on an EDM model was a 4x lower SNR, stage 1 at SD's t ~ 510 instead of
    301). Flow models (CONST) have no such equivalent here and are refused."""

    def __init__(self, model, node_name: str = "LinFusion high-res"):
        self.ms = model.get_model_object("model_sampling")
        self.discrete = isinstance(self.ms, comfy.model_sampling.ModelSamplingDiscrete)
        if not self.discrete and isinstance(self.ms, comfy.model_sampling.CONST):
            raise ValueError(
                f"{node_name}: this model samples by flow matching ({type(self.ms).__name__}); the high-res "
                "stages define strength as an SD-style noise level, which flow models do not have. Fix: use an "
                "SD1.x, SD2.x or SDXL-type model (eps, v-prediction or EDM sampling).")
        self.sigma_data = 1.0 if self.discrete else float(getattr(self.ms, "sigma_data", 1.0))

    def sigma(self, t: float) -> float:
        """The model's sigma at reference timestep t."""
        if self.discrete:
            return float(self.ms.sigma(torch.tensor(float(t))))
        lo, hi = float(self.ms.sigma_min), float(self.ms.sigma_max)
        return min(max(self.sigma_data * hr.reference_sigma(t), lo), hi)

    def timestep(self, sigma) -> float:
        """The reference timestep (0..999) of a sigma (a tensor or float)."""
        if self.discrete:
            return float(self.ms.timestep(torch.as_tensor(sigma).reshape(-1)[:1]).flatten()[0])
        return hr.reference_timestep_of_sigma(float(torch.as_tensor(sigma).reshape(-1)[0]) / self.sigma_data)


class _ScheduleFrom:
    """model_sampling as ComfyUI's schedulers see it, cut at sigma_start: sigma_max is
    sigma_start and the `sigmas` table ends there, so every scheduler (karras, exponential,
    kl_optimal through sigma_max; normal, sgm_uniform through timestep(sigma_max); simple,
    beta through the table) builds its own shape from sigma_start down to sigma_min."""

    def __init__(self, ms, sigma_start: float):
        self._ms = ms
        table = ms.sigmas.float().cpu()
        self.sigmas = torch.cat([table[table < sigma_start * (1 - 1e-6)], torch.tensor([sigma_start])])
        self.sigma_max = torch.tensor(sigma_start)
        self.sigma_min = ms.sigma_min

    def __getattr__(self, name):
        return getattr(self._ms, name)

    def timestep(self, sigma):
        return self._ms.timestep(sigma)

    def sigma(self, timestep):
        return self._ms.sigma(timestep)


def stage_sigmas(model, stage: hr.Stage, sampler_name: str, scheduler: str, axis: NoiseAxis | None = None,
                 ) -> torch.Tensor:
    """The sigmas of one stage: the user's scheduler with the stage's steps, from the noise
    level of the stage's reference start timestep down to 0. Every scheduler starts at the
    same sigma (issue 11: strength is a noise level, not a fraction of the chosen schedule).
    ddim_uniform gives uniform timesteps from the start to t = 1, which at 50 steps are the
    reference's own (301, 281, ..., 1 for strength 0.32)."""
    if stage.steps <= 0:
        return torch.zeros(0)
    axis = axis or NoiseAxis(model)
    start = axis.sigma(stage.start_timestep)
    steps = stage.steps
    discard = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    if discard:
        steps += 1
    if scheduler == "ddim_uniform":
        ts = torch.linspace(float(stage.start_timestep), 1.0, steps).round() if steps > 1 else torch.tensor(
            [float(stage.start_timestep)])
        sigmas = torch.tensor([axis.sigma(float(t)) for t in ts] + [0.0])
    else:
        sigmas = comfy.samplers.calculate_sigmas(_ScheduleFrom(axis.ms, start), scheduler, steps)
    sigmas = sigmas.float().cpu()
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def with_size(conds: list, size_px: tuple[int, int]) -> list:
    """SDXL conditioning with original and target size set to `size_px` (w, h) where the
    conditioning does not set them itself (CLIPTextEncodeSDXL does; plain CLIPTextEncode does
    not, and ComfyUI would then use each stage's own latent size)."""
    w, h = size_px
    out = []
    for emb, extra in conds:
        extra = dict(extra)
        for key, value in (("width", w), ("height", h), ("target_width", w), ("target_height", h)):
            extra.setdefault(key, value)
        out.append([emb, extra])
    return out


def one_cond_at_a_time(previous=None):
    """sampler_calc_cond_batch_function that evaluates each cond (positive, negative) alone,
    so the UNet never sees the doubled CFG batch."""

    def calc(args):
        out = []
        for c in args["conds"]:
            if previous is not None:
                out.append(previous({**args, "conds": [c]})[0])
            else:
                out.append(comfy.samplers.calc_cond_batch(args["model"], [c], args["input"], args["sigma"],
                                                          args["model_options"])[0])
        return out

    return calc


class _RefineModel:
    """Stands in for the sampler's model (KSamplerX0Inpaint): DemoFusion's step around it."""

    def __init__(self, inner, unet, model_sampling, noise, x0, dilation: int, scales, gaussian_sigma: float,
                 min_weight: float = 0.0, axis: NoiseAxis | None = None):
        self.inner = inner
        self.convs = hr.conv2d_layers(unet)
        self.ms = model_sampling
        self.noise, self.x0 = noise, x0
        self.dilation, self.scales, self.gaussian_sigma = dilation, scales, gaussian_sigma
        self.min_weight = min_weight
        self.timestep = axis.timestep if axis is not None else (
            lambda sigma: float(model_sampling.timestep(sigma).flatten()[0]))

    def __getattr__(self, name):  # samplers read inner_model, sigmas, noise, ... from their model
        return getattr(self.inner, name)

    def __call__(self, x, sigma, **kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        t = self.timestep(sigma)
        c1, c2, c3 = hr.cosine_weights(t, self.scales)
        if c1 > 0:
            target = self.ms.noise_scaling(sigma, self.noise, self.x0)
            x.copy_(hr.skip_residual(x, target, c1))  # the sampler's own state, as the reference's
        local = self.inner(x, sigma, **kwargs)
        if c2 <= 0 or c2 < self.min_weight or self.dilation <= 1:
            return local  # a dilated pass that would move the step by at most c2 |D_dil - D_local|
        blurred = hr.blurred_input(x, self.dilation, self.gaussian_sigma * c3)
        comfy.model_management.throw_exception_if_processing_interrupted()
        with hr.dilated_convs(self.convs, self.dilation):
            dilated = self.inner(blurred, sigma, **kwargs)
        dilated = dilated + self.ms.calculate_denoised(sigma, torch.zeros_like(x), x - blurred)
        return hr.mix_branches(local, dilated, c2)


class HighResStageSampler(comfy.samplers.Sampler):
    """A ComfyUI SAMPLER that runs `inner` (a KSAMPLER) with DemoFusion's refinement and/or
    low-memory mode (`low_memory`: its settings, None: off), for one stage."""

    def __init__(self, inner: comfy.samplers.KSAMPLER, refine: bool, dilation: int = 1,
                 scales=hr.COSINE_SCALES, gaussian_sigma: float = hr.GAUSSIAN_SIGMA,
                 low_memory: LowMemory | None = None, min_weight: float = 0.0, axis: NoiseAxis | None = None):
        self.inner = inner
        self.refine, self.dilation = refine, dilation
        self.scales, self.gaussian_sigma = tuple(scales), gaussian_sigma
        self.low_memory = low_memory
        self.min_weight, self.axis = min_weight, axis

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        base = model_wrap.inner_model  # the loaded BaseModel (object patches applied)
        unet = base.diffusion_model
        inner_fn = self.inner.sampler_function
        if self.refine:
            x0 = latent_image if latent_image is not None else torch.zeros_like(noise)

            def sampler_function(model, x, sigmas_, *args, **kwargs):
                proxy = _RefineModel(model, unet, base.model_sampling, noise, x0, self.dilation, self.scales,
                                     self.gaussian_sigma, self.min_weight, self.axis)
                return inner_fn(proxy, x, sigmas_, *args, **kwargs)
        else:
            sampler_function = inner_fn
        ks = comfy.samplers.KSAMPLER(sampler_function, self.inner.extra_options, self.inner.inpaint_options)
        low_memory = self.low_memory
        if low_memory is not None and low_memory.banded and is_band_parallel(base):
            # the banded resnets compute GroupNorm statistics of their own: not across devices
            log.info("LinFusion high-res: low_memory under LinFusion Multi-GPU: banded resnets, skip parking and "
                     "chunked LinFusion projections are off (each device holds only its band of rows); cond/uncond "
                     "one at a time and feed-forward chunks stay")
            low_memory = replace(low_memory, banded=False)
        with low_memory_unet(unet, extra_args.get("model_options"), low_memory):
            return ks.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


@contextmanager
def inner_progress_muted():
    """ComfyUI's tiled VAE functions open progress bars of their own; between stages they would
    make the node's bar jump. While this is active, new progress bars only check for an
    interrupt (as the server's hook does) and report nothing."""
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def check_only(*_args, **_kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(check_only if previous is not None else None)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


def _check_interrupt(_done: int, _total: int) -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def vae_decode(vae, latent: torch.Tensor, tile: int) -> torch.Tensor:
    """Latent (B, C, h, w) -> IMAGE (B, H, W, 3); tiled when the long side exceeds `tile` px:
    each tile decoded once by the VAE's own decode and blended into one image buffer
    (linfusion/tiling.py), which at 16K is 3.2 GB of host memory instead of several."""
    long_px = max(latent.shape[-2:]) * hr.LATENT_GRID
    with inner_progress_muted():
        if tile > 0 and long_px > tile:
            comp = vae.spacial_compression_decode()
            overlap = min(VAE_TILE_OVERLAP, tile // 4)
            return tiling.tiled_map(vae.decode, latent, max(1, tile // comp), overlap // comp, scale=(comp, 1),
                                    dims=(2, 3), out_dims=(1, 2), progress=_check_interrupt)
        return vae.decode(latent)


def vae_encode(vae, image: torch.Tensor, tile: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> latent; tiled (one encode per tile, blended in latent space) when
    the long side exceeds `tile` px. Sides are cropped to the VAE's grid, centred, as its
    own encode does."""
    image = image[..., :3]
    with inner_progress_muted():
        if tile > 0 and max(image.shape[1:3]) > tile:
            comp = vae.spacial_compression_encode()
            h, w = image.shape[1] // comp * comp, image.shape[2] // comp * comp
            dy, dx = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
            image = image[:, dy:dy + h, dx:dx + w]
            tile = max(comp, tile // comp * comp)
            overlap = min(VAE_TILE_OVERLAP, tile // 4) // comp * comp
            return tiling.tiled_map(vae.encode, image, tile, overlap, scale=(1, comp), dims=(1, 2),
                                    out_dims=(2, 3), align=comp, progress=_check_interrupt)
        return vae.encode(image)


def resize_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bicubic resize of an IMAGE (B, H, W, C), clamped to [0, 1] (bicubic overshoots)."""
    out = comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "bicubic", "disabled").movedim(1, -1)
    if out.untyped_storage().data_ptr() == image.untyped_storage().data_ptr():
        return out.clamp(0.0, 1.0)  # not a new tensor: the caller's image stays as it is
    return out.clamp_(0.0, 1.0)  # in place: a 16K image is 3.2 GB, a second copy is not needed


def resize_latent(latent: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return comfy.utils.common_upscale(latent, width, height, "bicubic", "disabled")


# -- the stage loop ----------------------------------------------------------------------------
def run_stages(model, positive, negative, latent: dict | None, vae, target_px: tuple[int, int],
               s: HighResSettings, image: torch.Tensor | None = None, single_stage: bool = False,
               node_name: str = "LinFusion high-res", stage_image=None) -> tuple[dict, HighResReport]:
    """Upscale `latent` (or, for super-resolution, `image`) to `target_px` (w, h) in stages.
    Returns the final LATENT dict and a report. `stage_image(stage, IMAGE)`, if given, receives
    the decoded result of every stage but the last, one at a time (the pixel upscale's own
    decode when there is one): nothing keeps them, so at 16K only one stage image exists."""
    res = resolve(model, s)
    if s.upscale_method == "pixel" or image is not None:
        if vae is None:
            raise ValueError("LinFusion high-res: upscale_method 'pixel' needs a VAE; connect one, or choose "
                             "'latent' to upscale latents directly.")
    if stage_image is not None and vae is None:
        raise ValueError(f"{node_name}: stage_images needs a VAE to decode the stages; connect one, or set "
                         "stage_images to 'off'.")
    check_target(node_name, target_px, "scale_by / width / height")
    # plan and size check first: nothing is encoded, decoded or allocated for a plan that cannot run
    if latent is not None:
        base_hw = tuple(latent["samples"].shape[-2:])
        batch = latent["samples"].shape[0]
    else:  # super-resolution: the input's size on the latent grid
        base_hw = tuple(hr.round_to_grid(v) // hr.LATENT_GRID for v in image.shape[1:3])
        batch = image.shape[0]
    tw, th = target_px
    axis = NoiseAxis(model, node_name)
    stages = hr.plan_stages(base_hw, (th // hr.LATENT_GRID, tw // hr.LATENT_GRID), s.steps, res.strength,
                            res.schedule, single_stage, native_long=res.native_px // hr.LATENT_GRID,
                            rounding=res.rounding)
    # super-resolution decodes its output at the target size whatever the upscale method
    check_memory(node_name, model, stages, batch, s.cfg, s.low_memory,
                 pixel_space=s.upscale_method == "pixel" or image is not None, latent_possible=image is None)
    if image is not None and (s.upscale_method == "latent" or not single_stage):
        latent = {"samples": vae_encode(vae, _grid_image(image), s.vae_tile_size)}
    if latent is not None:
        base = latent["samples"]
        base = comfy.sample.fix_empty_latent_channels(model, base)
    else:  # super-resolution in one stage from pixels
        base = None
    all_sigmas = [stage_sigmas(model, st, s.sampler_name, s.scheduler, axis) for st in stages]
    total = sum(len(sg) - 1 for sg in all_sigmas if len(sg) > 1)
    report = HighResReport(stages, progress_total=total)
    report.start_sigmas = [float(sg[0]) if len(sg) else 0.0 for sg in all_sigmas]
    log.info("LinFusion high-res: %s, %d stage(s) %s -> %s px; strengths %s; steps %s of %d; start t %s (sigma %s); "
             "dilation %s; %s upscale%s",
             res.style, len(stages), f"{base_hw[1] * hr.LATENT_GRID}x{base_hw[0] * hr.LATENT_GRID}",
             " -> ".join("x".join(map(str, st.pixel_size)) for st in stages),
             ", ".join(f"{st.strength:.3g}" for st in stages), ", ".join(str(st.steps) for st in stages), s.steps,
             ", ".join(str(st.start_timestep) for st in stages), ", ".join(f"{v:.3g}" for v in report.start_sigmas),
             ", ".join(str(st.dilation) for st in stages) if res.refine else "off", s.upscale_method,
             "; low memory" if s.low_memory else "")
    if is_sdxl_like(model) and s.size_conditioning == "final":
        # the reference conditions every stage on the final size (original_size = target_size)
        positive, negative = (with_size(c, target_px) for c in (positive, negative))

    sampling_model = model
    if s.low_memory:
        sampling_model = model.clone()
        previous = sampling_model.model_options.get("sampler_calc_cond_batch_function")
        sampling_model.set_model_sampler_calc_cond_batch_function(one_cond_at_a_time(previous))
        sampling_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "linfusion_low_memory",
                                            low_memory_estimate())

    previewer = latent_preview.get_previewer(model.load_device, model.get_model_object("latent_format"))
    pbar = comfy.utils.ProgressBar(total)
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    batch_inds = latent.get("batch_index") if latent is not None else None
    anchor = hr.channel_stats(base.float()) if (res.anchor and base is not None and not single_stage) else None
    current_latent, current_image = base, (image if base is None else None)
    done = 0
    for st, sigmas in zip(stages, all_sigmas):
        comfy.model_management.throw_exception_if_processing_interrupted()
        t0 = time.perf_counter()
        w_px, h_px = st.pixel_size
        if s.upscale_method == "latent" and current_latent is not None:
            init = resize_latent(current_latent, st.height, st.width)
        else:
            pixels = current_image if current_image is not None else vae_decode(vae, current_latent, s.vae_tile_size)
            if stage_image is not None and current_image is None and st.index > 1:
                stage_image(stages[st.index - 2], pixels)  # the previous stage's result, decoded anyway
            current_latent = current_image = None
            init = vae_encode(vae, resize_image(pixels, w_px, h_px), s.vae_tile_size)
            del pixels
        init = init.to(comfy.model_management.intermediate_device())
        if anchor is None and res.anchor:
            anchor = hr.channel_stats(init.float())  # super-resolution: the upscaled input's statistics
        if st.steps == 0:
            log.info("LinFusion high-res: stage %d (%dx%d px) has 0 steps at strength %.3g: upscaled only",
                     st.index, w_px, h_px, st.strength)
            check_finite_output(node_name, "upscale", init, st)
            current_latent = init
            report.shapes.append(tuple(init.shape))
            report.seconds.append(time.perf_counter() - t0)
            continue
        noise = comfy.sample.prepare_noise(init, s.seed, batch_inds)
        sampler = comfy.samplers.sampler_object(s.sampler_name)
        if res.refine or s.low_memory:
            sampler = HighResStageSampler(sampler, res.refine, st.dilation, s.cosine_scales, s.gaussian_sigma,
                                          LowMemory() if s.low_memory else None, s.dilated_min_weight, axis)
        offset, n = done, len(sigmas) - 1

        def callback(step, x0, _x, _total, offset=offset, n=n):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            # adaptive samplers may report more steps than planned: stay inside this stage's share
            pbar.update_absolute(offset + min(step + 1, n), total, preview)

        samples = comfy.sample.sample_custom(sampling_model, noise, s.cfg, sampler, sigmas, positive, negative, init,
                                             callback=callback, disable_pbar=disable_pbar, seed=s.seed)
        del noise, init
        if res.anchor and anchor is not None:
            samples = hr.restandardize(samples, *anchor)
        check_finite_output(node_name, "sampling", samples, st)
        done = offset + n
        pbar.update_absolute(done, total)  # the stage is complete whatever the sampler reported
        current_latent = samples
        if stage_image is not None and st.index < len(stages) and s.upscale_method == "latent":
            stage_image(st, vae_decode(vae, samples, s.vae_tile_size))
        report.shapes.append(tuple(samples.shape))
        report.seconds.append(time.perf_counter() - t0)
        log.info("LinFusion high-res: stage %d/%d %dx%d px, %d steps, %.1f s", st.index, len(stages), w_px, h_px,
                 n, report.seconds[-1])
        comfy.model_management.soft_empty_cache()
    if current_latent is None:  # only possible with an image and nothing run
        current_latent = vae_encode(vae, current_image, s.vae_tile_size)
    out = dict(latent) if latent is not None else {}
    out.pop("noise_mask", None)  # sized for the base latent
    out["samples"] = current_latent
    return out, report


def _grid_image(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE resized to the nearest multiple of the latent grid (logged when it changes)."""
    h, w = image.shape[1:3]
    gw, gh = hr.round_to_grid(w), hr.round_to_grid(h)
    if (gw, gh) == (w, h):
        return image
    log.info("LinFusion super-resolution: input %dx%d px resized to %dx%d (a multiple of %d px)", w, h, gw, gh,
             hr.LATENT_GRID)
    return resize_image(image, gw, gh)


# -- nodes -------------------------------------------------------------------------------------
# What users type when they look for these nodes (ComfyUI releases whose Schema has search aliases).
SEARCH_ALIASES = ["hires fix", "highres", "upscale", "ultra resolution", "16K", "sdedit", "demofusion"]
TIP_STEPS = ("Steps of the FULL schedule. Each stage runs steps x its strength: rounded up for demofusion and "
             "super-resolution (SDXL pipelines), down for sdedit (diffusers img2img), at least 1 "
             "(reference, 50 steps: 20/15/10/5 for SD1.x, 16/12/8/4 for SDXL over four stages).")
TIP_METHOD = (
    "auto: 'demofusion' for SDXL-like models, 'sdedit' for SD1.x/SD2.x (the LinFusion reference's choices). "
    "sdedit: each stage is plain img2img of the upscaled image (SD1.5 notebook). demofusion: each step also "
    "pulls the state toward the noised upscaled image (skip residual, cosine_scale_1) and mixes in a "
    "global-structure branch run with dilated convolutions on a blurred latent (cosine_scale_2, "
    "cosine_scale_3, gaussian_sigma): two UNet evaluations per step."
)
TIP_STRENGTH = ("Denoising strength of the first upscaling stage, as a noise level: each stage starts at the "
                "noise the reference's 50-step schedule has at that strength (0.32 -> t 301, 0.24 -> 221, 0.16 -> "
                "141, 0.08 -> 61), whatever the scheduler; the scheduler shapes the steps from there down. "
                "0 = the reference value for the method: 0.4 for sdedit (SD1.5 notebook: 0.4, 0.3, 0.2, 0.1), "
                "0.32 for demofusion (SDXL: 0.32, 0.24, 0.16, 0.08). Higher changes the image more.")
TIP_SCHEDULE = ("How the strength falls from stage to stage. auto: notebook for sdedit, linear for demofusion (the "
                "reference's rules). notebook: 0.1 less each stage (0.4, 0.3, 0.2, 0.1; at least "
                f"{hr.MIN_STRENGTH}), the SD1.5 notebook. linear: stage k of n uses strength x (n-k+1)/n (the SDXL "
                "pipeline; 0.32, 0.24, 0.16, 0.08). constant: every stage uses the same strength.")
TIP_SIZE_COND = ("SDXL-like models only: the size the model is told (original and target size). final: the final "
                 "image's size at every stage, as the reference. per stage: each stage's own size (ComfyUI's "
                 "default for plain CLIPTextEncode). Sizes a CLIPTextEncodeSDXL sets are kept.")
TIP_STAGE_IMAGES = ("Images of the stages before the last. preview: shown on this node (temporary files); save: "
                    "written to the output folder as LinFusion/stage_<k>. Each stage is decoded (tiled like the "
                    "upscale), written and dropped before the next, so a 16K run never holds them all; pixel "
                    "upscaling reuses the decode it makes anyway. Needs the VAE.")
TIP_NATIVE = ("The model's native resolution (long side, px) that the dilated branch's dilation counts from: "
              "dilation = ceil(stage long side / this). 0 = the family's: 512 SD1.x, 768 SD2.x (v), 1024 SDXL. "
              "Set it for fine-tunes trained at another size.")
TIP_UPSCALE = ("pixel: decode, bicubic x2, encode between stages (the reference; VAE tiled above vae_tile_size). "
               "latent: bicubic on the latent, no VAE round trip (faster, softer).")
TIP_LOW_MEM = ("Lower peak memory for very large images (the reference's 16K-in-24GB settings and more): positive "
               "and negative are evaluated one after the other instead of as one doubled batch, feed-forward and "
               f"cross-attention run on at least {LowMemory.token_chunks} chunks of tokens, LinFusion reduces "
               "keys/values to their summary before streaming the queries, the resnets, upsamplers and output head "
               "of the two largest levels run in bands of rows without building the decoder's skip "
               "concatenations, and on a GPU the UNet's skip connections wait in CPU memory. Same result (up to "
               "float rounding). "
               "Projected fp16 peak: SD1.5 16384x8192 about 10.6 GiB, SDXL 16384x16384 about 13.9 GiB "
               "(bench/RESULTS.md).")
TIP_TILE = ("Images whose long side exceeds this many pixels are VAE-decoded/encoded in tiles of this size "
            "(the SD1.5 notebook tiles from 4K on with 2048 px tiles), each tile once, blended into one image "
            "buffer. GPU memory grows with the tile (SD VAE decode: ~5 GiB at 2048 px, ~1.3 GiB at 1024 px), "
            "not with the image. 0 = never tile.")


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
