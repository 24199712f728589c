"""The LinFusion Multi-GPU node (nodes/multigpu.py) with two CPU "devices": ComfyUI's process is
rank 0, one spawned worker (gloo) holds a copy of the UNet; sampling must give the
single-device latent."""

from __future__ import annotations

import gc
import logging
import multiprocessing
from collections.abc import Callable

import comfy.model_management
import comfy.sample
import helpers
import pytest
import torch
import torch.distributed as dist
from helpers import apply, put_weights


@pytest.fixture
def multigpu(pack):
    mod = pack.nodes.multigpu
    yield mod
    if mod._GROUP is not None:
        mod._GROUP.close()


def test_parse_devices_and_clear_errors(multigpu):
    assert multigpu.parse_devices("cpu, cpu") == [torch.device("cpu")] * 2
    assert multigpu.parse_devices("cuda:0,cuda:1") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="'gpu0' is not a device"):
        multigpu.parse_devices("cuda:0,gpu0")
    with pytest.raises(ValueError, match="repeat a GPU"):
        multigpu.parse_devices("cuda:0,cuda:0")
    with pytest.raises(ValueError, match="names no device"):
        multigpu.parse_devices(" , ")


def test_one_device_is_a_no_op(node_classes, sd15):
    out = node_classes["LinFusionMultiGPU"].execute(sd15, "cpu", 60)
    assert helpers.first_output(out) is sd15


def highres_stage(model, cfg: float) -> torch.Tensor:
    """A 3-step Euler img2img pass at strength 0.4 over a 16x16 latent, as one high-res stage."""
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    noise = comfy.sample.prepare_noise(latent, 7)
    pos, neg = helpers.conds("sd15", 1)
    return comfy.sample.sample(model, noise, 3, cfg, "euler", "normal", pos, neg, latent, denoise=0.4, seed=7,
                               disable_pbar=True)


def test_two_cpu_devices_sample_the_single_device_latent(lf, node_classes, sd15, linfusion_dir, multigpu):
    put_weights(lf, linfusion_dir, "sd15", sd15)
    model = apply(node_classes, sd15, "auto")
    # cfg 1: cfg 5 multiplies the per-call fp32 differences (~3e-6, as in test_parallel) by ~9
    # (measured 7e-5 here, latents up to 25); cfg 1 keeps a 10x margin (measured 1.0e-5).
    single = {cfg: highres_stage(model, cfg) for cfg in (1.0,)}
    out = node_classes["LinFusionMultiGPU"].execute(model, "cpu,cpu", 60)
    banded_model = helpers.first_output(out)
    assert banded_model is not model and "diffusion_model" not in model.wrappers  # a clone; input untouched
    banded = {cfg: highres_stage(banded_model, cfg) for cfg in single}
    group = multigpu._GROUP
    assert group is not None and group.world == 2 and dist.get_world_size() == 2  # it really ran on 2 ranks
    errs = {cfg: (banded[cfg] - single[cfg]).abs().max().item() for cfg in single}
    assert max(errs.values()) < 1e-4, errs
    group.close()
    assert multigpu._GROUP is None and not dist.is_initialized()
    assert not multiprocessing.active_children()


