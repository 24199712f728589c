"""High-resolution sampling (issue 4): the reference's stage plan and step math in
linfusion/highres.py, and the nodes in nodes/highres.py on small models with the real
layouts, through ComfyUI's own sampling. Node code runs under torch.inference_mode(), as
ComfyUI's executor runs it."""

from __future__ import annotations

import logging
import math

import comfy.cli_args
import comfy.model_management
import comfy.samplers
import comfy.utils
import helpers
import pytest
import torch

KIND = "sd15"


# -- helpers ------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def H(pack):
    return pack.nodes.highres


@pytest.fixture(scope="module")
def hrm(lf):
    return lf.highres


@pytest.fixture(scope="module")
def model():
    return helpers.small_model(KIND)


def base_latent(batch=1, hw=(4, 4), seed=3) -> torch.Tensor:
    """A raw (unscaled) SD latent with the usual spread of real ones (std ~5)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *hw, generator=g) * 5.0


def settings(H, **kw):
    base = dict(seed=7, steps=10, cfg=5.0, sampler_name="euler", scheduler="normal", method="demofusion",
                upscale_method="latent")
    return H.HighResSettings(**{**base, **kw})


def run(H, model, target_px, latent=None, kind=KIND, image=None, vae=None, single=False, **kw):
    """run_stages under inference mode; returns (samples, report). These tiny models' "native
    size" is the base's own (dilation 2 at the first x2 stage, as the reference from 1024 px),
    and every dilated pass runs (dilated_min_weight 0) unless a test says otherwise."""
    b = (latent if latent is not None else image).shape[0]
    src = latent.shape[-2:] if latent is not None else (v // 8 for v in image.shape[1:3])
    kw.setdefault("native_size", max(src) * 8)
    kw.setdefault("dilated_min_weight", 0.0)
    pos, neg = helpers.conds(kind, batch=1)
    lat = None if latent is None else {"samples": latent}
    with torch.inference_mode():
        out, report = H.run_stages(model, pos, neg, lat, vae, target_px, settings(H, **kw), image=image,
                                   single_stage=single)
    assert out["samples"].shape[0] == b
    return out["samples"].clone(), report


class UnetCalls:
    """Counts UNet forward calls and records (batch, dilation of conv_in) of each."""

    def __init__(self, model):
        self.unet = model.model.diffusion_model
        self.conv_in = self.unet.input_blocks[0][0]
        self.calls: list[tuple[int, tuple[int, int]]] = []
        self.handle = self.unet.register_forward_pre_hook(self._hook)

    def _hook(self, _mod, args):
        self.calls.append((args[0].shape[0], tuple(self.conv_in.dilation)))

    def close(self):
        self.handle.remove()


def snapshot(model):
    """Everything sampling could leave behind on the model."""
    mods = dict(model.model.named_modules())
    return {
        "modules": {n: id(m) for n, m in mods.items()},
        "convs": {n: (m.dilation, m.padding) for n, m in mods.items() if isinstance(m, torch.nn.Conv2d)},
        "own_forward": sorted(n for n, m in mods.items() if "forward" in m.__dict__),
        "state": {k: v.clone() for k, v in model.model.state_dict().items()},
        "model_options": repr(sorted(model.model_options)),
        "transformer_options": repr(sorted(model.model_options.get("transformer_options", {}))),
        "object_patches": dict(model.object_patches),
        "patches": sorted(model.patches),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["convs"] == before["convs"] and all(d == (1, 1) for d, _ in after["convs"].values())
    assert after["own_forward"] == before["own_forward"] == []
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    for key in ("model_options", "transformer_options", "object_patches", "patches"):
        assert after[key] == before[key], key


@pytest.fixture(scope="module")
def vae():
    return helpers.small_vae()


@pytest.fixture
def progress(monkeypatch):
    """Records every progress-bar update (value, total, has preview) with previews on."""
    events: list[tuple[int, int, object]] = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        events.append((value, total, preview))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    monkeypatch.setattr(comfy.cli_args.args, "preview_method", comfy.cli_args.LatentPreviewMethod.Latent2RGB)
    return events


# -- the plan: reference numbers ------------------------------------------------------------------
def test_stage_plan_1k_to_16k_matches_reference(hrm):
    """The reference's stage plan (github:Huage001/LinFusion @62ef289).
    SDXL high-res, src/pipelines/pipeline_highres_sdxl.py: stages double from the native
    1024 px (num_scales, :1117), strengths linspace(0.32, 0, n + 1) (:1271), steps
    min(ceil(steps * strength), steps) (get_timesteps, :732), dilation cur_ratio = 2**k (:1388)
    with the base at the UNet's default sample size (:301), i.e. stage long side / native.
    SD1.5 notebook, examples/inference/ultra_text2image_w_sdedit.ipynb lines 115-199:
    strengths 0.4, 0.3, 0.2, 0.1 by stage, through diffusers img2img (int(steps * strength))."""
    # SDXL pipeline: base long side 1024 px (128 latent), target 16384 px, 50 steps, 0.32.
    sdxl = hrm.plan_stages((128, 128), (2048, 2048), 50, hrm.DEMOFUSION_STRENGTH, "linear", native_long=128)
    assert [s.pixel_size for s in sdxl] == [(2048, 2048), (4096, 4096), (8192, 8192), (16384, 16384)]
    assert [s.strength for s in sdxl] == pytest.approx([0.32, 0.24, 0.16, 0.08], abs=1e-12)
    # the pipeline's own float32 linspace gives the same values
    assert [s.strength for s in sdxl] == pytest.approx(torch.linspace(0.32, 0, 5)[:-1].tolist(), abs=1e-7)
    assert [s.steps for s in sdxl] == [16, 12, 8, 4]
    assert [s.dilation for s in sdxl] == [2, 4, 8, 16]
    assert [s.start_timestep for s in sdxl] == [301, 221, 141, 61]
    # SD1.5 notebook: 1024x512 -> 2K -> 4K -> 8K -> 16K with 0.4, 0.3, 0.2, 0.1 of 50 steps; the
    # dilation (if refinement is chosen) counts from SD1.5's native 512 px
    sd1 = hrm.plan_stages((64, 128), (1024, 2048), 50, hrm.SDEDIT_STRENGTH, "notebook", native_long=64,
                          rounding="int")
    assert [s.pixel_size for s in sd1] == [(2048, 1024), (4096, 2048), (8192, 4096), (16384, 8192)]
    assert [s.strength for s in sd1] == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=1e-12)
    assert [s.steps for s in sd1] == [20, 15, 10, 5]
    assert [s.start_timestep for s in sd1] == [381, 281, 181, 81]
    assert [s.dilation for s in sd1] == [4, 8, 16, 32]
    # a target that is not a power-of-two multiple: doubles, then exactly the target
    odd = hrm.plan_stages((128, 128), (375, 300), 50, 0.32, native_long=128)
    assert [(s.height, s.width) for s in odd] == [(256, 256), (375, 300)]
    assert [s.dilation for s in odd] == [2, 3] and [s.steps for s in odd] == [16, 8]
    assert hrm.stage_strengths(3, 0.3, "constant") == [0.3, 0.3, 0.3]
    assert [hrm.round_to_grid(v) for v in (131, 70, 3, 1000)] == [128, 72, 8, 1000]


def test_superres_dilation_from_native_long_side(hrm):
    """Super-resolution, src/pipelines/pipeline_superres_sdxl.py: num_scales =
    ceil(max(W, H) / default_size) (:1115-1118), the dilation of every conv (:1346-1347): the
    TARGET's long side over SDXL's native 1024 px, not target / input. Steps ceil (:733)."""
    cases = {(1024, 2048): 2, (2048, 4096): 4, (8192, 16384): 16, (512, 2048): 2, (1024, 3000): 3}
    for (src, dst), r in cases.items():
        (st,) = hrm.plan_stages((src // 8, src // 8), (dst // 8, dst // 8), 50, 0.32, single_stage=True,
                                native_long=1024 // 8)
        assert (st.dilation, st.steps, st.start_timestep) == (r, 16, 301), (src, dst)
    # a 2048 px input of an SD1.5 model (native 512) to 4096 px: r = 8
    (st,) = hrm.plan_stages((256, 256), (512, 512), 50, 0.32, single_stage=True, native_long=64)
    assert st.dilation == 8


def test_steps_ceil_for_demofusion_int_for_sdedit_never_zero(hrm):
    """Steps per stage: ceil(steps * strength) in the SDXL pipelines (pipeline_highres_sdxl.py
    :732, pipeline_superres_sdxl.py :733); int(steps * strength) in diffusers' img2img (the
    SD1.5 notebook). A stage with strength > 0 runs at least one step (no stage that is
    upscaled but never denoised)."""
    x16 = hrm.plan_stages((128, 128), (2048, 2048), 10, 0.32, "linear", native_long=128)
    assert [s.steps for s in x16] == [4, 3, 2, 1]  # floor gave 3, 2, 1, 0
    x16 = hrm.plan_stages((64, 64), (1024, 1024), 5, 0.4, "notebook", native_long=64, rounding="int")
    assert [s.steps for s in x16] == [2, 1, 1, 1]  # int(5 x 0.1) = 0 -> 1
    assert hrm.stage_steps(50, 0.3, "int") == 15 and hrm.stage_steps(50, 0.3, "ceil") == 15
    assert hrm.stage_steps(4, 0.32) == 2 and hrm.stage_steps(4, 0.32, "int") == 1
    assert hrm.stage_steps(3, 0.01, "int") == 1 and hrm.stage_steps(3, 0.0) == 0
    # float32 strengths as the pipeline's linspace makes them: still 16, 12, 8, 4
    assert [hrm.stage_steps(50, float(v)) for v in torch.linspace(0.32, 0, 5)[:-1]] == [16, 12, 8, 4]
    for steps in range(1, 101):
        for s in hrm.plan_stages((128, 128), (2048, 2048), steps, 0.32, native_long=128):
            assert 1 <= s.steps <= steps


def test_strength_to_reference_timestep_and_notebook_table(hrm):
    """Strength as a noise level: the reference's schedulers are 50-step 'leading' schedules
    with steps_offset 1 (SDXL base's EulerDiscrete config; t = 981, 961, ..., 1), and an
    img2img pass of strength s starts at timesteps[50 - n] with n = ceil / int(50 s)
    (get_timesteps, pipeline_highres_sdxl.py :732-737). Notebook strengths
    (ultra_text2image_w_sdedit.ipynb lines 119, 151, 169, 199): 0.4, 0.3, 0.2, 0.1 by stage."""
    leading = [20 * i + 1 for i in range(50)][::-1]  # 981 ... 1
    for s in (0.32, 0.24, 0.16, 0.08, 0.5, 0.33, 0.02, 1.0):
        n = min(math.ceil(50 * s - 1e-6), 50)
        assert hrm.reference_timestep(s) == leading[50 - n]
    assert [hrm.reference_timestep(s) for s in (0.32, 0.24, 0.16, 0.08)] == [301, 221, 141, 61]
    assert [hrm.reference_timestep(s, "int") for s in (0.4, 0.3, 0.2, 0.1)] == [381, 281, 181, 81]
    assert hrm.stage_strengths(2, 0.4, "notebook") == pytest.approx([0.4, 0.3])  # linear gave 0.4, 0.2
    assert hrm.stage_strengths(3, 0.4, "notebook") == pytest.approx([0.4, 0.3, 0.2])  # linear: .4 .267 .133
    assert hrm.stage_strengths(6, 0.4, "notebook") == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.05, 0.05])
    assert hrm.stage_strengths(2, 0.03, "notebook") == pytest.approx([0.03, 0.03])
    assert hrm.stage_strengths(4, 0.32, "linear") == pytest.approx([0.32, 0.24, 0.16, 0.08])
    # the noise level of a reference timestep: SD's scaled-linear training schedule
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    assert hrm.reference_sigma(301) == pytest.approx(float(((1 - abar[301]) / abar[301]).sqrt()), rel=1e-12)
    for t in (0.0, 61.0, 300.5, 999.0):
        assert hrm.reference_timestep_of_sigma(hrm.reference_sigma(t)) == pytest.approx(t, abs=1e-6)


def test_cosine_blur_dilation_pieces(hrm):
    assert hrm.cosine_factor(1000) == pytest.approx(1.0) and hrm.cosine_factor(0) == pytest.approx(0.0)
    assert hrm.cosine_factor(500) == pytest.approx(0.5)
    c1, c2, c3 = hrm.cosine_weights(320, (3.0, 1.0, 1.0))
    cf = 0.5 * (1 + math.cos(math.pi * 680 / 1000))
    assert (c1, c2, c3) == pytest.approx((cf**3, cf, 0.99 * cf + 0.01))
    # Gaussian kernel as the reference writes it (exp of squared offsets, outer product, sum 1)
    k = hrm.gaussian_kernel(7, 0.8, 4)
    x = torch.arange(7) - 3.0
    g = torch.exp(-(x**2) / (2 * 0.8**2))
    ref = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    assert k.shape == (4, 1, 7, 7) and (k[2, 0] - ref).abs().max() < 1e-7 and abs(k[0].sum() - 1) < 1e-6
    # blurred input keeps the per-channel mean/std of the unblurred latent
    lat = torch.randn(2, 4, 24, 20) * 3 + 1
    b = hrm.blurred_input(lat, 4, 1.0)
    (m0, s0), (m1, s1) = hrm.channel_stats(lat), hrm.channel_stats(b)
    assert (m0 - m1).abs().max() < 1e-5 and (s0 - s1).abs().max() < 1e-5 and (b - lat).abs().mean() > 0.1
    # anchoring puts the target statistics on any latent
    a = hrm.restandardize(lat, torch.full((2, 4, 1, 1), 0.5), torch.full((2, 4, 1, 1), 2.0))
    ma, sa = hrm.channel_stats(a)
    assert (ma - 0.5).abs().max() < 1e-5 and (sa - 2.0).abs().max() < 1e-5
    assert hrm.dilation_ratio(2048, 1024) == 2 and hrm.dilation_ratio(3000, 1024) == 3
    assert hrm.dilation_ratio(1024, 1024) == 1 and hrm.dilation_ratio(512, 1024) == 1


def test_dilation_and_chunking_always_restore(hrm, lf):
    convs = [torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Conv2d(2, 2, 3, stride=2, padding=1),
             torch.nn.Conv2d(2, 2, 1)]
    x = torch.randn(1, 2, 16, 16)
    shapes = [c(x).shape for c in convs]
    with hrm.dilated_convs(convs, 4):
        assert [c.dilation for c in convs] == [(4, 4)] * 3 and [c.padding for c in convs] == [(4, 4), (4, 4), (0, 0)]
        assert [c(x).shape for c in convs] == shapes  # sizes kept: padding grows with dilation
    with pytest.raises(KeyboardInterrupt), hrm.dilated_convs(convs, 8):
        raise KeyboardInterrupt
    assert [(c.dilation, c.padding) for c in convs] == [((1, 1), (1, 1)), ((1, 1), (1, 1)), ((1, 1), (0, 0))]

    ff = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    tokens = torch.randn(2, 50, 8)
    seen = []
    h = ff[0].register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[1]))
    want = ff(tokens)
    seen.clear()
    with lf.lowmem.chunked_token_forward([ff], 16, min_tokens=1):
        got = ff(tokens)
    assert (got - want).abs().max() < 1e-6 and max(seen) == 4 and len(seen) == 13  # ceil(50/16)=4 per chunk
    seen.clear()
    with lf.lowmem.chunked_token_forward([ff], 16, min_tokens=20):  # 50 tokens: 2 chunks of at least 20
        got = ff(tokens)
    h.remove()
    assert (got - want).abs().max() < 1e-6 and seen == [25, 25]
    seen.clear()
    h = ff[0].register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[1]))
    with lf.lowmem.chunked_token_forward([ff], 2, min_tokens=20, max_tokens=12):  # the cap wins: ceil(50/12) = 5
        got = ff(tokens)
    h.remove()
    assert (got - want).abs().max() < 1e-6 and seen == [10] * 5
    attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    calls = []
    own = attn.forward

    def cross(x, context=None, mask=None):  # a cross-attention's signature (queries chunked, keys shared)
        calls.append(x.shape[1])
        return own(x, context, context, need_weights=False)[0]

    attn.forward = cross
    ctx = torch.randn(2, 7, 8)
    with torch.no_grad():
        ref = attn(tokens, context=ctx)
        calls.clear()
        with lf.lowmem.chunked_token_forward([attn], 16, min_tokens=1, max_tokens=8):
            out = attn(tokens, context=ctx)
            assert calls == [4] * 12 + [2] and (out - ref).abs().max() < 1e-6
            calls.clear()
            attn(tokens, context=ctx, mask=torch.ones(1))  # a mask has a query axis: one whole call
            assert calls == [50]
    with pytest.raises(RuntimeError), lf.lowmem.chunked_token_forward([ff], 4):
        raise RuntimeError
    assert "forward" not in ff.__dict__


def test_refine_step_equals_reference_step(H, hrm, model):
    """The model proxy on a stand-in model, against the reference's step written out: skip
    residual on the state, two Euler steps (local, dilated-on-blurred with its noise applied to
    the unblurred state), mixed with c2."""
    ms = model.get_model_object("model_sampling")
    g = torch.Generator().manual_seed(0)
    x0, noise, x = (torch.randn(1, 4, 12, 10, generator=g) for _ in range(3))
    sigma = ms.sigmas[640:641].clone()
    sigma_next = float(ms.sigmas[600])
    d_local, d_dil = torch.randn(1, 4, 12, 10, generator=g), torch.randn(1, 4, 12, 10, generator=g)
    inputs = []

    def inner(inp, s, **_kw):
        inputs.append(inp.clone())
        return d_local if len(inputs) == 1 else d_dil

    scales, r, gs = (3.0, 1.0, 1.0), 2, 1.0
    proxy = H._RefineModel(inner, torch.nn.Module(), ms, noise, x0, r, scales, gs)
    state = x.clone()
    denoised = proxy(state, sigma)
    t = int(ms.timestep(sigma))
    c1, c2, c3 = hrm.cosine_weights(t, scales)
    assert 0.05 < c2 < 1 and 0 < c1 < c2
    s = float(sigma)
    blended = (1 - c1) * x + c1 * (x0 + s * noise)
    assert (state - blended).abs().max() < 1e-6  # the sampler's own state was blended in place
    blurred = hrm.blurred_input(blended, r, gs * c3)
    assert (inputs[0] - blended).abs().max() < 1e-6 and (inputs[1] - blurred).abs().max() < 1e-6

    def euler(state_, eps):
        return state_ + (sigma_next - s) * eps

    eps_local = (blended - d_local) / s
    eps_dil = (blurred - d_dil) / s  # the dilated branch's noise prediction, from the blurred input
    reference = (1 - c2) * euler(blended, eps_local) + c2 * euler(blended, eps_dil)
    ours = euler(state, (state - denoised) / s)
    assert (ours - reference).abs().max() < 1e-5


# -- sampling through ComfyUI ----------------------------------------------------------------------
def test_stage_sizes_and_seeds(H, model):
    base = base_latent(hw=(4, 4))
    a, rep = run(H, model, (128, 128), base)
    assert rep.shapes == [(1, 4, 8, 8), (1, 4, 16, 16)]
    # demofusion's 0.32, 0.16 of 10 steps, rounded up
    assert [s.steps for s in rep.stages] == [4, 2] and [s.dilation for s in rep.stages] == [2, 4]
    assert len(rep.seconds) == 2 and rep.progress_total == 6
    b, _ = run(H, model, (128, 128), base)
    c, _ = run(H, model, (128, 128), base, seed=8)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05 * a.abs().mean()


def test_refine_on_off_and_branches_off_equal_sdedit(H, model):
    base = base_latent(hw=(8, 8))
    common = dict(anchor="off", upscale_strength=0.4)
    sdedit, _ = run(H, model, (128, 128), base, method="sdedit", **common)
    refine, _ = run(H, model, (128, 128), base, method="demofusion", **common)
    assert (refine - sdedit).abs().mean() > 0.02 * sdedit.abs().mean()
    # cf <= 0.35 in these stages (strength 0.4): cf**60 < 1e-27 switches both extra branches off
    off, _ = run(H, model, (128, 128), base, method="demofusion", cosine_scales=(60.0, 60.0, 1.0), **common)
    assert (off - sdedit).abs().max() < 1e-6
    anchored, _ = run(H, model, (128, 128), base, method="demofusion")
    m0, s0 = base.mean(dim=(2, 3)), base.std(dim=(2, 3))
    assert (anchored.mean(dim=(2, 3)) - m0).abs().max() < 1e-3 and (anchored.std(dim=(2, 3)) - s0).abs().max() < 1e-3


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral", "heun"])
def test_every_sampler_runs_the_refined_step(H, model, sampler):
    base = base_latent(hw=(8, 8))
    calls = UnetCalls(model)
    try:
        a, rep = run(H, model, (128, 128), base, sampler_name=sampler)
    finally:
        calls.close()
    (stage,) = rep.stages
    assert stage.steps == 4 and rep.shapes == [(1, 4, 16, 16)] and torch.isfinite(a).all()
    # model evaluations: one per step; heun adds a corrector at the next sigma for all steps but the last
    sigmas = H.stage_sigmas(model, stage, sampler, "normal")
    evals = list(sigmas[:-1]) + (list(sigmas[1:-1]) if sampler == "heun" else [])
    ms = model.get_model_object("model_sampling")
    with_dilated = [s for s in evals if int(ms.timestep(s.reshape(1))) > 0]  # cf = 0 at t = 0
    assert 0 < len(with_dilated) < len(evals)  # the last sigma (t = 0) has no dilated branch
    local = [c for c in calls.calls if c[1] == (1, 1)]
    dilated = [c for c in calls.calls if c[1] == (2, 2)]
    assert len(local) == len(evals) and len(dilated) == len(with_dilated)
    assert len(calls.calls) == len(evals) + len(dilated)
    b, _ = run(H, model, (128, 128), base, sampler_name=sampler)
    assert torch.equal(a, b)  # the SDE samplers too: their noise comes from the seed


def test_batch_two_non_square(H, model):
    base = base_latent(batch=2, hw=(4, 6), seed=11)
    both, rep = run(H, model, (96, 64), base)  # 48x32 px -> 96x64 px
    assert rep.shapes == [(2, 4, 8, 12)]
    one, _ = run(H, model, (96, 64), base[:1])
    assert (both[:1] - one).abs().max() < 1e-4  # each image as if sampled alone
    assert (both[0] - both[1]).abs().mean() > 0.1


def test_model_left_untouched_also_when_interrupted(H, model):
    base = base_latent(hw=(4, 4))
    before = snapshot(model)
    first, _ = run(H, model, (128, 128), base, low_memory=True)  # dilation, ff chunking, cond split
    assert_unchanged(model, before)

    # 1. interrupt from the progress bar at step 1 of stage 2 (as the server's hook does)
    with helpers.progress_hook(helpers.interrupt_at(4)), \
            pytest.raises(comfy.model_management.InterruptProcessingException):
        run(H, model, (128, 128), base, low_memory=True)
    assert_unchanged(model, before)

    # 2. an exception raised inside the dilated branch (convs dilated, ff chunked at that moment)
    conv = model.model.diffusion_model.input_blocks[0][0]

    def boom(mod, _args):
        if mod.dilation != (1, 1):
            raise comfy.model_management.InterruptProcessingException()

    h = conv.register_forward_pre_hook(boom)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(H, model, (128, 128), base, low_memory=True)
    finally:
        h.remove()
    assert_unchanged(model, before)

    # 3. the interrupt flag set during a step's local branch stops that step before its dilated branch
    calls = UnetCalls(model)

    def flag(_mod, _args):
        if len(calls.calls) == 3:  # stage 1: step 1 local, step 1 dilated, step 2 local
            comfy.model_management.interrupt_current_processing(True)

    h = conv.register_forward_pre_hook(flag)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(H, model, (128, 128), base)
    finally:
        h.remove()
        calls.close()
    assert not comfy.model_management.processing_interrupted()
    assert calls.calls == [(2, (1, 1)), (2, (2, 2)), (2, (1, 1))]
    assert_unchanged(model, before)
    again, _ = run(H, model, (128, 128), base, low_memory=True)
    assert torch.equal(again, first)  # the model works as before


def test_low_memory_same_result_one_cond_at_a_time(H, model):
    base = base_latent(hw=(8, 8))
    calls = UnetCalls(model)
    try:
        normal, _ = run(H, model, (128, 128), base)
        n_normal = len(calls.calls)
        low, _ = run(H, model, (128, 128), base, low_memory=True)
    finally:
        calls.close()
    assert (low - normal).abs().max() < 1e-4
    assert {c[0] for c in calls.calls[:n_normal]} == {2}  # cond + uncond batched
    assert {c[0] for c in calls.calls[n_normal:]} == {1} and len(calls.calls) == 3 * n_normal


def test_one_progress_bar_with_previews(H, model, vae, progress):
    base = base_latent(hw=(4, 4))
    _, rep = run(H, model, (128, 128), base, upscale_method="pixel", vae=vae, vae_tile_size=32)
    total = rep.progress_total
    assert total == 6  # 4 + 2 steps
    assert {t for _, t, _ in progress} == {total}  # the tiled VAE's own bars stay silent
    values = [v for v, _, _ in progress]
    assert values[-1] == total and values == sorted(values)
    previews = [p for _, _, p in progress if p is not None]
    assert len(previews) == total and all(p[0] == "JPEG" for p in previews)


def test_pixel_upscale_through_vae_and_tiling(H, model, vae, monkeypatch):
    used = []
    for name in ("decode", "encode", "decode_tiled", "encode_tiled"):
        fn = getattr(vae, name)
        monkeypatch.setattr(vae, name, lambda *a, _fn=fn, _n=name, **k: used.append((_n, a[0].shape)) or _fn(*a, **k))
    base = base_latent(hw=(4, 4))
    plain, rep = run(H, model, (128, 128), base, upscale_method="pixel", vae=vae, vae_tile_size=0, method="sdedit")
    assert [n for n, _ in used] == ["decode", "encode", "decode", "encode"]
    assert [tuple(s) for _, s in used] == [(1, 4, 4, 4), (1, 64, 64, 3), (1, 4, 8, 8), (1, 128, 128, 3)]
    assert rep.shapes == [(1, 4, 8, 8), (1, 4, 16, 16)]
    used.clear()
    tiled, _ = run(H, model, (128, 128), base, upscale_method="pixel", vae=vae, vae_tile_size=32, method="sdedit")
    # tiles through the VAE's own decode/encode, each once (linfusion/tiling.py): 32 px tiles with
    # 8 px overlap; encodes of the 64 px and 128 px images, a decode of the 8x8 latent in 4x4 tiles
    sp = H.tiling.spans
    n64, n128, n8 = len(sp(64, 32, 8, 8)) ** 2, len(sp(128, 32, 8, 8)) ** 2, len(sp(8, 4, 1)) ** 2
    assert [n for n, _ in used] == ["decode"] + ["encode"] * n64 + ["decode"] * n8 + ["encode"] * n128
    assert {tuple(s) for n, s in used[1:]} == {(1, 32, 32, 3), (1, 4, 4, 4)} and (n64, n8, n128) == (9, 9, 49)
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all() and not torch.equal(plain, tiled)
    with pytest.raises(ValueError, match="needs a VAE"):
        run(H, model, (64, 64), base, upscale_method="pixel")


def test_nodes_public_interface(H, model, vae, node_classes, caplog):
    pos, neg = helpers.conds(KIND)
    lat = {"samples": base_latent(hw=(4, 6)), "batch_index": [0]}
    adv = node_classes["LinFusionHighResSamplerAdvanced"]
    kw = dict(model=model, positive=pos, negative=neg, latent_image=lat, scale_by=4.0, width=131, height=70,
              seed=1, steps=10, cfg=5.0, sampler_name="dpmpp_2m", scheduler="karras", method="auto",
              upscale_strength=0.0, strength_schedule="linear", upscale_method="latent", cosine_scale_1=3.0,
              cosine_scale_2=1.0, cosine_scale_3=1.0, gaussian_sigma=1.0, anchor_stats="auto", low_memory=False,
              vae_tile_size=2048)
    caplog.set_level(logging.INFO, logger="ComfyUI-LinFusion")
    with torch.inference_mode():
        out = adv.execute(**kw).result[0]
    assert out["samples"].shape == (1, 4, 9, 16) and out["batch_index"] == [0]
    text = caplog.text
    assert "target 131x70 px is not a multiple of 8 px" in text and "using 128x72" in text
    assert "sdedit (auto: SD1.x/2.x-like model)" in text and "48x32 -> 96x64 -> 128x72 px" in text

    simple = node_classes["LinFusionHighResSampler"]
    with torch.inference_mode():
        out = simple.execute(model=model, positive=pos, negative=neg, latent_image={"samples": base_latent()},
                             vae=vae, scale_by=2.0, seed=1, steps=5, cfg=5.0, sampler_name="euler",
                             scheduler="normal").result[0]
    assert out["samples"].shape == (1, 4, 8, 8)

    sr = node_classes["LinFusionSuperResolution"]
    image = torch.rand(1, 44, 60, 3)  # not a multiple of 8
    sr_kw = {**{k: v for k, v in kw.items() if k != "latent_image"}, "scale_by": 2.0, "width": 0, "height": 0}
    for stages in ("single", "progressive"):
        with torch.inference_mode():
            res = sr.execute(**sr_kw, image=image, vae=vae, stages=stages).result
        img, lat_out = res
        assert img.shape == (1, 88, 120, 3) and lat_out["samples"].shape == (1, 4, 11, 15)
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_sdxl_defaults_to_demofusion(H, hrm):
    sdxl = helpers.small_model("sdxl")
    s = settings(H, method="auto", upscale_strength=0.0)
    res = H.resolve(sdxl, s)
    assert res.refine and res.strength == hrm.DEMOFUSION_STRENGTH and res.anchor
    res1 = H.resolve(helpers.small_model("sd21"), s)
    assert not res1.refine and res1.strength == hrm.SDEDIT_STRENGTH and not res1.anchor
    calls = UnetCalls(sdxl)
    try:
        out, rep = run(H, sdxl, (64, 64), base_latent(hw=(4, 4)), kind="sdxl", method="auto", steps=8)
    finally:
        calls.close()
    assert rep.shapes == [(1, 4, 8, 8)] and rep.stages[0].steps == 3 and torch.isfinite(out).all()
    # normal from t 301: 301, 150.5, 0; no dilated branch at t = 0
    assert [c[1] for c in calls.calls] == [(1, 1), (2, 2), (1, 1), (2, 2), (1, 1)]
    assert res.native_px == 1024 and res1.native_px == 768 and res.rounding == "ceil" and res1.rounding == "int"
    assert (res.schedule, res1.schedule) == ("linear", "notebook")
    assert H.resolve(helpers.small_model("sd15"), s).native_px == 512


def test_v_prediction_model(H):
    sd21 = helpers.small_model("sd21")
    out, rep = run(H, sd21, (64, 64), base_latent(hw=(4, 4)), kind="sd21", steps=10)
    assert rep.shapes == [(1, 4, 8, 8)] and torch.isfinite(out).all() and out.std() > 0.5


# -- issue 11: strength as a noise level, any model sampling, SDXL size conditioning, skipping ------
def full_sigmas(model, steps: int, sampler_name: str, scheduler: str) -> torch.Tensor:
    """The full schedule as ComfyUI's KSampler builds it (DISCARD_PENULTIMATE samplers included)."""
    ks = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler,
                                 denoise=1.0, model_options=model.model_options)
    return ks.sigmas.float().cpu()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_start_sigma_same_for_every_scheduler(H, hrm, kind):
    """A stage of strength s starts at the model's sigma of the reference timestep
    (pipeline_highres_sdxl.py get_timesteps :732-737 on a 50-step leading schedule: 0.32 ->
    t 301 ...) whatever the scheduler; the scheduler shapes the steps below it. The tail of the
    full schedule (the old rule) started karras / exponential far lower."""
    m = helpers.small_model(kind)
    ms = m.get_model_object("model_sampling")
    for strength, t in ((0.32, 301), (0.24, 221), (0.16, 141), (0.08, 61)):
        st = hrm.Stage(1, 8, 8, strength, hrm.stage_steps(30, strength), 2, hrm.reference_timestep(strength))
        want = float(ms.sigmas[t])
        for sched in comfy.samplers.SCHEDULER_NAMES:
            for sampler in ("euler", "uni_pc"):  # uni_pc drops the penultimate sigma (as KSampler does)
                sg = H.stage_sigmas(m, st, sampler, sched)
                assert abs(float(sg[0]) / want - 1) < 0.01, (sched, strength, float(sg[0]), want)
                assert float(sg[-1]) == 0.0 and bool((sg[:-1] > 0).all()) and bool((sg.diff() <= 0).all())
                if sched != "beta":  # beta merges repeated timesteps
                    assert len(sg) - 1 == st.steps, (sched, sampler)
    st = hrm.Stage(1, 8, 8, 0.32, 16, 2, 301)
    old = {sched: float(full_sigmas(m, 50, "euler", sched)[-17]) for sched in ("normal", "karras", "exponential")}
    assert old["karras"] < 0.5 * float(ms.sigmas[301]) and old["exponential"] < 0.25 * float(ms.sigmas[301])
    # ddim_uniform at 50 steps: exactly the reference's timesteps 301, 281, ..., 1
    sg = H.stage_sigmas(m, st, "euler", "ddim_uniform")
    assert [int(ms.timestep(x.reshape(1))) for x in sg[:-1]] == list(range(301, 0, -20))


