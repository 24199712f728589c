"""High-resolution generation with LinFusion: the pieces of the reference pipelines, in pure PyTorch.

Two reference procedures (LinFusion repository, examples/ and src/pipelines/):

* Progressive SDEdit (SD1.5 notebook): base image, then stages that each double the size
  (bicubic in pixel space, VAE encode) and run img2img with strength 0.4, 0.3, 0.2, 0.1 (a
  table by stage, not a linspace) on a 50-step schedule (int(): 20/15/10/5 steps), same seed.
* DemoFusion-style refinement (SDXL high-res pipeline): the same stages with strengths
  linspace(0.32, 0, n+1)[k-1] and ceil(steps x strength) steps, and in every step of stage k
      cf = 0.5 * (1 + cos(pi * (1000 - t) / 1000))
      skip residual   x <- (1 - c1) x + c1 * noised(x0_upscaled, t),     c1 = cf ** cosine_scale_1
      local branch    UNet + CFG on x
      dilated branch  UNet + CFG with every Conv2d dilated by r = 2**k (the stage's long side over
                      the native 1024 px; super-resolution: ceil(target long side / 1024)), on x blurred by a
                      Gaussian (kernel 2r-1, sigma = gaussian_sigma * (0.99 * cf ** cosine_scale_3 + 0.01))
                      and re-standardised to the per-channel mean/std of x
      mix             (1 - c2) * local + c2 * dilated,                   c2 = cf ** cosine_scale_2
  and at the end of each stage the latent is re-standardised to the base latent's
  per-channel statistics.

Timesteps and sigmas. The reference works with diffusers timesteps t in [0, 1000) and
`add_noise(x0, n, t) = sqrt(abar_t) x0 + sqrt(1 - abar_t) n`. A k-diffusion host (ComfyUI)
keeps the state as `x = x0 + sigma n` with sigma = sqrt((1 - abar_t) / abar_t): the same
state divided by sqrt(abar_t), a factor the model input scaling undoes. The skip residual
is a convex combination of two states at the same noise level, so it is the same in either
space (the host noises x0 with its own model sampling: ComfyUI's `noise_scaling`, x0 + sigma n
for EPS / v models). The host maps sigma back to t with its own
model sampling (ComfyUI: `model_sampling.timestep(sigma)`, the nearest training timestep)
and passes t to `cosine_factor`.

Strength is a noise level. The reference's schedulers run 50 "leading" steps (t = 981, ...,
1) and an img2img pass of strength s starts n = ceil / int(50 s) steps before the end, at
t = 20 (n - 1) + 1 (`reference_timestep`). The host starts each stage at its model's sigma
for that t and lets the user's scheduler shape the steps below it, so the start does not
depend on the scheduler. For models without a timestep axis (EDM) the host uses the noise
level SD's training schedule has at t (`reference_sigma`, `reference_timestep_of_sigma`).

Nothing here imports ComfyUI; the glue lives in the pack's nodes/highres.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from torch import nn

NUM_TRAIN_TIMESTEPS = 1000
LATENT_GRID = 8  # pixels per latent cell of the SD / SDXL VAE

# Per-method reference defaults: (first-stage strength, refine on).
SDEDIT_STRENGTH = 0.4  # SD1.5 notebook: 0.4, 0.3, 0.2, 0.1
DEMOFUSION_STRENGTH = 0.32  # SDXL high-res pipeline: linspace(0.32, 0, n + 1)
COSINE_SCALES = (3.0, 1.0, 1.0)  # skip residual, dilated-branch mix, blur sigma
GAUSSIAN_SIGMA = 0.8  # every published run (SDXL notebooks); the pipeline's own default is 1.0
GUIDANCE = 7.5  # every published run (SD1.5 notebook default, SDXL notebooks)
STRENGTH_SCHEDULES = ("auto", "notebook", "linear", "constant")
NOTEBOOK_STEP = 0.1  # SD1.5 notebook: each stage 0.1 below the previous one
MIN_STRENGTH = 0.05  # the notebook table's floor beyond its four stages
# The strength -> noise level map: the reference schedulers' 50-step "leading" schedule
# (steps_offset 1): t = 981, 961, ..., 1; an img2img pass of n steps starts at t = 20 (n - 1) + 1.
REFERENCE_STEPS = 50
# Skip the dilated UNet pass where its weight c2 is below this: it changes the step by at most
# c2 * |D_dilated - D_local| (bench/highres_skip.py measures time and difference).
DILATED_MIN_WEIGHT = 0.02
# The models' native long side in pixels, which the dilation counts from (the reference:
# r = stage or target long side / the UNet's default sample size).
NATIVE_LONG_SIDE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
STEP_ROUNDING = ("ceil", "int")  # SDXL pipelines: ceil(steps * strength); diffusers img2img: int()


@dataclass(frozen=True)
class Stage:
    """One upscaling stage: the latent size it samples at and how much it denoises."""

    index: int  # 1-based
    height: int  # latent cells
    width: int
    strength: float  # the stage's noise level, as the reference's img2img strength
    steps: int  # sampling steps run at this stage (see stage_steps)
    dilation: int  # conv dilation of the refinement's dilated branch
    start_timestep: int = 0  # the reference timestep the stage starts at (see reference_timestep)

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.width * LATENT_GRID, self.height * LATENT_GRID


def round_to_grid(pixels: float, grid: int = LATENT_GRID) -> int:
    """The multiple of `grid` nearest to `pixels`, halves rounded up (at least one grid cell)."""
    return max(grid, int(math.floor(pixels / grid + 0.5)) * grid)


def stage_steps(full_steps: int, strength: float, rounding: str = "ceil") -> int:
    """Steps an img2img pass of `strength` runs out of a `full_steps` schedule: ceil(steps x
    strength) as the SDXL pipelines' get_timesteps, or int() as diffusers' img2img (the SD1.5
    notebook). At least one step for any strength > 0 (a stage that is upscaled but never
    denoised is not a stage). The 1e-6 keeps a product that is an integer in exact arithmetic
    (50 x 0.3) from moving through float error."""
    if rounding not in STEP_ROUNDING:
        raise ValueError(f"unknown step rounding {rounding!r}: use one of {', '.join(STEP_ROUNDING)}")
    if strength <= 0:
        return 0
    x = full_steps * strength
    n = math.ceil(x - 1e-6) if rounding == "ceil" else math.floor(x + 1e-6)
    return min(full_steps, max(1, n))


def reference_timestep(strength: float, rounding: str = "ceil") -> int:
    """The timestep at which the reference starts an img2img pass of `strength`: its 50-step
    leading schedule (steps_offset 1) runs n = stage_steps(50, strength) steps from
    t = (1000 / 50) (n - 1) + 1 (0.32, 0.24, 0.16, 0.08 -> 301, 221, 141, 61)."""
    n = max(1, stage_steps(REFERENCE_STEPS, strength, rounding))
    return (NUM_TRAIN_TIMESTEPS // REFERENCE_STEPS) * (n - 1) + 1


def stage_strengths(n_stages: int, first: float, schedule: str = "linear") -> list[float]:
    """Per-stage strengths. linear: linspace(first, 0, n+1)[:-1], the SDXL pipeline's rule
    (0.32 -> 0.32, 0.24, 0.16, 0.08). notebook: first, first - 0.1, first - 0.2, ... the SD1.5
    notebook's table (0.4, 0.3, 0.2, 0.1 whatever the stage count), floored at
    min(MIN_STRENGTH, first). constant: every stage uses `first`."""
    if schedule not in STRENGTH_SCHEDULES or schedule == "auto":
        raise ValueError(f"unknown strength schedule {schedule!r}: use one of {', '.join(STRENGTH_SCHEDULES[1:])}")
    if n_stages <= 0:
        return []
    if schedule == "constant":
        return [float(first)] * n_stages
    if schedule == "notebook":
        floor = min(MIN_STRENGTH, float(first))
        return [max(floor, round(float(first) - NOTEBOOK_STEP * k, 10)) for k in range(n_stages)]
    return [float(first) * (n_stages - k) / n_stages for k in range(n_stages)]


def stage_count(base_hw: tuple[int, int], target_hw: tuple[int, int]) -> int:
    """Stages of at most x2 each from base to target (at least one)."""
    ratio = max(target_hw[0] / base_hw[0], target_hw[1] / base_hw[1])
    if ratio <= 1.0:
        return 1
    return max(1, math.ceil(math.log2(ratio) - 1e-9))


def dilation_ratio(stage_long: int, native_long: int) -> int:
    """Dilation of the refinement's dilated branch: the stage's long side over the model's
    native long side, rounded up (both in the same unit). The reference: 2**k in the high-res
    pipeline (base = native size), ceil(max(W, H) / 1024) in the super-resolution pipeline."""
    return max(1, math.ceil(stage_long / native_long - 1e-6))


def plan_stages(
    base_hw: tuple[int, int],
    target_hw: tuple[int, int],
    full_steps: int,
    first_strength: float,
    schedule: str = "linear",
    single_stage: bool = False,
    native_long: int | None = None,
    rounding: str = "ceil",
) -> list[Stage]:
    """The stage plan from a base latent (h, w) to a target latent (h, w).

    Progressive (default): every stage doubles each side, never passing the target; the
    last stage lands exactly on the target. single_stage: one stage straight to the target
    (the reference super-resolution pipeline). Dilation: each stage's long side over
    `native_long` (latent cells; None: the base's long side). Steps: stage_steps with
    `rounding`; the start timestep: reference_timestep with the same rounding."""
    bh, bw = base_hw
    th, tw = target_hw
    if min(bh, bw, th, tw) <= 0:
        raise ValueError(f"latent sizes must be positive: base {base_hw}, target {target_hw}")
    n = 1 if single_stage else stage_count(base_hw, target_hw)
    strengths = stage_strengths(n, first_strength, schedule)
    native = native_long or max(bh, bw)
    stages = []
    for k in range(1, n + 1):
        if k == n:
            h, w = th, tw
        else:
            h, w = min(bh * 2**k, th), min(bw * 2**k, tw)
        s = strengths[k - 1]
        stages.append(Stage(k, h, w, s, stage_steps(full_steps, s, rounding), dilation_ratio(max(h, w), native),
                            reference_timestep(s, rounding) if s > 0 else 0))
    return stages


def reference_sigmas() -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of SD's and SDXL's training schedule (scaled
    linear betas 0.00085 .. 0.012, 1000 steps), float64, t = 0..999: the noise level a
    reference timestep means, for models whose sampling has no timestep axis (EDM)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - abar) / abar).sqrt()


def reference_timestep_of_sigma(sigma: float) -> float:
    """The (fractional) reference timestep whose noise level is `sigma`: log-sigma interpolation
    in reference_sigmas(), clamped to [0, 999]."""
    log_s = reference_sigmas().log()
    x = math.log(max(float(sigma), 1e-12))
    if x <= float(log_s[0]):
        return 0.0
    if x >= float(log_s[-1]):
        return float(NUM_TRAIN_TIMESTEPS - 1)
    i = int(torch.searchsorted(log_s, torch.tensor(x, dtype=torch.float64))) - 1
    return i + (x - float(log_s[i])) / float(log_s[i + 1] - log_s[i])


def reference_sigma(t: float) -> float:
    """The noise level of reference timestep t (log-sigma interpolation between integers)."""
    log_s = reference_sigmas().log()
    t = min(max(float(t), 0.0), NUM_TRAIN_TIMESTEPS - 1.0)
    i = min(int(t), NUM_TRAIN_TIMESTEPS - 2)
    return math.exp(float(log_s[i]) + (t - i) * float(log_s[i + 1] - log_s[i]))


def cosine_factor(t: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> float:
    """DemoFusion's cosine factor: 1 at the noisiest timestep, 0 at t = 0."""
    return 0.5 * (1.0 + math.cos(math.pi * (num_train_timesteps - float(t)) / num_train_timesteps))


def cosine_weights(t: float, scales: tuple[float, float, float] = COSINE_SCALES) -> tuple[float, float, float]:
    """(c1, c2, c3) at timestep t: skip-residual weight cf**s1, dilated-branch weight cf**s2,
    and the blur's sigma multiplier 0.99 * cf**s3 + 0.01."""
    cf = cosine_factor(t)
    s1, s2, s3 = scales
    return cf**s1, cf**s2, 0.99 * cf**s3 + 0.01


def skip_residual(x: torch.Tensor, x0_noised: torch.Tensor, c1: float) -> torch.Tensor:
    """(1 - c1) * x + c1 * x0_noised: pulls the state toward the noised upscaled latent."""
    return x * (1.0 - c1) + x0_noised * c1


def mix_branches(local: torch.Tensor, dilated: torch.Tensor, c2: float) -> torch.Tensor:
    """(1 - c2) * local + c2 * dilated."""
    return local * (1.0 - c2) + dilated * c2


def gaussian_kernel(kernel_size: int, sigma: float, channels: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Depthwise 2-D Gaussian kernel (channels, 1, k, k), normalised to sum 1."""
    coords = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * float(sigma) ** 2))
    g = g / g.sum()
    k2 = einops.einsum(g, g, "i, j -> i j").to(dtype=dtype, device=device)  # separable: the outer product
    return einops.repeat(k2, "i j -> c 1 i j", c=channels).contiguous()  # one (1, k, k) filter per channel


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur of x (B, C, H, W), zero padding, same size (odd kernel)."""
    if kernel_size <= 1:
        return x
    kernel = gaussian_kernel(kernel_size, sigma, x.shape[1], dtype=x.dtype, device=x.device)
    return F.conv2d(x, kernel, padding=kernel_size // 2, groups=x.shape[1])


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel (mean, std) of x (B, C, H, W), each (B, C, 1, 1); std unbiased."""
    return x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)


def restandardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x with its per-channel statistics replaced by (mean, std)."""
    m, s = channel_stats(x)
    return (x - m) / s * std + mean


def blurred_input(x: torch.Tensor, dilation: int, sigma: float) -> torch.Tensor:
    """The dilated branch's input: x blurred (kernel 2r-1) and re-standardised to x's own
    per-channel mean and std."""
    mean, std = channel_stats(x)
    return restandardize(gaussian_blur(x, 2 * dilation - 1, sigma), mean, std)


def conv2d_layers(module: nn.Module) -> list[nn.Conv2d]:
    """Every Conv2d (subclasses included) under `module`."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


@contextmanager
def dilated_convs(convs: Iterable[nn.Conv2d], ratio: int) -> Iterator[None]:
    """Multiply dilation and padding of every conv by `ratio` for the duration of the block.
    Output sizes are unchanged (padding grows with dilation). Always restores the exact
    previous values, also when the block raises (interrupt, out of memory)."""
    saved = [(c, c.dilation, c.padding) for c in convs]
    try:
        if ratio != 1:
            for c, dil, pad in saved:
                c.dilation = tuple(d * ratio for d in dil)
                if not isinstance(pad, str):  # 'same' / 'valid' adapt to the dilation by themselves
                    c.padding = tuple(p * ratio for p in pad)
        yield
    finally:
        for c, dil, pad in saved:
            c.dilation, c.padding = dil, pad
