"""LinFusion through a real ComfyUI server: a full-size (random) SD1.5 checkpoint, full-size
(random) official-format LinFusion weights in the server's `linfusion` folder, and the
usual graph CheckpointLoaderSimple -> ApplyLinFusion -> KSampler -> VAEDecode -> SaveImage.

Results of the sampling prompts are memoised per module, so each test also runs alone
(`-k`), in any order, at the cost of running the prompts it needs."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import server_fixtures
from comfy_server import PromptFailed, PromptRejected
from PIL import Image
from server_fixtures import CKPT, SD15_SIZE, SD15_STEPS, sd15_graph

# Not the official folder name (LinFusion-1-5), so that 'auto' finds nothing and must download.
LF_WEIGHTS = "LinFusion-1-5-random"


class Run:
    def __init__(self, server, history: dict, seconds: float) -> None:
        self.history = history
        self.seconds = seconds
        self.cached = server.cached_nodes(history)
        paths = server.output_images(history)
        assert len(paths) == 1, paths
        self.path = paths[0]
        with Image.open(self.path) as im:
            self.size, self.mode = im.size, im.mode
            self.pixels = np.asarray(im.convert("RGB")).astype(np.int16)


class SD15Server:
    """The session's server with the SD1.5 checkpoint and LinFusion weights in place."""

    def __init__(self, server, model_dirs) -> None:
        self.server = server
        self.model_dirs = model_dirs
        self.runs: dict[str, Run] = {}

    def run(self, graph: dict, timeout: float = 180) -> Run:
        t0 = time.monotonic()
        history = self.server.run(graph, timeout=timeout)
        return Run(self.server, history, time.monotonic() - t0)

    def memo(self, key: str, weights: str | None) -> Run:
        if key not in self.runs:
            self.runs[key] = self.run(sd15_graph(weights, f"sd15/{key}"))
            server_fixtures.note(f"SD1.5 {SD15_SIZE}x{SD15_SIZE} {SD15_STEPS}-step prompt ({key})",
                                 f"{self.runs[key].seconds:.1f} s through the server")
        return self.runs[key]

    def weights_choices(self) -> list[str]:
        return self.server.object_info("ApplyLinFusion")["input"]["required"]["weights"][1]["options"]


@pytest.fixture(scope="module")
def sd15(comfy_server, model_dirs, sd15_checkpoint, lf) -> SD15Server:
    server_fixtures.place_sd15(model_dirs, sd15_checkpoint, lf, CKPT, LF_WEIGHTS)
    return SD15Server(comfy_server, model_dirs)


def _assert_real_image(run: Run) -> None:
    assert run.size == (SD15_SIZE, SD15_SIZE) and run.mode == "RGB"
    px = run.pixels
    assert px.std() > 10, f"pixel std {px.std():.2f}: the image is (nearly) flat"
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 1000


def test_weights_folder_offered(sd15):
    choices = sd15.weights_choices()
    assert choices[0] == "auto" and LF_WEIGHTS in choices
    assert "LinFusion-1-5" not in choices  # precondition of the 'auto' test below


def test_linfusion_prompt(sd15):
    run = sd15.memo("linfusion", LF_WEIGHTS)
    _assert_real_image(run)
    # (the checkpoint loader may come from the cache of an earlier test on the shared server)
    assert not {"linfusion", "sampler", "decode"} & set(run.cached)
    # The node's summary line: every one of SD1.5's 16 self-attention layers, from our folder.
    where = re.escape(str(sd15.model_dirs.linfusion / LF_WEIGHTS))
    found = re.findall(rf"LinFusion: (\d+) self-attention layers.* replaced with {where}", sd15.server.log_text())
    assert found and set(found) == {"16"}, found


def test_plain_prompt_differs(sd15):
    lin = sd15.memo("linfusion", LF_WEIGHTS)
    plain = sd15.memo("plain", None)
    _assert_real_image(plain)
    diff = np.abs(lin.pixels - plain.pixels)
    # Same checkpoint, seed, prompt and sampler: only self-attention differs.
    assert diff.mean() > 5, f"mean |LinFusion - plain| = {diff.mean():.2f} of 255"
    assert (diff.max(axis=2) > 0).mean() > 0.5


def test_unknown_weights_name_fails_cleanly(sd15):
    """ComfyUI 0.3.75 does not check a V3 combo value against its options at validation, so
    an unknown name reaches the node, which must say what is wrong. (A ComfyUI that does
    validate it answers HTTP 400 value_not_in_list: accepted as well.)"""
    try:
        sd15.run(sd15_graph("no-such-weights", "sd15/unknown"), timeout=60)
    except PromptRejected as e:
        errors = e.node_errors["linfusion"]["errors"]
        assert errors[0]["type"] == "value_not_in_list" and "no-such-weights" in errors[0]["details"]
    except PromptFailed as e:
        assert e.node_type == "ApplyLinFusion" and e.details["node_id"] == "linfusion"
        assert "'no-such-weights' not found" in e.exception_message
        assert str(sd15.model_dirs.linfusion) in e.exception_message
    else:
        pytest.fail("a prompt with unknown LinFusion weights ran")
    assert sd15.server.alive


def test_auto_without_weights_fails_cleanly(sd15):
    before = sd15.weights_choices()
    target = sd15.model_dirs.linfusion / "LinFusion-1-5"
    assert "LinFusion-1-5" not in before and not target.exists()
    lin = sd15.memo("linfusion", LF_WEIGHTS)

    t0 = time.monotonic()
    with pytest.raises(PromptFailed) as exc:
        sd15.run(sd15_graph("auto", "sd15/auto"), timeout=120)
    elapsed = time.monotonic() - t0
    err = exc.value
    assert err.node_type == "ApplyLinFusion" and err.details["node_id"] == "linfusion"
    assert "Yuanshi/LinFusion-1-5" in err.exception_message
    assert str(target) in err.exception_message
    assert elapsed < 60, f"'auto' took {elapsed:.0f} s to fail offline"
    assert not target.exists()
    assert sd15.weights_choices() == before  # no half-made weights on offer

    # The server stays usable: the LinFusion prompt runs again (not from cache), same image.
    assert sd15.server.alive
    again = sd15.run(sd15_graph(LF_WEIGHTS, "sd15/again"))
    server_fixtures.note("SD1.5 LinFusion prompt again after the failed one", f"{again.seconds:.1f} s")
    assert "sampler" not in again.cached and "linfusion" not in again.cached
    assert np.array_equal(again.pixels, lin.pixels)
