"""The high-res stage loop: `run_stages` upscales a latent (or, for super-resolution, an image)
to the target in x2 stages, each run through `comfy.sample.sample_custom` with the stage's
sigmas (nodes/highres_sampling.py). Its steps, in order: the plan (settings resolved, stages
planned, sizes and memory checked before anything is encoded), the stages' sigmas, the
sampling model (a low-memory clone), then per stage: stage start (the previous result upscaled
into the stage's init latent), sample a stage, and progress (one bar over all stages, with
previews).

Nothing is left on the model: dilation and the low-memory feed-forward chunking are
contexts around the sampling call that restore every module, also on interrupt or error;
the low-memory cond/uncond split lives in a clone's model_options.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..linfusion import highres as hr
from .highres_checks import check_finite_output, check_memory, check_target
from .highres_refine import HighResStageSampler
from .highres_sampling import NoiseAxis, one_cond_at_a_time, stage_sigmas, with_size
from .highres_settings import HighResReport, HighResSettings, Resolved, is_sdxl_like, resolve
from .highres_vae import grid_image, resize_image, resize_latent, vae_decode, vae_encode
from .lowmem import LowMemory, low_memory_estimate

log = logging.getLogger("ComfyUI-LinFusion")


def run_stages(model, positive, negative, latent: dict | None, vae, target_px: tuple[int, int],
               s: HighResSettings, image: torch.Tensor | None = None, single_stage: bool = False,
               node_name: str = "LinFusion high-res", stage_image=None) -> tuple[dict, HighResReport]:
    """Upscale `latent` (or, for super-resolution, `image`) to `target_px` (w, h) in stages.
    Returns the final LATENT dict and a report. `stage_image(stage, IMAGE)`, if given, receives
    the decoded result of every stage but the last, one at a time (the pixel upscale's own
    decode when there is one): nothing keeps them, so at 16K only one stage image exists."""
    plan = plan_run(model, latent, vae, target_px, s, image, single_stage, node_name, stage_image)
    if image is not None and (s.upscale_method == "latent" or not single_stage):
        latent = {"samples": vae_encode(vae, grid_image(image), s.vae_tile_size)}
    base = comfy.sample.fix_empty_latent_channels(model, latent["samples"]) if latent is not None else None
    schedule(model, plan, s)
    if is_sdxl_like(model) and s.size_conditioning == "final":
        # the reference conditions every stage on the final size (original_size = target_size)
        positive, negative = (with_size(c, target_px) for c in (positive, negative))
    run = StageRun(model, plan, s, (positive, negative), vae, stage_image)
    run.start(base, image, latent.get("batch_index") if latent is not None else None)
    for st, sigmas in zip(plan.stages, plan.sigmas):
        run.stage(st, sigmas)
    return run.result(latent), plan.report


# -- plan ----------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """What a run decided before any work: the settings resolved for the model, the stages, the
    noise axis; `schedule` adds each stage's sigmas and the report that collects what it did."""

    res: Resolved
    axis: NoiseAxis
    stages: list[hr.Stage]
    base_hw: tuple[int, int]  # the base latent's (h, w)
    single_stage: bool
    node_name: str
    sigmas: list[torch.Tensor] = field(default_factory=list)
    report: HighResReport | None = None


def plan_run(model, latent: dict | None, vae, target_px: tuple[int, int], s: HighResSettings,
             image: torch.Tensor | None, single_stage: bool, node_name: str, stage_image) -> StagePlan:
    """The stages of a run, with every input, the target size and the memory it needs checked
    first: nothing is encoded, decoded or allocated for a plan that cannot run."""
    res = resolve(model, s)
    _check_vae(s, vae, image is not None, stage_image is not None, node_name)
    check_target(node_name, target_px, "scale_by / width / height")
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
    return StagePlan(res, axis, stages, base_hw, single_stage, node_name)


def _check_vae(s: HighResSettings, vae, has_image: bool, has_stage_images: bool, node_name: str) -> None:
    if (s.upscale_method == "pixel" or has_image) and vae is None:
        raise ValueError("LinFusion high-res: upscale_method 'pixel' needs a VAE; connect one, or choose "
                         "'latent' to upscale latents directly.")
    if has_stage_images and vae is None:
        raise ValueError(f"{node_name}: stage_images needs a VAE to decode the stages; connect one, or set "
                         "stage_images to 'off'.")


