"""The LinFusion Multi-GPU node (nodes/multigpu.py) with two CPU "devices": ComfyUI's process is
rank 0, one spawned worker (gloo) holds a copy of the UNet; sampling must give the
single-device latent."""

from __future__ import annotations

import gc
import importlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

import comfy.model_management
import comfy.model_patcher
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


@pytest.fixture
def rank0_inputs(multigpu, monkeypatch) -> list[torch.Tensor]:
    """Every tensor BandGroup.forward got (x, timesteps, context, y, the ControlNet residuals), recorded."""
    seen: list[torch.Tensor] = []
    forward = multigpu.BandGroup.forward

    def spy(self, executor, config, patcher, *args, **kwargs):
        stack = list(args)
        while stack:
            a = stack.pop()
            if isinstance(a, torch.Tensor):
                seen.append(a)
            elif isinstance(a, (list, tuple, dict)):
                stack.extend(a.values() if isinstance(a, dict) else a)
        return forward(self, executor, config, patcher, *args, **kwargs)

    monkeypatch.setattr(multigpu.BandGroup, "forward", spy)
    return seen


def not_queued(tensors: list[torch.Tensor]) -> None:
    """Rank 0 kept its own tensors: none went to a worker's queue, whose feeder thread moves a
    tensor's storage into shared memory while rank 0 still reads it (linfusion.parallel.forward_message)."""
    assert len(tensors) >= 3 and not [tuple(t.shape) for t in tensors if t.is_shared()]


