"""Issue 16, items 6-9 for the high-res nodes: every input is checked at the node's start,
before any sampling, VAE work or allocation, with a message naming the node, the input, the
bad value, what is allowed and the fix. Here through the nodes' public `execute` (values that
arrive through links reach `execute` unchecked by ComfyUI, exactly like these); the server
tests in test_highres_server.py post the same inputs in prompts."""

from __future__ import annotations

import math

import comfy.model_management
import helpers
import pytest
import torch
from highres_cases import ADV, KIND, SIMPLE, SR, adv_kw, latent, refused, sr_kw


@pytest.fixture(scope="module")
def model():
    return helpers.small_model(KIND)


@pytest.fixture(scope="module")
def vae():
    return helpers.small_vae()


# -- item 6: numbers beyond the schema's range, NaN and inf ----------------------------------------
@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("scale_by", math.nan, "from 1.0 to 64.0"),
    ("scale_by", 0.0, "from 1.0 to 64.0"),
    ("scale_by", -2.0, "from 1.0 to 64.0"),
    ("scale_by", 1000.0, "from 1.0 to 64.0"),
    ("gaussian_sigma", 0.0, "from 0.01 to 10.0"),
    ("gaussian_sigma", math.nan, "from 0.01 to 10.0"),
    ("cosine_scale_1", -1.0, "from 0.0 to 100.0"),
    ("cosine_scale_2", math.inf, "from 0.0 to 100.0"),
    ("cfg", math.nan, "from 0.0 to 100.0"),
    ("upscale_strength", 1.5, "from 0.0 to 1.0"),
    ("steps", 0, "from 1 to 10000"),
    ("steps", 2.5, "a whole number from 1 to 10000"),
    ("width", -8, "from 0 to 65536"),
    ("seed", -1, "from 0 to"),
])
def test_numbers_out_of_range_refused_before_sampling(node_classes, model, never_samples, name, value, allowed):
    shown = str(value) if isinstance(value, float) and not math.isfinite(value) else repr(value)
    text = refused(node_classes, ADV, adv_kw(model, **{name: value}),
                   "LinFusion High-Res Sampler (advanced)", f"input '{name}' is {shown}", allowed, "Fix:")
    assert "check the node linked to this input" in text


def test_vae_tile_size_below_64_refused(node_classes, model, vae, never_samples):
    for tile in (1, 4, 7, 63):
        refused(node_classes, ADV, adv_kw(model, vae, vae_tile_size=tile, upscale_method="pixel"),
                f"input 'vae_tile_size' is {tile}", "0 (never tile) or from 64 px on")
    refused(node_classes, SR, sr_kw(model, vae, vae_tile_size=8), "LinFusion Super-Resolution",
            "input 'vae_tile_size' is 8")


def test_simple_node_checks_too(node_classes, model, vae, never_samples):
    pos, neg = helpers.conds(KIND)
    kw = dict(model=model, positive=pos, negative=neg, latent_image=latent(), vae=vae, scale_by=math.nan, seed=1,
              steps=4, cfg=5.0, sampler_name="euler", scheduler="normal")
    refused(node_classes, SIMPLE, kw, "LinFusion High-Res Sampler: input 'scale_by' is nan")
    refused(node_classes, SIMPLE, {**kw, "scale_by": 2.0, "scheduler": "bogus"}, "input 'scheduler' is 'bogus'")


# -- item 7: latents and images that cannot be sampled ------------------------------------------------
@pytest.mark.parametrize(("lat", "fragment"), [
    (latent(batch=0), "its batch is empty (0 latents)"),
    (latent(channels=0), "it has no channels or no pixels"),
    (latent(hw=(0, 4)), "it has no channels or no pixels"),
    (latent(channels=16), "it has 16 channels, but this model's latents have 4"),
    ({"samples": torch.full((1, 4, 4, 4), math.nan)}, "NaN or infinite"),
    ({"samples": torch.randn(1, 4, 2, 4, 4)}, "(batch, channels, height, width)"),
    ({"foo": 1}, "it must be a LATENT"),
])
def test_bad_latents_refused(node_classes, model, never_samples, lat, fragment):
    refused(node_classes, ADV, adv_kw(model, latent_image=lat), "input 'latent_image' is", fragment, "Fix:")


def test_empty_latent_with_other_channel_count_still_works(node_classes, model):
    """An all-zero latent of another channel count is what ComfyUI's empty-latent nodes give for
    other families; ComfyUI fills it (fix_empty_latent_channels), so it is not refused."""
    with torch.inference_mode():
        out = node_classes[ADV].execute(**adv_kw(model, latent_image={"samples": torch.zeros(1, 16, 4, 4)},
                                                 steps=2)).result[0]
    assert out["samples"].shape == (1, 4, 8, 8)