def test_edm_model_refines_by_noise_level(H, hrm):
    """EDM / continuous model sampling (Playground v2.5 through ComfyUI's
    ModelSamplingContinuousEDM): its timestep() is 0.25 ln(sigma), which DemoFusion's cosine
    factor (pipeline_highres_sdxl.py :1435) read as t ~ 0, so the refinement silently did
    nothing. Now the stage starts at the reference's noise level and the factor comes from it."""
    import comfy_extras.nodes_model_advanced as nma

    edm = nma.ModelSamplingContinuousEDM().patch(helpers.small_model("sdxl"), "edm_playground_v2.5", 80.0, 0.002)[0]
    ms = edm.get_model_object("model_sampling")
    assert abs(float(ms.timestep(torch.tensor([0.5])))) < 1  # what the old code took for t
    axis = H.NoiseAxis(edm)
    assert axis.sigma(301) == pytest.approx(0.5 * hrm.reference_sigma(301)) and not axis.discrete
    assert axis.timestep(torch.tensor([0.5 * hrm.reference_sigma(141)])) == pytest.approx(141, abs=1e-4)
    calls = UnetCalls(edm)
    try:
        out, rep = run(H, edm, (64, 64), base_latent(hw=(4, 4)), kind="sdxl", method="demofusion", steps=10)
    finally:
        calls.close()
    assert rep.start_sigmas[0] == pytest.approx(0.5 * hrm.reference_sigma(301), rel=1e-5) and torch.isfinite(out).all()
    sg = H.stage_sigmas(edm, rep.stages[0], "euler", "normal", axis)
    with_dilated = [s for s in sg[:-1] if hrm.cosine_weights(axis.timestep(s))[1] > 0]
    assert len(with_dilated) >= 2
    assert len([c for c in calls.calls if c[1] == (2, 2)]) == len(with_dilated)