def schedule(model, plan: StagePlan, s: HighResSettings) -> None:
    """Each stage's sigmas, the progress total over all stages (the plan's report) and the
    run's log line."""
    plan.sigmas = [stage_sigmas(model, st, s.sampler_name, s.scheduler, plan.axis) for st in plan.stages]
    total = sum(len(sg) - 1 for sg in plan.sigmas if len(sg) > 1)
    plan.report = HighResReport(plan.stages, progress_total=total)
    plan.report.start_sigmas = [float(sg[0]) if len(sg) else 0.0 for sg in plan.sigmas]
    stages, res, (bh, bw) = plan.stages, plan.res, plan.base_hw
    log.info("LinFusion high-res: %s, %d stage(s) %s -> %s px; strengths %s; steps %s of %d; start t %s (sigma %s); "
             "dilation %s; %s upscale%s",
             res.style, len(stages), f"{bw * hr.LATENT_GRID}x{bh * hr.LATENT_GRID}",
             " -> ".join("x".join(map(str, st.pixel_size)) for st in stages),
             ", ".join(f"{st.strength:.3g}" for st in stages), ", ".join(str(st.steps) for st in stages), s.steps,
             ", ".join(str(st.start_timestep) for st in stages),
             ", ".join(f"{v:.3g}" for v in plan.report.start_sigmas),
             ", ".join(str(st.dilation) for st in stages) if res.refine else "off", s.upscale_method,
             "; low memory" if s.low_memory else "")


# -- sampling model ------------------------------------------------------------------------------
def sampling_model(model, low_memory: bool):
    """The model the stages sample: the model itself, or for low memory a clone that evaluates
    positive and negative one at a time and estimates its memory for that."""
    if not low_memory:
        return model
    clone = model.clone()
    previous = clone.model_options.get("sampler_calc_cond_batch_function")
    clone.set_model_sampler_calc_cond_batch_function(one_cond_at_a_time(previous))
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "linfusion_low_memory",
                               low_memory_estimate())
    return clone


# -- progress ------------------------------------------------------------------------------------
class StageProgress:
    """One progress bar over all stages, with previews: each stage reports inside its own share."""

    def __init__(self, model, total: int):
        self.previewer = latent_preview.get_previewer(model.load_device, model.get_model_object("latent_format"))
        self.bar = comfy.utils.ProgressBar(total)
        self.disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
        self.total, self.done = total, 0

    def callback(self, n: int):
        """The sampler callback of the next stage, of `n` steps."""
        previewer, bar, offset, total = self.previewer, self.bar, self.done, self.total

        def callback(step, x0, _x, _total):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            # adaptive samplers may report more steps than planned: stay inside this stage's share
            bar.update_absolute(offset + min(step + 1, n), total, preview)

        return callback

    def stage_done(self, n: int) -> None:
        self.done += n
        self.bar.update_absolute(self.done, self.total)  # the stage is complete whatever the sampler reported


