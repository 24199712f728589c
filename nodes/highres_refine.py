"""DemoFusion-style refinement as a ComfyUI SAMPLER: HighResStageSampler wraps the chosen
sampler (a `comfy.samplers.KSAMPLER` whose sampler function is the original one, given a model
proxy) and adds the low-memory contexts. The proxy (_RefineModel) sees the sampler's state x
and the sigma of every model evaluation and does, in sigma space:

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
"""

from __future__ import annotations

import logging
from dataclasses import replace

import comfy.model_management
import comfy.samplers
import torch

from ..linfusion import highres as hr
from .highres_sampling import NoiseAxis
from .lowmem import LowMemory, low_memory_unet
from .multigpu import is_band_parallel

log = logging.getLogger("ComfyUI-LinFusion")


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