def test_edm_stage_starts_at_the_reference_snr(H, hrm):
    """Issue 23: an EDM model's latents have std sigma_data (Playground v2.5: 0.5; ComfyUI's
    comfy/model_sampling.py ModelSamplingContinuousEDM.set_parameters and
    comfy_extras/nodes_model_advanced.py ModelSamplingContinuousEDM 'edm_playground_v2.5'),
    so its signal-to-noise ratio at sigma is (sigma_data / sigma)^2, where SDXL's discrete
    schedule has alpha_bar / (1 - alpha_bar) = 1 / sigma^2. Stage 1 (strength 0.32 at 50
    steps: t = 301) must start at SDXL's SNR at t = 301, not at SDXL's bare sigma (4x lower SNR,
    like SD's t ~ 510)."""
    import comfy_extras.nodes_model_advanced as nma

    sdxl = helpers.small_model("sdxl")
    edm = nma.ModelSamplingContinuousEDM().patch(sdxl, "edm_playground_v2.5", 80.0, 0.002)[0]
    ms = edm.get_model_object("model_sampling")
    assert float(ms.sigma_data) == 0.5
    snr_sdxl = 1.0 / float(sdxl.get_model_object("model_sampling").sigmas[301]) ** 2  # abar / (1 - abar)
    out, rep = run(H, edm, (64, 64), base_latent(hw=(4, 4)), kind="sdxl", method="demofusion", steps=50)
    assert rep.stages[0].start_timestep == 301 and torch.isfinite(out).all()
    snr_edm = (float(ms.sigma_data) / rep.start_sigmas[0]) ** 2
    assert snr_edm == pytest.approx(snr_sdxl, rel=0.01), (snr_edm, snr_sdxl)
    # and back: the sampler's sigmas map to the reference timesteps DemoFusion's factors use
    assert H.NoiseAxis(edm).timestep(rep.start_sigmas[0]) == pytest.approx(301, abs=0.05)


