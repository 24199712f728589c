"""Exact band parallelism (linfusion/parallel/) on CPU with gloo: spawned worker processes
run one UNet forward on horizontal bands of the latent and must reproduce the single-process
output of the small real-layout models (SD1.5 / SD2.1 / SDXL, LinFusion applied).

The reference's multi-GPU path (DistriFusion, src/distrifuser in Huage001/LinFusion) is
displaced patch parallelism and inexact by design; this one is compared against the plain
single-process forward, not against it.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import parallel_tiny  # noqa: E402

import linfusion.parallel as par  # noqa: E402  (top-level: the workers import the same one)

TOL = 1e-5  # fp32 max abs: the band path sums the same terms in a different order


@pytest.mark.pure
def test_split_rows_even_uneven_and_clear_errors():
    assert par.split_rows(32, 2).edges == (0, 16, 32)
    assert par.split_rows(40, 3).edges == (0, 16, 32, 40)  # 5 units of 8 rows: 2, 2, 1
    assert par.split_rows(24, 2, row_multiple=4).edges == (0, 12, 24)
    with pytest.raises(par.BandParallelError, match="latent height 30 is not a multiple of 8"):
        par.split_rows(30, 2)
    with pytest.raises(par.BandParallelError, match="fewer than the 3 ranks"):
        par.split_rows(16, 3)


@pytest.mark.pure
def test_conv_plan_same_strided_and_dilated():
    bands = par.split_rows(32, 3)  # (0, 16, 24, 32)
    same = par.conv_plan(bands, 3, 1, 1)
    assert same.out == bands
    assert [(h.top_zeros, h.top_rows, h.bottom_rows, h.bottom_zeros) for h in same.halos] == [
        (1, 0, 1, 0), (0, 1, 1, 0), (0, 1, 0, 1)]
    # UNet Downsample (k3, stride 2, padding 1): bands halve, each reads one row from above only
    down = par.conv_plan(bands, 3, 2, 1)
    assert down.out.edges == (0, 8, 12, 16)
    assert [(h.top_zeros, h.top_rows, h.bottom_rows, h.bottom_zeros) for h in down.halos] == [
        (1, 0, 0, 0), (0, 1, 0, 0), (0, 1, 0, 0)]
    dil = par.conv_plan(bands, 3, 1, 2, dilation=2)
    assert [(h.top_rows, h.bottom_rows) for h in dil.halos] == [(0, 2), (2, 2), (2, 0)]
    with pytest.raises(par.BandParallelError, match="needs more rows than a neighbouring band"):
        par.conv_plan(par.split_rows(24, 3), 5, 1, 10, dilation=5)  # 10-row halos, 8-row bands


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=20))
    yield
    dist.destroy_process_group()
    assert not dist.is_initialized()


@pytest.mark.pure
def test_patches_undone_after_use_and_after_error(single_rank_group):
    net = parallel_tiny.tiny()
    x = parallel_tiny.latent(16)
    with torch.no_grad():
        before = net(x)
    with par.band_parallel(net) as bp, torch.no_grad():
        assert sum("forward" in m.__dict__ for m in net.modules()) == 7  # 5 convs, GroupNorm, LinFusion
        one_band = bp.forward(net, x)
    assert (one_band - before).abs().max() < TOL
    assert not any("forward" in m.__dict__ for m in net.modules())
    with pytest.raises(par.BandParallelError, match="latent height 20 is not a multiple of 8"):
        with par.band_parallel(net) as bp, torch.no_grad():
            bp.forward(net, parallel_tiny.latent(20))
    assert not any("forward" in m.__dict__ for m in net.modules())
    with torch.no_grad():
        assert torch.equal(net(x), before)  # bit-identical once unpatched


@pytest.mark.pure
def test_other_attention_option_is_checked(single_rank_group):
    with pytest.raises(par.BandParallelError, match="other_attention='drop'"):
        par.BandParallel(other_attention="drop")


@pytest.mark.pure
def test_unet_layouts_band_parallel_equal_single_process():
    import parallel_cases as pc  # imports ComfyUI: in the test, not at collection

    res = par.launch(pc.run_cases, 3, timeout_s=60, threads=1)
    assert not multiprocessing.active_children()
    refs = pc.references()
    assert len(refs) == 10
    for key, ref in refs.items():
        if key[0] == "control":  # SD1.5 with ControlNet-style residuals at every level, uneven bands
            _, world, height = key
            plain = refs[(("sd15", 0, True), world, height)]  # the same call without residuals
            assert (ref - plain).abs().max().item() > 0.1  # the residuals were applied, not skipped
            for rank in range(world):
                err = (torch.from_numpy(res[rank]["outputs"][key]) - ref).abs().max().item()
                assert err < TOL, (key, rank, err)
            continue
        (kind, hybrid, linfusion), world, height = key
        for rank in range(world):
            out = torch.from_numpy(res[rank]["outputs"][key])
            assert out.shape == ref.shape == (2, 4, height, pc.WIDTH)
            err = (out - ref).abs().max().item()
            assert err < TOL, (key, rank, err)
        sent = res[0]["bytes"][key]
        assert (sent.get("summary", 0) > 0) == linfusion  # LinFusion layers all-reduce summaries
        assert (sent.get("gather", 0) > 0) == (hybrid > 0 or not linfusion)  # softmax attn1 gathers
        assert sent["halo"] > 0 and sent["groupnorm"] > 0
    for rank in range(3):
        assert res[rank]["leftovers"] == []  # no forward patch left on any module
    # the pure-PyTorch net (3x3, dilated, stride-2 convs, upsampling) with and without overlap
    net = parallel_tiny.tiny()
    for height in pc.TINY_HEIGHTS:
        with torch.no_grad():
            ref = net(parallel_tiny.latent(height))
        for rank in range(3):
            for overlap in (True, False):
                err = (torch.from_numpy(res[rank]["tiny"][(height, overlap)]) - ref).abs().max().item()
                assert err < TOL, (height, overlap, rank, err)
    assert "input_blocks.7.1.transformer_blocks.0.attn1" in res[0]["refusal"]
    assert "other_attention='gather'" in res[0]["refusal"]


@pytest.mark.pure
def test_forward_message_copies():
    """A worker's forward request carries copies: a torch.multiprocessing queue pickles in a feeder
    thread after put() returns and moves each tensor's storage into shared memory, freeing the old
    memory under whoever still reads it (rank 0, for its own band: it read garbage now and then).
    The sender's tensors stay private; a residual's row band travels alone and contiguous."""
    x, ctx, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 8), torch.tensor([999.0])
    residual = torch.randn(1, 8, 32, 16)
    band = residual[:, :, 16:]
    msg = par.forward_message(x, (t, ctx), {"control": {"output": [None, band]}}, [("conv", (1, 1))])
    q = torch.multiprocessing.get_context("spawn").Queue()
    q.put(msg)
    tag, gx, (gt, gctx), kwargs, convs = q.get(timeout=60)
    assert tag == "forward" and convs == [("conv", (1, 1))] and kwargs["control"]["output"][0] is None
    got_band = kwargs["control"]["output"][1]
    assert torch.equal(gx, x) and torch.equal(gt, t) and torch.equal(gctx, ctx) and torch.equal(got_band, band)
    assert got_band.is_contiguous() and got_band.untyped_storage().nbytes() == band.numel() * 4
    assert msg[1].is_shared() and not [a.shape for a in (x, t, ctx, residual) if a.is_shared()]
    q.close()


@pytest.mark.pure
def test_killed_worker_fails_fast_naming_the_rank():
    start = time.monotonic()
    with pytest.raises(par.WorkerError, match=r"rank 1 died \(exit code -9\)") as info:
        par.launch(parallel_tiny.die_mid_step, 2, timeout_s=10, threads=1)
    assert time.monotonic() - start < 60
    assert not multiprocessing.active_children()
    # rank 0 reports its failed collective (or was stopped) instead of hanging
    assert "rank 0" not in str(info.value) or "band-parallel rank 0/2" in str(info.value)


@pytest.mark.pure
def test_torchrun_stage_script_matches_one_process(tmp_path):
    """scripts/band_parallel_stage.py under torchrun (2 processes, gloo): 3 Euler steps of a
    high-res stage at cfg 5 equal rank 0's single-process run of the same stage."""
    import os
    import re
    import subprocess

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(REPO / "scripts" / "band_parallel_stage.py"),
           "--device", "cpu", "--channels", "32", "--px", "256", "--steps", "3", "--timeout", "60", "--check"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "2 ranks on gloo, bands (0, 16, 32)" in out and out.count("sent {") == 2
    err = float(re.search(r"max abs difference of the final latents: ([\d.e+-]+)", out).group(1))
    assert err < 1e-4, out[-2000:]  # measured 1.1e-5 (cfg 5 multiplies the per-call 3e-6)
    assert not multiprocessing.active_children()