@pytest.mark.parametrize(("image", "fragment"), [
    (torch.rand(0, 32, 32, 3), "it is empty"),
    (torch.rand(1, 0, 32, 3), "it is empty"),
    (torch.rand(1, 32, 32, 1), "3 (RGB) or 4 (RGBA) channels"),
    (torch.full((1, 32, 32, 3), math.inf), "NaN or infinite"),
])
def test_bad_images_refused(node_classes, model, vae, never_samples, image, fragment):
    refused(node_classes, SR, sr_kw(model, vae, image=image), "input 'image' is", fragment)


# -- item 8: unknown combo values ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sampler_name", "scheduler", "method", "upscale_method", "anchor_stats",
                                  "strength_schedule"])
def test_unknown_choices_refused_listing_allowed(node_classes, model, vae, never_samples, name):
    schema = node_classes[ADV].define_schema()
    (inp,) = [i for i in schema.inputs if i.id == name]
    text = refused(node_classes, ADV, adv_kw(model, **{name: "bogus"}), f"input '{name}' is 'bogus'",
                   "allowed values: " + ", ".join(inp.options))
    assert "Fix: choose one of these" in text
    refused(node_classes, SR, sr_kw(model, vae, **{name: "bogus"}), f"input '{name}' is 'bogus'")


def test_unknown_stages_refused(node_classes, model, vae, never_samples):
    refused(node_classes, SR, sr_kw(model, vae, stages="bogus"), "input 'stages' is 'bogus'",
            "allowed values: single, progressive")


# -- item 9: size checks before huge targets --------------------------------------------------------
def test_target_above_ceiling_refused_at_once(node_classes, model, vae, never_samples, pack):
    checks = pack.nodes.highres_checks
    text = refused(node_classes, SR, sr_kw(model, vae, width=65536, height=65536),
                   "the target 65536x65536 px (4.29 gigapixels", "ceiling of 1.07 gigapixels")
    assert checks.MAX_TARGET_PIXELS == 1 << 30 and "Fix:" in text
    refused(node_classes, ADV, adv_kw(model, scale_by=64.0, latent_image=latent(hw=(128, 128))),
            "the target 65536x65536 px")


def test_stage_that_cannot_fit_refused_with_numbers(node_classes, model, vae, never_samples, pack, monkeypatch):
    checks = pack.nodes.highres_checks
    # 1024 -> 16384 px, SD1.5 in fp32, cfg 5 (batch 2): the pack's estimate for the 4096 px stage is
    # 0.007 MiB x 2 x 512^2 x 4 bytes = 15.4 GB, the 2048 px stage's 3.8 GB
    need = checks.stage_bytes(model, 1, (512, 512), 5.0, low_memory=False, pixel_space=False)["unet"]
    coefficient = pack.linfusion.memory.LINEAR_MIB_PER_ELEMENT_BYTE
    assert need == pytest.approx(coefficient * 2 * 512 * 512 * 4 * 2**20 * model.model.memory_usage_factor)
    monkeypatch.setattr(comfy.model_management, "get_total_memory", lambda dev=None, torch_total_too=False: 8e9)
    text = refused(node_classes, ADV, adv_kw(model, width=16384, height=16384, latent_image=latent(hw=(128, 128))),
                   f"stage 2 (4096x4096 px, batch 1) needs {need / 1e9:.1f} GB for the model, "
                   "the device (cpu) has 8.0 GB", "turn on low_memory")
    assert "stage 1" not in text  # the 2048 px stage (3.8 GB) fits
    # low memory: the low-memory estimate of one cond (linfusion/memory.py) ...
    low = checks.stage_bytes(model, 1, (2048, 2048), 5.0, low_memory=True, pixel_space=False)["unet"]
    assert low == pack.linfusion.memory.low_memory_inference_bytes((1, 4, 2048, 2048), 4, True) > 4e9
    monkeypatch.setattr(comfy.model_management, "get_total_memory", lambda dev=None, torch_total_too=False: 4e9)
    text = refused(node_classes, SR, sr_kw(model, vae, width=16384, height=16384, low_memory=True),
                   f"stage 1 (16384x16384 px, batch 1) needs {low / 1e9:.1f} GB for the model",
                   "a smaller target or batch (low_memory is on)")
    assert "turn on low_memory" not in text
    # ... and the pixel buffers (2 x 16384^2 x 3 x 4 bytes = 6.4 GB) on the intermediate device: a
    # model device with room (the first total asked for) and a small host (the second)
    totals = iter([1e12, 4e9] * 4)
    monkeypatch.setattr(comfy.model_management, "get_total_memory",
                        lambda dev=None, torch_total_too=False: next(totals))
    refused(node_classes, SR, sr_kw(model, vae, width=16384, height=16384, low_memory=True),
            "stage 1 (16384x16384 px, batch 1) needs 6.4 GB for its pixel-space upscale, the device (cpu) has 4.0 GB")


def test_checks_pass_for_good_inputs_and_whole_floats(node_classes, model):
    """Whole floats on INT inputs (a link from a float primitive) are accepted as ints."""
    with torch.inference_mode():
        out = node_classes[ADV].execute(**adv_kw(model, steps=2.0, seed=3.0)).result[0]
    assert out["samples"].shape == (1, 4, 8, 8)