def test_every_stage_scales_its_first_unet_input(H, hrm):
    """Issue 23, item 10: the reference scales the UNet input (scheduler.scale_model_input)
    BEFORE it resets its scheduler's step index for a new stage, so the first local call of each
    stage gets the unscaled latent: 1/c_in = sqrt(sigma^2 + 1) = 1.30x too large at strength 0.32
    (t = 301 on SDXL), 1.18x, 1.09x, 1.03x at 0.24, 0.16, 0.08; its dilated calls are off by 1-3%
    (../shared/docs/linfusion-reference.md). The pack deliberately does NOT copy this quirk: every
    model call goes through ComfyUI (comfy/model_base.py BaseModel._apply_model:
    model_sampling.calculate_input), so every call, the first of each stage included, sees
    x / sqrt(sigma^2 + 1). Do not "fix" this to match the reference."""
    sdxl = helpers.small_model("sdxl")
    seen, unet_in = [], []
    orig = sdxl.model.apply_model

    def spy(x, t, *args, **kw):
        seen.append((x.detach().clone(), float(t.flatten()[0])))
        return orig(x, t, *args, **kw)

    sdxl.model.apply_model = spy
    unet = sdxl.model.diffusion_model
    hook = unet.register_forward_pre_hook(lambda _m, args: unet_in.append(args[0].detach().clone()))
    try:
        _, rep = run(H, sdxl, (128, 128), base_latent(hw=(4, 4)), kind="sdxl", method="demofusion", steps=50)
    finally:
        hook.remove()
        del sdxl.model.apply_model
    assert len(seen) == len(unet_in) and len(rep.stages) == 2
    firsts = [next(i for i, (_, sg) in enumerate(seen) if sg == pytest.approx(s0, rel=1e-6)) for s0 in rep.start_sigmas]
    assert firsts[0] == 0 and firsts[1] > 0
    for i in firsts:
        x, sigma = seen[i]
        torch.testing.assert_close(unet_in[i], x / (sigma**2 + 1) ** 0.5, rtol=1e-5, atol=1e-6)
    # what copying the quirk would change at stage 1 (strength 0.32: t = 301)
    assert (rep.start_sigmas[0] ** 2 + 1) ** 0.5 == pytest.approx(1.30, abs=0.01)


