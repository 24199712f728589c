"""Issue 25, items 4, 5 and 6 (node side), in-process through the nodes' public `execute`:
no "success" with an all-NaN result (too-small and out-of-range latents refused before
sampling, every stage's output checked), hybrid mode's memory estimate at the image's real
size, linked values of Apply LinFusion checked like widget values, IMAGE tensors of integer or
bool dtype, weights metadata nested 10^5 deep."""

from __future__ import annotations

import math

import helpers
import pytest
import torch
from helpers import apply, put_weights
from highres_cases import ADV, SR, adv_kw, latent, refused, sr_kw

ADV_NAME, SR_NAME = "LinFusion High-Res Sampler (advanced)", "LinFusion Super-Resolution"


@pytest.fixture(scope="module")
def model():
    return helpers.small_model("sd15")


@pytest.fixture(scope="module")
def vae():
    return helpers.small_vae()


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
    bad_vae = helpers.small_vae()
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


# -- item 5: hybrid mode's estimate at the image's real size ------------------------------------------
@pytest.fixture(scope="module")
def sd15_attn1_tokens():
    """path -> (batch, tokens, heads) each self-attention layer of the small SD1.5 model sees in
    one real sampling step at a 16x16 latent, cfg 5 (forward hooks): the independent reference."""
    sd15 = helpers.small_model("sd15")
    seen, handles = {}, []

    def hook(name):
        def record(mod, args, _out):
            seen.setdefault(name, (args[0].shape[0], args[0].shape[1], mod.heads))
        return record

    for name, m in sd15.model.diffusion_model.named_modules():
        if name.endswith(".attn1"):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        helpers.sample(sd15, "sd15", latent_hw=(16, 16), steps=1)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 16
    return sd15, seen


def test_attention_levels_match_the_tokens_each_layer_sees(lf, sd15_attn1_tokens):
    sd15, seen = sd15_attn1_tokens
    levels = lf.patching.attention_levels(sd15.model.diffusion_model, list(seen))
    for path, (_b, tokens, _heads) in seen.items():
        assert tokens == 256 // 4 ** levels[path], path
        assert lf.memory.tokens_at_level((16, 16), levels[path]) == tokens
    assert lf.memory.tokens_at_level((9, 5), 1) == 5 * 3  # a stride-2 convolution rounds up
    # SDXL's full layout (on meta): no attention at full size; 10 layers at /2, 60 at /4 (10 of them in the middle)
    xl = helpers.base_model("sdxl", meta=True).diffusion_model
    paths = [n for n, _ in xl.named_modules() if n.endswith(".attn1")]
    found = lf.patching.attention_levels(xl, paths)
    assert sorted(found.values()).count(1) == 2 * 2 + 3 * 2 and sorted(found.values()).count(2) == 2 * 10 + 10 + 3 * 10
    assert found["input_blocks.4.1.transformer_blocks.0.attn1"] == 1
    assert found["middle_block.1.transformer_blocks.9.attn1"] == 2
    assert found["output_blocks.5.1.transformer_blocks.1.attn1"] == 1


def hybrid_estimates(lf, node_classes, sd15, linfusion_dir, tokens: int, shapes) -> list[float]:
    """What ComfyUI's memory planning is told for each of `shapes` while a hybrid model samples."""
    put_weights(lf, linfusion_dir, "sd15", sd15)
    patched = apply(node_classes, sd15, "auto", softmax_max_tokens=tokens)
    seen = []

    def callback(step, *_):
        if step == 0:
            seen.extend(patched.model.memory_required(s) for s in shapes)

    helpers.sample(patched, "sd15", latent_hw=(8, 8), steps=1, callback=callback)
    return seen


