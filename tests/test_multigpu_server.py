"""LinFusion Multi-GPU through a real ComfyUI server, with two CPU "devices" (one worker process,
gloo): a full-size (random) SD1.5 checkpoint -> Apply LinFusion -> LinFusion Multi-GPU ->
KSampler -> SaveLatent must give the latent of the same graph without the Multi-GPU node; the
worker group is closed by /free (unload_models), a killed worker fails the prompt with an
error naming its rank, the server stays usable, and no worker outlives the server.

The module starts its own server (it stops it at the end); cfg 1 and 2 steps at 128 px keep
a UNet call around a second on these CPUs."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pytest
import server_fixtures
import torch
from comfy_server import ComfyServer, PromptFailed
from safetensors.torch import load_file

pytestmark = pytest.mark.server

CKPT = server_fixtures.CKPT
LF_WEIGHTS = "LinFusion-1-5-multigpu-test"
# Relative to the largest |latent|: the random full-size model gives latents up to ~400, where
# one fp32 step (ulp) is 3e-5, so an absolute 1e-4 would be 3 ulp. The band path sums the same
# terms in another order; measured 2.1e-4 absolute, 5.6e-7 relative (about 7 ulp of 384).
REL_TOL = 5e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie no one waits for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd15_checkpoint, lf):
    root = tmp_path_factory.mktemp("multigpu-server")
    (root / "system-tmp").mkdir()  # the server's (and its workers') temporary folder: TMPDIR
    srv = ComfyServer(root, python=sys.executable, env={"TMPDIR": str(root / "system-tmp")})
    try:
        srv.start()
        server_fixtures.place_sd15(server_fixtures.ModelDirs(srv.model_dirs), sd15_checkpoint, lf, CKPT, LF_WEIGHTS)
        yield srv
    finally:
        srv.close(keep_log=True)


def graph(seed: int, multigpu: bool, prefix: str) -> dict:
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a harbour at dawn", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        # 128 px: a 16-row latent, two bands of 8 rows
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "linfusion": {"class_type": "ApplyLinFusion",
                      "inputs": {"model": ["ckpt", 0], "weights": LF_WEIGHTS, "softmax_max_tokens": 0}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["multigpu" if multigpu else "linfusion", 0], "seed": seed, "steps": 2, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }
    if multigpu:
        g["multigpu"] = {"class_type": "LinFusionMultiGPU",
                         "inputs": {"model": ["linfusion", 0], "devices": "cpu,cpu", "timeout_s": 60}}
    return g


def run_latent(srv: ComfyServer, seed: int, multigpu: bool) -> torch.Tensor:
    prefix = f"mgpu/{'banded' if multigpu else 'single'}-{seed}"
    history = srv.run(graph(seed, multigpu, prefix), timeout=600)
    (saved,) = history["outputs"]["save"]["latents"]
    return load_file(str(srv.dirs["out"] / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def groups(srv: ComfyServer, since: int = 0) -> list[list[int]]:
    """Worker pids of every group the server started (from its log), in order."""
    text = srv.log_text()[since:]
    return [[int(p) for p in m.split(", ")] for m in re.findall(r"LinFusion Multi-GPU: 2 ranks on cpu, cpu \(gloo\); "
                                                                 r"worker pids ([\d, ]+)", text)]


def test_multigpu_node_through_the_server(server):
    t0 = time.monotonic()
    single = run_latent(server, 1, multigpu=False)
    t_single = time.monotonic() - t0
    t0 = time.monotonic()
    banded = run_latent(server, 1, multigpu=True)
    t_banded = time.monotonic() - t0
    err, rel = (banded - single).abs().max().item(), rel_err(banded, single)
    assert banded.shape == single.shape == (1, 4, 16, 16) and single.abs().max() > 0.1
    assert rel < REL_TOL, (err, rel)
    (first,) = groups(server)
    assert len(first) == 1 and not gone(first[0])
    server_fixtures.note("Multi-GPU through the server (SD1.5 128 px, 2 steps, 2 CPU ranks)",
                         f"max abs {err:.2e} (relative {rel:.1e}) vs one device; {t_single:.1f} s single, "
                         f"{t_banded:.1f} s with the group start and the UNet sent to the worker")

    # /free with unload_models: the model is detached, the group closed, the worker gone
    server.get_json("/queue")  # the server answers
    server._request("/free", {"unload_models": True})
    wait_until(lambda: gone(first[0]), 30, f"worker {first[0]} exits after /free")
    # the server logs the close once it has joined the worker: shortly after the process is gone
    wait_until(lambda: "LinFusion Multi-GPU: group closed (its model was unloaded)" in server.log_text(), 10,
               "the close is logged with its reason")

    # the next prompt starts a new group and still gives the single-device latent. (Sampling the
    # plain graph after a Multi-GPU one also closes a group: ComfyUI drops the node's cached
    # clone, the last ModelPatcher carrying the wrapper; so the plain runs go first here.)
    single2 = run_latent(server, 2, multigpu=False)
    banded2 = run_latent(server, 2, multigpu=True)
    assert rel_err(banded2, single2) < REL_TOL, (rel_err(banded2, single2), rel_err(single2, single))
    second = groups(server)[1]
    assert second != first and not gone(second[0])

    # a worker killed between steps: the next UNet call fails naming rank 1; the server stays usable
    mark = len(server.log_text())
    os.kill(second[0], signal.SIGKILL)
    wait_until(lambda: gone(second[0]), 10, "the killed worker is gone")
    t0 = time.monotonic()
    with pytest.raises(PromptFailed) as failed:
        run_latent(server, 3, multigpu=True)
    assert time.monotonic() - t0 < 60  # the dead peer fails the collective at once, no timeout wait
    msg = failed.value.exception_message
    assert "LinFusion Multi-GPU: worker rank 1 died (exit code -9)" in msg, msg
    assert "the group is closed and the next run starts a new one" in msg
    assert "group closed (a UNet call failed)" in server.log_text()[mark:]
    single3 = run_latent(server, 3, multigpu=False)
    banded3 = run_latent(server, 3, multigpu=True)  # a failed node is not cached: it runs again
    assert rel_err(banded3, single3) < REL_TOL
    (third,) = groups(server, mark)
    assert not gone(third[0])

    # the server stops (SIGTERM: no atexit in ComfyUI): the worker notices its parent is gone, and
    # the group left nothing in the temporary folder (it meets at a TCP store, not a file)
    server.close(keep_log=True)
    wait_until(lambda: all(gone(p) for g in groups(server) for p in g), 15, "every worker exits with the server")
    left = sorted(p.name for p in (server.root / "system-tmp").glob("linfusion-band-*"))
    assert not left, left