def test_flow_model_refused(H):
    import comfy_extras.nodes_model_advanced as nma

    flow = nma.ModelSamplingSD3().patch(helpers.small_model("sd15"), 3.0)[0]
    with pytest.raises(ValueError, match="flow matching .* Fix: use an SD1.x, SD2.x or SDXL-type model"):
        run(H, flow, (64, 64), base_latent(hw=(4, 4)))


def test_sdxl_size_conditioning_final_or_per_stage(H):
    """The reference conditions the base and every stage on the final size
    (pipeline_highres_sdxl.py :1129-1130, original_size = target_size = the actual final size):
    size_conditioning 'final'. 'per stage' leaves ComfyUI's default (each stage's own size)."""
    sdxl = helpers.small_model("sdxl")
    seen = []
    orig = sdxl.model.encode_adm

    def spy(**kw):
        seen.append((kw["width"], kw["height"], kw.get("target_width"), kw.get("target_height")))
        return orig(**kw)

    pos, neg = helpers.conds("sdxl")
    plain = [[[c, {k: v for k, v in d.items() if k not in ("width", "height")}] for c, d in cond]
             for cond in (pos, neg)]
    sdxl.model.encode_adm = spy
    try:
        for mode in ("final", "per stage"):
            with torch.inference_mode():
                H.run_stages(sdxl, *plain, {"samples": base_latent(hw=(4, 4))}, None, (128, 128),
                             settings(H, steps=4, size_conditioning=mode, native_size=32, upscale_method="latent"))
            if mode == "final":
                final, seen = set(seen), []
        per_stage = set(seen)
        seen.clear()
        with torch.inference_mode():  # sizes the conditioning sets itself are kept
            H.run_stages(sdxl, pos, neg, {"samples": base_latent(hw=(4, 4))}, None, (64, 64),
                         settings(H, steps=4, native_size=32))
    finally:
        del sdxl.model.encode_adm
    assert final == {(128, 128, 128, 128)}
    assert per_stage == {(64, 64, None, None), (128, 128, None, None)}
    assert set(seen) == {(512, 512, 64, 64)}


