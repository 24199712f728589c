"""The high-res sampler through a real ComfyUI server: a full-size (random) SD1.5 checkpoint
with LinFusion applied, base KSampler -> LinFusion High-Res Sampler (advanced, DemoFusion
refinement, pixel-space upscaling through the checkpoint's VAE) -> VAEDecode -> SaveImage.
Tiny sizes, 1-2 steps per stage and cfg 1 (one UNet batch per evaluation): this checks the wiring,
not the pictures; a full-size UNet step costs seconds on these CPUs."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import server_fixtures
from comfy_server import PromptFailed
from PIL import Image

CKPT = server_fixtures.CKPT
LF_WEIGHTS = "LinFusion-1-5-highres-test"  # not the official name: 'auto' must never pick it up
BASE = 64
SEED = 5


@pytest.fixture(scope="module")
def server(comfy_server, model_dirs, sd15_checkpoint, lf):
    server_fixtures.place_sd15(model_dirs, sd15_checkpoint, lf, CKPT, LF_WEIGHTS)
    return comfy_server


def graph(scale_by: float, width: int = 0, height: int = 0) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a harbour at dawn", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": BASE, "height": BASE, "batch_size": 1}},
        "linfusion": {"class_type": "ApplyLinFusion",
                      "inputs": {"model": ["ckpt", 0], "weights": LF_WEIGHTS, "softmax_max_tokens": 0}},
        "base": {"class_type": "KSampler", "inputs": {
            "model": ["linfusion", 0], "seed": SEED, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "highres": {"class_type": "LinFusionHighResSamplerAdvanced", "inputs": {
            "model": ["linfusion", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["base", 0], "vae": ["ckpt", 2], "scale_by": scale_by, "width": width, "height": height,
            # 4 x 0.25 = 1 step from t 241 (the reference's 50-step schedule at 0.25, rounded up): cf ~ 0.14,
            # so the dilated branch runs too; native_size 64: this base counts as native (dilation 2)
            "seed": SEED, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "method": "demofusion", "upscale_strength": 0.25, "strength_schedule": "linear",
            "upscale_method": "pixel", "cosine_scale_1": 3.0, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0,
            "gaussian_sigma": 1.0, "anchor_stats": "auto", "low_memory": False, "vae_tile_size": 2048,
            "native_size": 64}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["highres", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "highres/x2"}},
    }


def test_nodes_offered(server):
    info = server.object_info()
    for node in ("LinFusionHighResSampler", "LinFusionHighResSamplerAdvanced", "LinFusionSuperResolution"):
        assert node in info and info[node]["category"] == "LinFusion/high-res"
    adv = info["LinFusionHighResSamplerAdvanced"]["input"]
    samplers = adv["required"]["sampler_name"][1]["options"]
    assert {"euler", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc"} <= set(samplers)  # ComfyUI's own list
    assert "vae" in adv["optional"]


def test_base_ksampler_highres_decode_save(server):
    t0 = time.monotonic()
    history = server.run(graph(2.0), timeout=300)
    seconds = time.monotonic() - t0
    server_fixtures.note("High-res prompt (SD1.5 64 -> 128 px, LinFusion, 1 + 1 refined step)",
                         f"{seconds:.1f} s through the server")
    (path,) = server.output_images(history)
    with Image.open(path) as im:
        assert im.size == (2 * BASE, 2 * BASE) and im.mode == "RGB"
        px = np.asarray(im).astype(np.int16)
    assert px.std() > 5
    log = server.log_text()
    assert re.search(r"LinFusion high-res: demofusion, 1 stage\(s\) 64x64 -> 128x128 px; strengths 0\.25; "
                     r"steps 1 of 4; start t 241 \(sigma [\d.]+\); dilation 2; pixel upscale", log), log[-3000:]
    assert re.search(r"LinFusion high-res: stage 1/1 128x128 px, 1 steps, [\d.]+ s", log)


# -- issue 16: inputs posted in prompts are checked at the node's start ---------------------------------
def bad_graph(node: str = "LinFusionHighResSamplerAdvanced", links: dict | None = None, **over) -> dict:
    """A prompt that reaches a high-res node directly from an empty latent (or image); `over`
    replaces widget values, `links` feeds inputs from primitive nodes (which skip ComfyUI's
    min/max check)."""
    g = graph(2.0)
    for k in ("base", "decode", "save", "linfusion"):
        g.pop(k)
    hr = g["highres"]
    hr["inputs"].update(model=["ckpt", 0], latent_image=["latent", 0])
    if node == "LinFusionHighResSampler":
        hr["inputs"] = {k: hr["inputs"][k] for k in ("model", "positive", "negative", "latent_image", "vae",
                                                     "scale_by", "seed", "steps", "cfg", "sampler_name",
                                                     "scheduler")}
    elif node == "LinFusionSuperResolution":
        g["image"] = {"class_type": "EmptyImage", "inputs": {"width": BASE, "height": BASE, "batch_size": 1,
                                                             "color": 0}}
        del hr["inputs"]["latent_image"]
        hr["inputs"].update(image=["image", 0], stages="single")
    hr["class_type"] = node
    hr["inputs"].update(over)
    for i, (name, (kind, value)) in enumerate((links or {}).items()):
        g[f"prim{i}"] = {"class_type": kind, "inputs": {"value": value}}
        hr["inputs"][name] = [f"prim{i}", 0]
    # "save" is gone: the high-res node is the output (ComfyUI runs only what an output needs)
    g["preview"] = {"class_type": "PreviewAny", "inputs": {"source": ["highres", 0]}}
    return g


REFUSALS: list[float] = []
BAD_PROMPTS = [
    # (node, widget values, linked values, message fragments)
    ("LinFusionHighResSamplerAdvanced", {"scale_by": float("nan")}, None,
     ["input 'scale_by' is nan; it must be a finite number from 1.0 to 64.0"]),
    ("LinFusionHighResSampler", {"scheduler": "bogus"}, None,
     ["LinFusion High-Res Sampler: input 'scheduler' is 'bogus'; allowed values: simple, sgm_uniform"]),
    ("LinFusionHighResSamplerAdvanced", {"sampler_name": "bogus"}, None, ["input 'sampler_name' is 'bogus'"]),
    ("LinFusionHighResSamplerAdvanced", {"method": "bogus"}, None,
     ["input 'method' is 'bogus'; allowed values: auto, sdedit, demofusion"]),
    ("LinFusionHighResSamplerAdvanced", {"upscale_method": "bogus"}, None, ["allowed values: pixel, latent"]),
    ("LinFusionHighResSamplerAdvanced", {"anchor_stats": "bogus"}, None, ["allowed values: auto, on, off"]),
    ("LinFusionHighResSamplerAdvanced", {"strength_schedule": "bogus"}, None, ["input 'strength_schedule'"]),
    ("LinFusionHighResSamplerAdvanced", {}, {"scale_by": ("PrimitiveFloat", -2.0)},
     ["input 'scale_by' is -2.0", "check the node linked to this input"]),
    ("LinFusionHighResSamplerAdvanced", {}, {"gaussian_sigma": ("PrimitiveFloat", 0.0)},
     ["input 'gaussian_sigma' is 0.0; it must be a finite number from 0.01 to 10.0"]),
    ("LinFusionHighResSamplerAdvanced", {}, {"cosine_scale_1": ("PrimitiveFloat", -1.0)},
     ["input 'cosine_scale_1' is -1.0"]),
    ("LinFusionHighResSamplerAdvanced", {}, {"vae_tile_size": ("PrimitiveInt", 4)},
     ["input 'vae_tile_size' is 4; it must be 0 (never tile) or from 64 px on"]),
    ("LinFusionSuperResolution", {"stages": "bogus"}, None, ["allowed values: single, progressive"]),
    ("LinFusionSuperResolution", {"width": 65536, "height": 65536}, None,
     ["LinFusion Super-Resolution: the target 65536x65536 px (4.29 gigapixels", "ceiling of 1.07 gigapixels"]),
    ("LinFusionSuperResolution", {"width": 24000, "height": 24000}, None,
     ["stage 1 (24000x24000 px, batch 1) needs", "GB for the model, the device (cpu) has", "turn on low_memory"]),
]


@pytest.mark.parametrize(("node", "widgets", "links", "fragments"), BAD_PROMPTS,
                         ids=[f"{n[16:]}-{next(iter({**w, **(ln or {})}))}" for n, w, ln, _ in BAD_PROMPTS])
def test_bad_input_in_prompt_gives_clear_error_fast(server, node, widgets, links, fragments):
    t0 = time.monotonic()
    with pytest.raises(PromptFailed) as exc:
        server.run(bad_graph(node, links, **widgets), timeout=120)
    seconds = time.monotonic() - t0
    err = exc.value
    assert err.node_type == node and err.details["exception_type"].endswith("HighResInputError")
    for f in fragments:
        assert f in err.exception_message, err.exception_message
    assert "Fix:" in err.exception_message
    # the server answers at once and its queue is empty again
    t1 = time.monotonic()
    queue = server.get_json("/queue", timeout=10)
    assert queue["queue_running"] == [] and queue["queue_pending"] == [] and time.monotonic() - t1 < 5
    REFUSALS.append(seconds)
    server_fixtures.note("High-res bad inputs (issue 16)",
                         f"{len(REFUSALS)} prompts refused, first {REFUSALS[0]:.2f} s (loads the checkpoint), "
                         f"then at most {max(REFUSALS[1:] or [0]):.2f} s each")