# -- the stages ----------------------------------------------------------------------------------
class StageRun:
    """What one stage hands the next: the current result (a latent, or the input image before a
    super-resolution's first stage), the anchor statistics and the progress."""

    def __init__(self, model, plan: StagePlan, s: HighResSettings, conds: tuple, vae, stage_image=None):
        self.plan, self.report, self.s, self.vae = plan, plan.report, s, vae
        self.positive, self.negative = conds
        self.stage_image = stage_image
        self.model = sampling_model(model, s.low_memory)
        self.progress = StageProgress(model, plan.report.progress_total)
        self.latent = self.image = self.anchor = self.batch_inds = None

    def start(self, base: torch.Tensor | None, image: torch.Tensor | None, batch_inds) -> None:
        """The run's input: the base latent, or (super-resolution in one stage from pixels) the image."""
        self.batch_inds = batch_inds
        if self.plan.res.anchor and base is not None and not self.plan.single_stage:
            self.anchor = hr.channel_stats(base.float())
        self.latent, self.image = base, (image if base is None else None)

    def stage(self, st: hr.Stage, sigmas: torch.Tensor) -> None:
        """One stage: its init latent, then sampled (at 0 steps: the upscale alone)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        t0 = time.perf_counter()
        # the init goes straight into the call: sample_stage drops it once sampled
        if st.steps == 0:
            self.upscaled_only(st, self.stage_start(st), t0)
        else:
            self.sample_stage(st, sigmas, self.stage_start(st), t0)

    def stage_start(self, st: hr.Stage) -> torch.Tensor:
        """The stage's init latent: the previous result upscaled to the stage's size, in latent
        space or through pixels."""
        if self.s.upscale_method == "latent" and self.latent is not None:
            init = resize_latent(self.latent, st.height, st.width)
        else:
            init = self._pixel_upscale(st)
        init = init.to(comfy.model_management.intermediate_device())
        if self.anchor is None and self.plan.res.anchor:
            self.anchor = hr.channel_stats(init.float())  # super-resolution: the upscaled input's statistics
        return init

    def _pixel_upscale(self, st: hr.Stage) -> torch.Tensor:
        s = self.s
        pixels = self.image if self.image is not None else vae_decode(self.vae, self.latent, s.vae_tile_size)
        if self.stage_image is not None and self.image is None and st.index > 1:
            self.stage_image(self.plan.stages[st.index - 2], pixels)  # the previous stage's result, decoded anyway
        self.latent = self.image = None
        return vae_encode(self.vae, resize_image(pixels, *st.pixel_size), s.vae_tile_size)

    def upscaled_only(self, st: hr.Stage, init: torch.Tensor, t0: float) -> None:
        log.info("LinFusion high-res: stage %d (%dx%d px) has 0 steps at strength %.3g: upscaled only",
                 st.index, *st.pixel_size, st.strength)
        check_finite_output(self.plan.node_name, "upscale", init, st)
        self.latent = init
        self._finished(st, init, t0)

    def sample_stage(self, st: hr.Stage, sigmas: torch.Tensor, init: torch.Tensor, t0: float) -> None:
        """Samples the stage from `init` with its sigmas; the result becomes the current latent."""
        s, res = self.s, self.plan.res
        noise = comfy.sample.prepare_noise(init, s.seed, self.batch_inds)
        sampler = self._sampler(st)
        n = len(sigmas) - 1
        samples = comfy.sample.sample_custom(self.model, noise, s.cfg, sampler, sigmas, self.positive, self.negative,
                                             init, callback=self.progress.callback(n),
                                             disable_pbar=self.progress.disable_pbar, seed=s.seed)
        del noise, init
        if res.anchor and self.anchor is not None:
            samples = hr.restandardize(samples, *self.anchor)
        check_finite_output(self.plan.node_name, "sampling", samples, st)
        self.progress.stage_done(n)
        self.latent = samples
        if self.stage_image is not None and st.index < len(self.plan.stages) and s.upscale_method == "latent":
            self.stage_image(st, vae_decode(self.vae, samples, s.vae_tile_size))
        self._finished(st, samples, t0)
        log.info("LinFusion high-res: stage %d/%d %dx%d px, %d steps, %.1f s", st.index, len(self.plan.stages),
                 *st.pixel_size, n, self.report.seconds[-1])
        comfy.model_management.soft_empty_cache()

    def _sampler(self, st: hr.Stage):
        s, res = self.s, self.plan.res
        sampler = comfy.samplers.sampler_object(s.sampler_name)
        if res.refine or s.low_memory:
            sampler = HighResStageSampler(sampler, res.refine, st.dilation, s.cosine_scales, s.gaussian_sigma,
                                          LowMemory() if s.low_memory else None, s.dilated_min_weight, self.plan.axis)
        return sampler

    def _finished(self, st: hr.Stage, result: torch.Tensor, t0: float) -> None:
        self.report.shapes.append(tuple(result.shape))
        self.report.seconds.append(time.perf_counter() - t0)

    def result(self, latent: dict | None) -> dict:
        """The final LATENT: the input's dict (noise mask dropped) with the last stage's samples."""
        if self.latent is None:  # only possible with an image and nothing run
            self.latent = vae_encode(self.vae, self.image, self.s.vae_tile_size)
        out = dict(latent) if latent is not None else {}
        out.pop("noise_mask", None)  # sized for the base latent
        out["samples"] = self.latent
        return out