def test_parse_devices_and_clear_errors(multigpu, monkeypatch):
    assert multigpu.parse_devices("cpu, cpu") == [torch.device("cpu")] * 2
    assert multigpu.parse_devices("cpu,cpu,cpu,cpu") == [torch.device("cpu")] * 4
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a machine with two GPUs
    assert multigpu.parse_devices("cuda:0,cuda:1") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert multigpu.parse_devices("all") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="'gpu0' is not a device"):
        multigpu.parse_devices("cuda:0,gpu0")
    with pytest.raises(ValueError, match="repeat a GPU"):
        multigpu.parse_devices("cuda:0,cuda:0")
    with pytest.raises(ValueError, match="names no device"):
        multigpu.parse_devices(" , ")
    # no more workers than devices that exist, one per GPU, a bounded number of CPU ranks
    with pytest.raises(ValueError, match=r"'cuda:2' does not exist: this machine has cuda:0 to cuda:1"):
        multigpu.parse_devices("cuda:0,cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"'cuda:99' does not exist: this machine has no CUDA device"):
        multigpu.parse_devices("cuda:99")
    with pytest.raises(ValueError, match="lists cpu 100 times; .* at most 4 times"):
        multigpu.parse_devices("cpu," * 100)
    with pytest.raises(ValueError, match="'meta' is a meta device; only CUDA GPUs"):
        multigpu.parse_devices("meta,meta")
    with pytest.raises(ValueError, match="devices is a int, not text"):
        multigpu.parse_devices(12)
    # a huge string is named by its start and length, not echoed
    with pytest.raises(ValueError, match=r"\(100000 characters\) is longer than 1000 characters") as e:
        multigpu.parse_devices("cuda:0," * 14285 + "cuda:")
    assert len(str(e.value)) < 250
    with pytest.raises(ValueError) as e:
        multigpu.parse_devices("x" * 999)
    assert len(str(e.value)) < 250


@pytest.mark.parametrize("timeout", [10**12, 0, -5, 4, 3601, float("nan"), float("inf"), True, "300", None])
def test_timeout_is_checked_also_when_linked(node_classes, sd15, multigpu, timeout):
    """ComfyUI checks a widget's min/max only for typed-in values: a timeout_s linked from a
    primitive node reaches execute as it is, and must be refused there (10^12 would make Cancel
    wait forever on a stopped worker; 0 and negatives failed as "timed out during start")."""
    for devices in ("cpu,cpu", "cpu"):
        with pytest.raises(ValueError, match="timeout_s .* is not a number of seconds from 5 to 3600; give e.g. 300"):
            node_classes["LinFusionMultiGPU"].execute(sd15, devices, timeout)
    assert multigpu._GROUP is None and not multiprocessing.active_children()


def test_devices_are_checked_before_anything_starts(node_classes, sd15, multigpu):
    with pytest.raises(ValueError, match="at most 4 times"):
        node_classes["LinFusionMultiGPU"].execute(sd15, "cpu," * 100, 60)
    if torch.cuda.device_count() < 100:  # one device: the model would have run "unchanged" elsewhere
        with pytest.raises(ValueError, match="'cuda:99' does not exist"):
            node_classes["LinFusionMultiGPU"].execute(sd15, "cuda:99", 60)
    assert multigpu._GROUP is None and not multiprocessing.active_children()


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


def test_two_cpu_devices_sample_the_single_device_latent(lf, node_classes, sd15, linfusion_dir, multigpu,
                                                         rank0_inputs):
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
    not_queued(rank0_inputs)
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


def test_controlnet_residuals_run_band_parallel(lf, node_classes, sd15, linfusion_dir, multigpu, rank0_inputs):
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
    not_queued(rank0_inputs)


def test_cancel_ends_a_run_whose_worker_stopped_answering(lf, node_classes, sd15, linfusion_dir, multigpu):
    """A worker that stopped (SIGSTOP: alive, silent) leaves rank 0 waiting in a collective whose
    own timeout may be an hour: Cancel (ComfyUI's interrupt flag, what the server's /interrupt
    sets) ends the run within seconds as an interrupt, closes the group, and the next run starts
    a new one with the same result."""
    put_weights(lf, linfusion_dir, "sd15", sd15)
    out = node_classes["LinFusionMultiGPU"].execute(apply(node_classes, sd15, "auto"), "cpu,cpu", 120)
    banded_model = out.result[0] if hasattr(out, "result") else out[0]
    first = highres_stage(banded_model, 1.0)
    (pid,) = multigpu._GROUP.pids
    os.kill(pid, signal.SIGSTOP)
    cancel = threading.Timer(1.0, comfy.model_management.interrupt_current_processing)
    t0 = time.monotonic()
    cancel.start()
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            highres_stage(banded_model, 1.0)
        took = time.monotonic() - t0
    finally:
        cancel.cancel()
        comfy.model_management.interrupt_current_processing(False)
        if not _gone(pid):
            os.kill(pid, signal.SIGCONT)
    assert took < 8, took  # Cancel at 1 s; the collective's timeout is 120 s
    assert not comfy.model_management.processing_interrupted()  # consumed, as ComfyUI's own check does
    assert multigpu._GROUP is None and not dist.is_initialized() and _gone(pid)
    again = highres_stage(banded_model, 1.0)
    assert multigpu._GROUP is not None and multigpu._GROUP.pids != [pid]
    assert (again - first).abs().max().item() < 1e-6


def lora_clone(model, strength: float, seed: int = 2):
    """A clone of `model` with a Kohya-format LoRA for the small SD1.5 layout, loaded by ComfyUI's
    own loader (comfy.sd.load_lora_for_models, as LoraLoaderModelOnly)."""
    import comfy.sd
    import standins

    out, _ = comfy.sd.load_lora_for_models(model, None, standins.lora_tensors(seed, channels=32), strength, 0.0)
    return out


def test_workers_compute_with_the_models_weight_patches(lf, node_classes, sd15, linfusion_dir, multigpu,
                                                        monkeypatch):
    """A LoRA loaded after the Multi-GPU node: the workers get the patched weights, in a full load
    (the patch written into the weights) and in a partial one, where the weights keep their
    original values and the patch lives in each layer's per-op cast. Upstream
    comfy/model_patcher.py: ModelPatcher.load (legacy low-VRAM: lowvram layers get
    `weight_function = [LowVramPatch(...)]`, their weights left unpatched; the layers that fit
    are patched by patch_weight_to_device with a backup of the original) and, in 0.38,
    ModelPatcherDynamic.load (`weight_lowvram_function = LowVramPatch(...)`, small layers
    force-loaded with a backup): emulated here by loading with lowvram_model_memory = half the
    model, on the CPU. Removing or changing the LoRA reloads the workers."""
    put_weights(lf, linfusion_dir, "sd15", sd15)
    model = apply(node_classes, sd15, "auto")
    out = node_classes["LinFusionMultiGPU"].execute(model, "cpu,cpu", 60)
    banded_model = out.result[0] if hasattr(out, "result") else out[0]
    plain = highres_stage(model, 1.0)
    with_lora = {s: highres_stage(lora_clone(model, s), 1.0) for s in (3.0, -2.0)}
    assert min((v - plain).abs().max().item() for v in with_lora.values()) > 0.05  # the LoRA matters
    errs = {"full 3": (highres_stage(lora_clone(banded_model, 3.0), 1.0) - with_lora[3.0]).abs().max().item()}
    errs["removed"] = (highres_stage(banded_model, 1.0) - plain).abs().max().item()

    load = comfy.model_patcher.ModelPatcher.load
    half = comfy.model_management.module_size(sd15.model) // 2
    seen = {}

    def partial_load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        load(self, device_to, lowvram_model_memory=half, force_patch_weights=False, full_load=False)
        unet = self.model.diffusion_model
        lowvram = [m for m in unet.modules() if getattr(m, "weight_function", None)]
        seen["lowvram layers"] = len(lowvram)
        seen["patched in place"] = sum(k.startswith("diffusion_model.") for k in self.backup)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", partial_load)
    comfy.model_management.unload_all_models()  # the next load is a partial one
    for strength in (-2.0, 3.0):
        got = highres_stage(lora_clone(banded_model, strength), 1.0)
        errs[f"partial {strength:g}"] = (got - with_lora[strength]).abs().max().item()
    # both kinds of layers; ComfyUI 0.3.52's partial load on the CPU leaves every UNet layer to the
    # per-op cast (none patched in place), so there only the per-op kind is exercised
    import comfyui_version
    in_place = tuple(int(p) for p in comfyui_version.__version__.split(".")[:3]) > (0, 3, 52)
    assert seen["lowvram layers"] > 10 and (seen["patched in place"] > 10 or not in_place), seen
    assert multigpu._GROUP.world == 2
    assert max(errs.values()) < 1e-4, errs


def test_worker_builds_the_unet_on_the_meta_device_by_keyword(pack, sd15, monkeypatch):
    """The worker passes device= by keyword: UNetModel(..., attn_precision=None, device=None,
    operations=ops) in comfy/ldm/modules/diffusionmodules/openaimodel.py of ComfyUI 0.3.52,
    0.3.64 and 0.3.75 alike; a release that gave the layers another default device would
    otherwise allocate the whole UNet there before the weights are assigned. The copy it builds
    computes exactly as the model."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    devices = []

    class Recorded(openaimodel.UNetModel):
        def __init__(self, *args, **kwargs):
            devices.append(kwargs.get("device"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(openaimodel, "UNetModel", Recorded)
    unet = sd15.model.diffusion_model
    payload = {"pack_root": str(pack.nodes.multigpu.PACK_ROOT), "layers": [],
               "unet_config": dict(sd15.model.model_config.unet_config),
               "state": {k: v.clone() for k, v in unet.state_dict().items()}}
    worker = importlib.import_module(".nodes.multigpu_worker", pack.__name__)  # the file the worker loads
    built = worker.build_unet(payload, torch.device("cpu"))
    assert devices == [torch.device("meta")]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        assert torch.equal(built(x, t, ctx), unet(x, t, ctx))