def _gone(pid: int) -> bool:
    """The process has exited (and was reaped, or is a zombie no one waits for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_group_closes_when_the_model_is_unloaded_or_collected(lf, node_classes, sd15, linfusion_dir, multigpu):
    put_weights(lf, linfusion_dir, "sd15", sd15)
    model = apply(node_classes, sd15, "auto")
    out = node_classes["LinFusionMultiGPU"].execute(model, "cpu,cpu", 60)
    banded_model = helpers.first_output(out)
    first = highres_stage(banded_model, 1.0)
    group = multigpu._GROUP
    assert group is not None and not any(_gone(p) for p in group.pids)
    # /free with unload_models runs exactly this: every loaded model is detached (unpatch_all)
    comfy.model_management.unload_all_models()
    assert multigpu._GROUP is None and not dist.is_initialized()
    assert all(_gone(p) for p in group.pids) and not multiprocessing.active_children()
    # the next run starts a new group and gives the same latent
    again = highres_stage(banded_model, 1.0)
    group2 = multigpu._GROUP
    assert group2 is not None and group2 is not group and set(group2.pids).isdisjoint(group.pids)
    assert (again - first).abs().max().item() < 1e-6
    # sampling with the plain model swaps clones (detach with unpatch_all=False): the group stays
    highres_stage(model, 1.0)
    assert multigpu._GROUP is group2 and not any(_gone(p) for p in group2.pids)
    # once no ModelPatcher carries the wrapper any more, the group goes
    del out, banded_model
    gc.collect()
    assert multigpu._GROUP is None and not dist.is_initialized()
    assert all(_gone(p) for p in group2.pids) and not multiprocessing.active_children()


def highres(H, model, base_hw: int, low_memory: bool = False) -> torch.Tensor:
    """One DemoFusion stage x2 from a (1, 4, base_hw, base_hw) latent: euler, 2 steps, cfg 1, every
    dilated pass run (dilated_min_weight 0), dilation 2 (native size = the base), under inference
    mode as ComfyUI's executor runs nodes."""
    latent = torch.randn(1, 4, base_hw, base_hw, generator=torch.Generator().manual_seed(3)) * 5.0
    s = H.HighResSettings(seed=7, steps=4, cfg=1.0, sampler_name="euler", scheduler="normal", method="demofusion",
                          upscale_method="latent", native_size=base_hw * 8, dilated_min_weight=0.0,
                          low_memory=low_memory)
    pos, neg = helpers.conds("sd15", 1)
    with torch.inference_mode():
        out, report = H.run_stages(model, pos, neg, {"samples": latent}, None, (base_hw * 16, base_hw * 16), s)
    assert [st.dilation for st in report.stages] == [2] and report.shapes == [(1, 4, 2 * base_hw, 2 * base_hw)]
    return out["samples"].clone()


def unet_calls(model) -> tuple[list[int], Callable[[], None]]:
    """conv_in's dilation at every UNet forward on this process (rank 0's band calls included)."""
    unet = model.model.diffusion_model
    calls: list[int] = []
    h = unet.register_forward_pre_hook(lambda m, a: calls.append(unet.input_blocks[0][0].dilation[0]))
    return calls, h.remove


def test_highres_sampler_runs_band_parallel_local_and_dilated(pack, lf, node_classes, sd15, linfusion_dir, multigpu,
                                                              caplog):
    """DemoFusion's local and dilated (blurred input, dilated convs) passes both go through the
    wrapper: the worker mirrors rank 0's conv dilation. low_memory's banded resnets would compute
    GroupNorm statistics per band on rank 0 alone: under Multi-GPU the sampler turns them off."""
    H = pack.nodes.highres
    put_weights(lf, linfusion_dir, "sd15", sd15)
    model = apply(node_classes, sd15, "auto")
    calls, remove = unet_calls(model)
    single = highres(H, model, 16)  # 16x16 -> 32x32 latent: bands of 16 rows, 2 at the deepest level
    remove()
    # cfg 1, 2 steps: local + dilated, then local alone (the cosine weight of the dilated pass is 0 at t 0)
    assert calls == [1, 2, 1]
    out = node_classes["LinFusionMultiGPU"].execute(model, "cpu,cpu", 60)
    banded_model = helpers.first_output(out)
    errs = {}
    for low_memory in (False, True):
        before = dict(multigpu.CALLS)
        calls, remove = unet_calls(banded_model)
        with caplog.at_level(logging.INFO):
            banded = highres(H, banded_model, 16, low_memory)
        remove()
        assert calls == [1, 2, 1]  # rank 0 ran the same passes, each on its band
        assert multigpu.CALLS["band"] - before.get("band", 0) == 3
        assert multigpu.CALLS["one_device"] == before.get("one_device", 0)
        errs[low_memory] = (banded - single).abs().max().item()
    assert max(errs.values()) < 1e-4, errs
    assert "low_memory under LinFusion Multi-GPU: banded resnets" in caplog.text