def _stage_cmd(*args: str) -> list[str]:
    return [str(REPO / "scripts" / "band_parallel_stage.py"), "--device", "cpu", "--timeout", "60", *args]


def test_torchrun_stage_real_checkpoint_matches_one_process(tmp_path, lf):
    """The real mode of scripts/band_parallel_stage.py: a checkpoint ComfyUI's loader detects as
    SD1.5 (small UNet, full CLIP-L and VAE), official-format LinFusion weights given by path, a
    prompt and a negative prompt, an input image VAE-encoded on rank 0, 2 Euler steps at denoise
    0.5 and cfg 5. Under torchrun with 2 CPU processes (gloo) the latent rank 0 writes equals the
    one a single process of the same script writes, and both ranks end with the same bytes."""
    import os
    import re
    import subprocess

    import numpy as np
    import parallel_checkpoint
    from PIL import Image
    from safetensors.torch import load_file

    ckpt = parallel_checkpoint.small_sd15_checkpoint()
    weights = parallel_checkpoint.small_linfusion_weights(lf)
    image = tmp_path / "in.png"  # 64 x 128 px: a 16-row latent, bands of 8 rows
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 64, 3), dtype=np.uint8)).save(image)
    stage = ["--checkpoint", str(ckpt), "--linfusion", str(weights), "--prompt", "a castle on a hill",
             "--negative", "blurry", "--image", str(image), "--steps", "2", "--denoise", "0.5", "--cfg", "5",
             "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    # both at once (3 processes on the test machine's 2 cores beat 2 + 1 in a row)
    runs = {"two": subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", "2",
                                     *_stage_cmd(*stage, "--out", str(tmp_path / "two.safetensors"))],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path),
            "one": subprocess.Popen([sys.executable, *_stage_cmd(*stage, "--out", str(tmp_path / "one.safetensors"))],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)}
    out = {}
    try:
        for name, p in runs.items():
            out[name] = p.communicate(timeout=240)[0]
            assert p.returncode == 0, out[name][-3000:]
    finally:
        for p in runs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    two = out["two"]
    assert "LinFusion: 16 self-attention layers of SD1.x replaced" in two
    assert "latent (1, 4, 16, 8), 2 ranks" in two and "bands (0, 8, 16)" in two
    assert "2 UNet calls band-parallel on 2 ranks" in two  # cond and uncond batched: one call per step
    assert "rank 1: 2 band calls" in two
    shas = re.findall(r"sha256 ([0-9a-f]{16})", two)
    assert len(shas) == 2 and shas[0] == shas[1], two[-2000:]  # rank 1's and rank 0's final latent
    assert not (tmp_path / ".two.safetensors.part").exists()
    banded, single = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("two", "one"))
    assert sorted(banded) == ["latent_format_version_0", "latent_tensor"]  # ComfyUI's Save Latent format
    a, b = banded["latent_tensor"], single["latent_tensor"]
    assert a.shape == b.shape == (1, 4, 16, 8)
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    # fp32, bands sum the same terms in another order; cfg 5 multiplies the per-call differences.
    # Measured 6.9e-5 max abs on latents up to 23 (3e-6 relative): a relative bound, 1e-5.
    assert err <= 1e-5 * scale, (err, scale)
    assert scale > 1.0


