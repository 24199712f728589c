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
from PIL import Image

CKPT = "sd15-random.safetensors"
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
            # 4 x 0.25 = 1 step; 'simple' puts it at t ~ 250 (cf ~ 0.15), so the dilated branch runs too
            "seed": SEED, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "method": "demofusion", "upscale_strength": 0.25, "strength_schedule": "linear",
            "upscale_method": "pixel", "cosine_scale_1": 3.0, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0,
            "gaussian_sigma": 1.0, "anchor_stats": "auto", "low_memory": False, "vae_tile_size": 2048}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["highres", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "highres/x2"}},
    }


def test_nodes_offered(server):
    info = server.object_info()
    for node in ("LinFusionHighResSampler", "LinFusionHighResSamplerAdvanced", "LinFusionSuperResolution"):
        assert node in info and info[node]["category"] == "sampling/LinFusion"
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
                     r"steps 1 of 4; dilation 2; pixel upscale", log), log[-3000:]
    assert re.search(r"LinFusion high-res: stage 1/1 128x128 px, 1 steps, [\d.]+ s", log)