def test_negligible_dilated_passes_skipped(H, hrm, model):
    """The dilated pass is skipped where its weight c2 = cf**cosine_scale_2 is below
    DILATED_MIN_WEIGHT (0.02, t < 90): it could move that step's prediction by at most
    c2 |D_dilated - D_local|. The result stays far closer to the full computation than the
    refinement's whole effect (bench/highres_skip.py has the timings)."""
    assert hrm.DILATED_MIN_WEIGHT == 0.02
    base = base_latent(hw=(8, 8))
    kw = dict(steps=20, anchor="off")
    calls = UnetCalls(model)
    try:
        full, rep = run(H, model, (256, 256), base, dilated_min_weight=0.0, **kw)
        n_full = len(calls.calls)
        skipped, _ = run(H, model, (256, 256), base, dilated_min_weight=0.02, **kw)
        n_skip = len(calls.calls) - n_full
    finally:
        calls.close()
    expect = 0
    for st in rep.stages:
        for s in H.stage_sigmas(model, st, "euler", "normal")[:-1]:
            c2 = hrm.cosine_weights(float(model.get_model_object("model_sampling").timestep(s.reshape(1))))[1]
            expect += 0 < c2 < 0.02
    assert expect >= 2 and n_full - n_skip == expect
    sdedit, _ = run(H, model, (256, 256), base, method="sdedit", upscale_strength=0.32, strength_schedule="linear",
                    **kw)
    effect = (full - sdedit).abs().max()
    assert 0 < (skipped - full).abs().max() < 0.1 * effect