def test_stage_latent_files(tmp_path, capsys):
    """--latent reads key 'latent' as it is and ComfyUI's Save Latent format as Load Latent does;
    --out writes the Save Latent format atomically."""
    import band_parallel_stage as st
    from safetensors.torch import save_file

    x = torch.randn(1, 4, 16, 8)
    save_file({"latent": x}, str(tmp_path / "plain.safetensors"))
    assert torch.equal(st.read_latent(tmp_path / "plain.safetensors"), x)
    st.write_latent(tmp_path / "saved.safetensors", x, {"k": "v"})
    assert torch.equal(st.read_latent(tmp_path / "saved.safetensors"), x)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    save_file({"latent_tensor": x}, str(tmp_path / "old.safetensors"))  # before latent_format_version_0
    assert torch.allclose(st.read_latent(tmp_path / "old.safetensors"), x / 0.18215)
    save_file({"samples": x}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SystemExit, match=r"no tensor named 'latent' or 'latent_tensor' \(it has \['samples'\]\)"):
        st.read_latent(tmp_path / "other.safetensors")
    with pytest.raises(SystemExit):
        st.parse_args(["--checkpoint", "x.safetensors", "--out", "o.safetensors"])  # no input
    assert "needs the stage's input: --latent IN.safetensors or --image IN.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        st.parse_args(["--latent", "x.safetensors"])  # real-mode input without --checkpoint
    assert "--latent belong to the real mode: add --checkpoint PATH" in capsys.readouterr().err