def test_dilated_pass_too_thin_for_the_bands_runs_on_one_device(pack, lf, node_classes, sd15, linfusion_dir,
                                                                multigpu, caplog):
    """Three ranks, 12x12 -> 24x24 latent: at the deepest level each band has one row, and the middle
    rank's convs dilated x2 need two rows from each neighbour (with two ranks the image edge
    clips every halo to what the other band holds). The dilated pass falls back to one device
    (logged once), the local passes stay band-parallel, and the result is the single-device one."""
    H = pack.nodes.highres
    put_weights(lf, linfusion_dir, "sd15", sd15)
    model = apply(node_classes, sd15, "auto")
    single = highres(H, model, 12)
    out = node_classes["LinFusionMultiGPU"].execute(model, "cpu,cpu,cpu", 60)
    banded_model = helpers.first_output(out)
    before = dict(multigpu.CALLS)
    with caplog.at_level(logging.WARNING):
        banded = highres(H, banded_model, 12)
    assert multigpu._GROUP.world == 3
    assert multigpu.CALLS["band"] - before.get("band", 0) == 2  # the local passes
    assert multigpu.CALLS["one_device"] - before.get("one_device", 0) == 1  # the dilated pass
    warnings = [r.getMessage() for r in caplog.records if "run on one device" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "latent 24x24" in warnings[0] and "needs more rows than a neighbouring band" in warnings[0]
    assert "dilated x2: DemoFusion's dilated branch" in warnings[0]
    assert (banded - single).abs().max().item() < 1e-4


def small_controlnet(model, seed: int = 11):
    """ComfyUI's own ControlNet class (comfy.cldm) with the small model's UNet config, random weights
    (zero convs included, so its residuals are far from zero), wrapped as the ControlNet loader does."""
    import comfy.cldm.cldm
    import comfy.controlnet

    cfg = dict(model.model.model_config.unet_config)
    cfg.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, **cfg)
    helpers.fill_random(net, seed)
    return comfy.controlnet.ControlNet(net.eval(), load_device=torch.device("cpu"), manual_cast_dtype=None)


def test_controlnet_residuals_run_band_parallel(lf, node_classes, sd15, linfusion_dir, multigpu):
    """A real ComfyUI ControlNet (Apply ControlNet's way: set_cond_hint, on both conds) under the
    Multi-GPU node: its residuals are cut into each rank's rows at every level and the worker gets
    its bands with the forward request; the stage equals the single-device one."""
    put_weights(lf, linfusion_dir, "sd15", sd15)
    model = apply(node_classes, sd15, "auto")
    hint = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))  # 16x16 latent x 8
    cnet = small_controlnet(model).copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    noise = comfy.sample.prepare_noise(latent, 7)

    def stage(m, control: bool) -> torch.Tensor:
        pos, neg = helpers.conds("sd15", 1)
        if control:
            pos, neg = ([[c, {**d, "control": cnet, "control_apply_to_uncond": False}] for c, d in cond]
                        for cond in (pos, neg))
        return comfy.sample.sample(m, noise, 3, 1.0, "euler", "normal", pos, neg, latent, denoise=0.4, seed=7,
                                   disable_pbar=True)

    single, plain = stage(model, True), stage(model, False)
    out = node_classes["LinFusionMultiGPU"].execute(model, "cpu,cpu", 60)
    banded_model = helpers.first_output(out)
    before = dict(multigpu.CALLS)
    banded = stage(banded_model, True)
    assert multigpu.CALLS["band"] - before.get("band", 0) == 3 and multigpu._GROUP.world == 2
    assert (single - plain).abs().max().item() > 0.1  # the ControlNet changes the result
    err = (banded - single).abs().max().item()
    assert err < 1e-4, err  # measured 8.7e-6 on latents up to 19 (the ControlNet moves them by 8.3)