@pytest.mark.parametrize("upscale", ["latent", "pixel"])
def test_stage_images_one_at_a_time(H, model, vae, node_classes, tmp_path, monkeypatch, upscale):
    """stage_images: every stage but the last is decoded, written and dropped before the next
    stage (never all held); with pixel upscaling the decode the upscale makes anyway is reused
    (no extra VAE call)."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "out"))
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path / "tmp"))
    decodes = []
    orig = vae.decode
    monkeypatch.setattr(vae, "decode", lambda x, *a, **k: decodes.append(tuple(x.shape)) or orig(x, *a, **k))
    pos, neg = helpers.conds(KIND)
    kw = dict(model=model, positive=pos, negative=neg, latent_image={"samples": base_latent(hw=(4, 4))}, vae=vae,
              scale_by=4.0, width=0, height=0, seed=1, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal",
              method="sdedit", upscale_strength=0.0, strength_schedule="auto", upscale_method=upscale,
              cosine_scale_1=3.0, cosine_scale_2=1.0, cosine_scale_3=1.0, gaussian_sigma=0.8, anchor_stats="auto",
              low_memory=False, vae_tile_size=2048)
    adv = node_classes["LinFusionHighResSamplerAdvanced"]
    with torch.inference_mode():
        plain = adv.execute(**kw)
        n_plain = len(decodes)
        shown = adv.execute(**kw, stage_images="preview")
        saved = adv.execute(**kw, stage_images="save")
    assert plain.ui is None and torch.equal(plain.result[0]["samples"], shown.result[0]["samples"])
    if upscale == "pixel":
        assert 2 * n_plain == len(decodes) - n_plain  # the same decodes, no more
    else:
        assert n_plain == 0 and len(decodes) == 2  # one stage image per run
    for out, folder in ((shown, tmp_path / "tmp"), (saved, tmp_path / "out")):
        images = out.ui.as_dict()["images"]
        from PIL import Image

        sizes = [Image.open(folder / r["subfolder"] / r["filename"]).size for r in images]
        assert sizes == [(64, 64)]  # stage 1 of 2 (the last is the node's output)
    with pytest.raises(ValueError, match="stage_images needs a VAE"), torch.inference_mode():
        adv.execute(**{**kw, "vae": None, "upscale_method": "latent"}, stage_images="save")
