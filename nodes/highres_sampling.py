"""ComfyUI sampling adapters of the high-res stages: reference timesteps <-> the model's sigmas
(NoiseAxis, with the SNR mapping for EDM models), each stage's sigmas from its start noise level
(`stage_sigmas`: the chosen scheduler's shape from the stage's start sigma down to 0, so every
ComfyUI sampler and scheduler works and all start at the same noise level), SDXL size
conditioning and the low-memory one-cond-at-a-time evaluation."""

from __future__ import annotations

import comfy.model_sampling
import comfy.samplers
import torch

from ..linfusion import highres as hr


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

