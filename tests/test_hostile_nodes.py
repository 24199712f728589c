"""Issue 25, items 4, 5 and 6 (node side), in-process through the nodes' public `execute`:
no "success" with an all-NaN result (too-small and out-of-range latents refused before
sampling, every stage's output checked), hybrid mode's memory estimate at the image's real
size, linked values of Apply LinFusion checked like widget values, IMAGE tensors of integer or
bool dtype, weights metadata nested 10^5 deep."""

from __future__ import annotations

import json
import math

import helpers
import pytest
import torch
from safetensors.torch import save_file
from test_apply import apply, put_weights
from test_highres_inputs import ADV, SR, adv_kw, latent, model, never_samples, refused, sr_kw, vae  # noqa: F401

ADV_NAME, SR_NAME = "LinFusion High-Res Sampler (advanced)", "LinFusion Super-Resolution"


# -- item 4: too small, out of range, non-finite output ---------------------------------------------
def test_one_cell_latent_refused_before_sampling(node_classes, model, never_samples):
    """Before: a 1x1 latent (8 px) through demofusion ended all-NaN (std of one value) and
    the prompt succeeded."""
    for hw in ((1, 1), (1, 8), (8, 1)):
        refused(node_classes, ADV, adv_kw(model, latent_image=latent(hw=hw), method="demofusion"), ADV_NAME,
                "input 'latent_image' is", "the smallest image these nodes take is 16x16 px", "Fix:")


def test_eight_px_image_refused_before_super_resolution(node_classes, model, vae, never_samples):
    for h, w in ((8, 8), (8, 64), (15, 16)):
        refused(node_classes, SR, sr_kw(model, vae, image=torch.rand(1, h, w, 3), method="demofusion",
                                        stages="progressive"),
                SR_NAME, f"input 'image' is a tensor of shape (1, {h}, {w}, 3)", f"it is {w}x{h} px",
                "at least 16 px a side")


@pytest.mark.parametrize("value", [1e30, -1e30, 2e4])
def test_latent_far_out_of_range_refused(node_classes, model, never_samples, value):
    """Before: a finite latent of 1e30 sampled to all-NaN and the prompt succeeded."""
    lat = {"samples": torch.randn(1, 4, 4, 4)}
    lat["samples"][0, 1, 2, 3] = value
    refused(node_classes, ADV, adv_kw(model, latent_image=lat), f"holds values up to {abs(value):.3g}",
            "|x| <= 10000", "Fix: connect a latent made by a VAE Encode")


def test_smallest_and_largest_accepted_latents_sample_finite(node_classes, model):
    """The bounds are not too tight: a 2x2 latent (16 px) with demofusion and values of 1e4
    (the bound) give finite output."""
    with torch.inference_mode():
        out = node_classes[ADV].execute(**adv_kw(model, latent_image=latent(hw=(2, 2)), method="demofusion",
                                                 steps=2)).result[0]["samples"]
        assert out.shape == (1, 4, 4, 4) and bool(torch.isfinite(out).all())
        big = {"samples": torch.full((1, 4, 4, 4), 1e4)}
        out = node_classes[ADV].execute(**adv_kw(model, latent_image=big, steps=2)).result[0]["samples"]
        assert bool(torch.isfinite(out).all())


def test_non_finite_stage_output_is_an_error_naming_the_stage(node_classes):
    """A model that overflows (here: NaN in its output convolution's bias) made the node
    return an all-NaN latent as a success; now the stage that produced it is named."""
    broken = helpers.small_model("sd15", seed=4)
    with torch.no_grad():
        broken.model.diffusion_model.out[2].bias.fill_(math.nan)
    text = refused(node_classes, ADV, adv_kw(broken, steps=2, scale_by=4.0),
                   "sampling at stage 1 (64x64 px) gave NaN or infinite values (100% of the values)",
                   "the model overflowed", "Fix: lower cfg")
    assert "stage 2" not in text  # stopped at the first bad stage


def test_non_finite_vae_decode_is_an_error(node_classes, model):
    import test_highres

    bad_vae = test_highres.small_vae()
    with torch.no_grad():
        bad_vae.first_stage_model.decoder.conv_out.bias.fill_(math.nan)  # inf would be clamped to 1
    refused(node_classes, SR, sr_kw(model, bad_vae, steps=1), SR_NAME, "VAE decode at the output gave NaN or infinite",
            "--fp32-vae")


# -- item 6: IMAGE tensors of integer or bool dtype ---------------------------------------------------
def test_eight_bit_and_bool_images_are_converted(node_classes, model, vae):
    """Before: 'compute_indices_weights_cubic not implemented for Long'-style errors. uint8 is
    read as 0..255 and bool as 0/1: the result equals the same image given as floats."""
    g = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (1, 32, 32, 3), generator=g, dtype=torch.uint8)
    mask = pixels > 127
    with torch.inference_mode():
        for given, as_float in ((pixels, pixels.float() / 255), (mask, mask.float())):
            got = node_classes[SR].execute(**sr_kw(model, vae, image=given, steps=1)).result[0]
            want = node_classes[SR].execute(**sr_kw(model, vae, image=as_float, steps=1)).result[0]
            assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8])
def test_other_integer_images_refused(node_classes, model, vae, never_samples, dtype):
    image = torch.randint(0, 255, (1, 32, 32, 3)).to(dtype)
    refused(node_classes, SR, sr_kw(model, vae, image=image), SR_NAME,
            f"its values are {str(dtype).replace('torch.', '')}, but a ComfyUI IMAGE holds floats from 0 to 1",
            "divide 8-bit values by 255")