def test_hybrid_estimate_counts_only_softmax_layers_at_this_size(lf, pack, node_classes, sd15, linfusion_dir,
                                                                 sd15_attn1_tokens):
    """Before: 16384 tokens on a 512 px image claimed 43 GB (2 x 20 heads x 16384^2 x 4 bytes,
    whatever the image); the widget maximum 2^24 on a 64 px image claimed 22.5 PB. Now: the
    linear estimate plus the largest fp32 score matrix (batch x heads x tokens^2 x 4 bytes) among
    the layers that really run softmax at this size. Reference: the tokens and heads each layer
    saw in a real step at 16x16 (hooks), times 16 at 64x64 (512 px) and / 4 at 8x8 (64 px);
    equal within 1%."""
    _, seen = sd15_attn1_tokens
    shapes = {512: [2, 4, 64, 64], 64: [2, 4, 8, 8]}
    per_16 = [(heads, t) for _b, t, heads in seen.values()]

    def reference(px, threshold):
        scale = (px // 8) ** 2 / 256
        scores = max([2 * h * int(t * scale) ** 2 * 4 for h, t in per_16 if t * scale <= threshold], default=0)
        return lf.memory.inference_bytes(shapes[px], 4, sd15.model.memory_usage_factor) + scores, scores

    for threshold in (16384, 1023):
        got = dict(zip(shapes, hybrid_estimates(lf, node_classes, sd15, linfusion_dir, threshold, shapes.values())))
        for px in shapes:
            assert got[px] == pytest.approx(reference(px, threshold)[0], rel=0.01), (px, threshold)
        if threshold == 16384:  # every level keeps softmax: 2 x 8 heads x 4096^2 x 4 bytes = 1.07 GB
            assert reference(512, threshold)[1] == 2 * 8 * 4096 ** 2 * 4 and got[512] < 1.5e9  # 42.9e9 before
        else:  # only the 16x16 and 8x8 levels keep softmax
            assert reference(512, threshold)[1] == 2 * 8 * 256 ** 2 * 4
    unet = sd15.model.diffusion_model
    layers = pack.nodes.apply.softmax_layers_of(unet, {p: unet.get_submodule(p) for p in seen})
    huge = pack.nodes.apply.linfusion_memory_required(sd15.model, shapes[64], 1 << 24, layers)
    assert huge == pytest.approx(reference(64, 1 << 24)[0])
    assert huge < 5e6  # 22.5e15 before; 4.0 MB now, mostly the linear part


@pytest.mark.parametrize(("value", "shown"), [(1 << 62, str(1 << 62)), (-64, "-64"), (math.nan, "nan"),
                                               (2.5, "2.5"), ("4096", "'4096'"), (True, "True")])
def test_linked_softmax_max_tokens_checked_like_the_widget(lf, node_classes, sd15, linfusion_dir, value, shown):
    """Before: a linked 2^62 was accepted (its estimate 3.4e39 bytes)."""
    put_weights(lf, linfusion_dir, "sd15", sd15)
    with pytest.raises(ValueError) as exc:
        apply(node_classes, sd15, "auto", softmax_max_tokens=value)
    text = str(exc.value)
    assert f"Apply LinFusion: input 'softmax_max_tokens' is {shown}" in text, text
    assert f"a whole number from 0 to {1 << 24}" in text and "check the node linked to this input" in text


def test_linked_weights_of_another_type_refused(lf, node_classes, sd15, linfusion_dir):
    put_weights(lf, linfusion_dir, "sd15", sd15)
    with pytest.raises(ValueError, match="must be the name of an entry in the list, got int 3: pick 'auto'"):
        apply(node_classes, sd15, 3)
    assert apply(node_classes, sd15, "auto", softmax_max_tokens=4096.0) is not None  # a whole float is fine


# -- item 6: weights metadata nested 10^5 deep ---------------------------------------------------------
@pytest.mark.parametrize("where", ["metadata", "config.json"])
def test_deeply_nested_config_refused_with_a_message(lf, tmp_path, where):
    """Before: RecursionError from json.loads."""
    text = "[" * 100_000 + "]" * 100_000
    d = tmp_path / "w"
    d.mkdir()
    f = d / "diffusion_pytorch_model.safetensors"
    if where == "metadata":
        helpers.raw_safetensors(f, 1, {"linfusion_config": text})
    else:
        helpers.raw_safetensors(f, 1)
        (d / "config.json").write_text(text)
    with pytest.raises(lf.LinFusionWeightsError, match="is nested too deeply to be a LinFusion config .* download it "
                                                       "again"):
        lf.load_weights(d)
