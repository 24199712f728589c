"""Hostile `weights` values posted to a real ComfyUI server (API prompts, which ComfyUI 0.3.75
passes to V3 combo inputs unchecked): absolute paths, `..`, a weights file uploaded into the
input folder, non-strings. None may load, list or probe anything outside the linfusion model
folders, and the server must keep serving."""

from __future__ import annotations

import shutil

import checkpoints
import pytest
import server_fixtures
from comfy_server import PromptFailed, PromptRejected

CKPT = server_fixtures.CKPT
LF_WEIGHTS = "LinFusion-1-5-hostile-test"


@pytest.fixture(scope="module")
def server(comfy_server, model_dirs, sd15_checkpoint, lf):
    server_fixtures.place_sd15(model_dirs, sd15_checkpoint, lf, CKPT, LF_WEIGHTS)
    return comfy_server


def graph(weights) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "linfusion": {"class_type": "ApplyLinFusion",
                      "inputs": {"model": ["ckpt", 0], "weights": weights, "softmax_max_tokens": 0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["linfusion", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }


def refusal(server, weights) -> str:
    """The error text the server gives for `weights` ('' if it was rejected at validation)."""
    try:
        server.run(graph(weights), timeout=120)
    except PromptRejected as e:  # a ComfyUI that checks combo values: also safe
        assert e.node_errors["linfusion"]["errors"][0]["type"] == "value_not_in_list"
        return ""
    except PromptFailed as e:
        assert e.node_type == "ApplyLinFusion"
        return e.exception_message
    pytest.fail(f"a prompt with weights {weights!r} ran")


def test_paths_outside_the_folders_are_refused_alike(server, model_dirs, lf):
    outside = checkpoints.linfusion_weights(lf, "sd1")  # a valid official folder outside models/linfusion
    uploaded = server.dirs["in"] / "x.safetensors"
    shutil.copy(outside / "diffusion_pytorch_model.safetensors", uploaded)
    rel_upload = "../../in/x.safetensors"
    assert (model_dirs.linfusion / rel_upload).resolve() == uploaded.resolve()
    log_before = server.log_size()
    names = [str(outside), str(outside / "diffusion_pytorch_model.safetensors"), rel_upload, "/etc",
             "/nonexistent/x.safetensors", "../../in/missing.safetensors"]
    messages = {n: refusal(server, n) for n in names}
    texts = {m.replace(repr(n), "<name>") for n, m in messages.items()}
    assert len(texts) == 1, messages  # the same text whether the path exists or not: no probing
    text = texts.pop()
    if text:
        assert "not found: not an entry of the linfusion model folders" in text
        assert str(model_dirs.linfusion) in text
        assert "passwd" not in messages["/etc"]  # no directory listing leaks into /history
    assert "self-attention layers" not in server.log_text()[log_before:]  # nothing was loaded or patched
    assert server.alive


def test_non_string_weights_get_a_message(server):
    for value in (5, ["ckpt", 0.5], None):
        try:
            server.run(graph(value), timeout=60)
        except PromptRejected:
            continue  # validation caught it (a link to a missing node, or a type check): fine
        except PromptFailed as e:
            assert e.node_type == "ApplyLinFusion"
            assert "must be the name of an entry in the list" in e.exception_message, e.exception_message
            continue
        pytest.fail(f"weights={value!r} ran")
    assert server.alive
