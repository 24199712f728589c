"""Fixtures for tests that drive a real ComfyUI server process (see comfy_server.py).

* `comfy_server`: one server per test session, started on first use and always stopped.
* `model_dirs`: its model folders (checkpoints, linfusion, loras, ...), for tests to place files in.
* `sd15_checkpoint`: the cached full-size random SD1.5 checkpoint (see checkpoints.py).

When a test that uses the server fails, the report gets a section with what the server
logged during that test (last 120 lines). The terminal summary states the server start
time and how the checkpoint was obtained.
"""

from __future__ import annotations

import sys
import time

import checkpoints
import pytest
from comfy_server import ComfyServer

_active: list[ComfyServer] = []
_facts: dict[str, str] = {}
_LOG_START = pytest.StashKey[int]()


def note(name: str, fact: str) -> None:
    """A line for the terminal summary (measured numbers worth seeing without -s)."""
    _facts[name] = fact


class ModelDirs(dict):
    """name -> Path of the server's model folders, also as attributes: model_dirs.linfusion."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    srv = ComfyServer(tmp_path_factory.mktemp("comfy-server"), python=sys.executable)
    _active.append(srv)
    try:
        srv.start()
        _facts["ComfyUI server"] = f"ready in {srv.start_seconds:.1f} s at {srv.url} (log: {srv.log_path})"
        yield srv
    finally:
        srv.close()
        _active.remove(srv)


@pytest.fixture(scope="session")
def model_dirs(comfy_server) -> ModelDirs:
    return ModelDirs(comfy_server.model_dirs)


@pytest.fixture(scope="session")
def sd15_checkpoint():
    t0 = time.monotonic()
    path = checkpoints.sd15_checkpoint()
    built = checkpoints.last_build_seconds.get("sd15")
    _facts["SD1.5 checkpoint"] = (f"built in {built:.1f} s" if built is not None
                                  else f"from cache ({time.monotonic() - t0:.1f} s)") + f": {path}"
    return path


def place_sd15(model_dirs: ModelDirs, checkpoint, lf, ckpt_name: str, weights_name: str, weights=None) -> None:
    """Link the random SD1.5 checkpoint into the server's checkpoints folder as `ckpt_name`,
    and random SD1.x LinFusion weights (full-size, or the folder `weights`) into its linfusion
    folder as a real folder `weights_name` holding (links to) the two official files, as a user
    would have it."""
    link = model_dirs.checkpoints / ckpt_name
    if not link.is_symlink():
        link.symlink_to(checkpoint)
    src = weights or checkpoints.linfusion_weights(lf, "sd1")
    dst = model_dirs.linfusion / weights_name
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if not (dst / f.name).is_symlink():
            (dst / f.name).symlink_to(f)


# The SD1.5 prompt of test_server and test_install: the random checkpoint placed under CKPT,
# sampled at SD15_SIZE x SD15_SIZE px in SD15_STEPS steps.
CKPT = "sd15-random.safetensors"
SD15_SIZE = 256
SD15_STEPS = 1
SD15_SEED = 123


def sd15_graph(weights: str | None, prefix: str, seed: int = SD15_SEED) -> dict:
    """API-format prompt CheckpointLoaderSimple (CKPT) -> ApplyLinFusion (`weights`; None: no such node)
    -> KSampler -> VAEDecode -> SaveImage (`prefix`), SD15_SIZE px in SD15_STEPS steps."""
    model = ["ckpt", 0]
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode",
                "inputs": {"text": "a lighthouse on a cliff at dusk", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage",
                   "inputs": {"width": SD15_SIZE, "height": SD15_SIZE, "batch_size": 1}},
    }
    if weights is not None:
        g["linfusion"] = {"class_type": "ApplyLinFusion",
                          "inputs": {"model": model, "weights": weights, "softmax_max_tokens": 0}}
        model = ["linfusion", 0]
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": SD15_STEPS, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    return g


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.stash[_LOG_START] = _active[-1].log_size() if _active else 0
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _active and "comfy_server" in getattr(item, "fixturenames", ()):
        srv = _active[-1]
        rep.sections.append((f"ComfyUI server log since this test began (failed in {rep.when})",
                             srv.log_tail(120, since=item.stash.get(_LOG_START, 0))))


def pytest_terminal_summary(terminalreporter):
    for name, fact in _facts.items():
        terminalreporter.write_line(f"{name}: {fact}")
