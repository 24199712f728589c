"""ApplyLinFusion on small models with the real layouts, through ComfyUI's own patching and sampling."""

from __future__ import annotations

import os
import time

import comfy.lora
import comfy.model_management
import helpers
import pytest
import torch
from helpers import apply, attn1_objects, put_weights


class CallCounter:
    def __init__(self, modules):
        self.calls = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *_):
        self.calls += 1

    def close(self):
        for h in self.handles:
            h.remove()


def test_apply_replaces_every_attn1_and_keeps_the_input_model(lf, node_classes, small, linfusion_dir):
    kind, model = small
    put_weights(lf, linfusion_dir, kind, model)
    hw = (8, 8) if kind == "sdxl" else (16, 16)  # SDXL's 70 layers are the slow part on CPU
    plain_before = helpers.sample(model, kind, latent_hw=hw)
    originals = attn1_objects(model)
    originals_sd = {k: v.clone() for k, v in model.model.state_dict().items()}

    patched = apply(node_classes, model, "auto")
    n_layers = {"sd15": 16, "sd21": 16, "sdxl": 70}[kind]
    assert len(patched.object_patches) == n_layers and not model.object_patches

    steps = 3
    layers = [patched.object_patches[k] for k in sorted(patched.object_patches)]
    counter = CallCounter(layers)
    try:
        out = helpers.sample(patched, kind, steps=steps, latent_hw=hw)
    finally:
        counter.close()
    # CFG batches cond and uncond into one UNet call per step (euler: one call per step)
    assert counter.calls == n_layers * steps
    assert out.shape == plain_before.shape and torch.isfinite(out).all()
    assert (out - plain_before).abs().max() > 1e-3

    # the plain model is untouched: same objects, bit-identical weights and output
    plain_after = helpers.sample(model, kind, latent_hw=hw)
    assert torch.equal(plain_after, plain_before)
    assert all(attn1_objects(model)[k] is v for k, v in originals.items())
    assert all(torch.equal(v, originals_sd[k]) for k, v in model.model.state_dict().items())
    # patched again -> same output (patched -> plain -> patched)
    assert torch.equal(helpers.sample(patched, kind, steps=steps, latent_hw=hw), out)


def test_every_parametered_leaf_supports_comfy_casting(lf, node_classes, sd15, linfusion_dir):
    """Partial (low-VRAM) loading needs ComfyUI's layer classes on every weight-bearing leaf."""
    put_weights(lf, linfusion_dir, "sd15", sd15)
    patched = apply(node_classes, sd15, "auto")
    comfy.model_management.load_models_gpu([patched])
    try:
        leaves = [(n, m) for n, m in patched.model.named_modules()
                  if list(m.parameters(recurse=False)) and ".attn1." in n + "."]
        assert len(leaves) == 16 * 10  # q k v out + 2 x (linear, norm, linear)
        missing = [n for n, m in leaves if not hasattr(m, "comfy_cast_weights")]
        assert missing == []
    finally:
        comfy.model_management.unload_all_models()


def test_half_precision_model_gets_half_layers(lf, node_classes, linfusion_dir):
    model = helpers.small_model("sd15")
    model.model.to(torch.float16)
    put_weights(lf, linfusion_dir, "sd15", model)
    patched = apply(node_classes, model, "auto")
    dtypes = {p.dtype for layer in patched.object_patches.values() for p in layer.parameters()}
    assert dtypes == {torch.float16}


def test_lora_on_attn1_reaches_linfusion_and_is_restored(lf, node_classes, sd15, linfusion_dir):
    put_weights(lf, linfusion_dir, "sd15", sd15)
    patched = apply(node_classes, sd15, "auto")
    path = "input_blocks.1.1.transformer_blocks.0.attn1"
    key = f"diffusion_model.{path}.to_q.weight"
    layer = patched.object_patches[f"diffusion_model.{path}"]
    before = layer.to_q.weight.detach().clone()
    delta = torch.randn_like(before) * 0.1
    with_lora = patched.clone()
    assert with_lora.add_patches({key: ("diff", (delta,))}, 1.0) == [key]

    out_plain = helpers.sample(patched, "sd15")
    comfy.model_management.load_models_gpu([with_lora])
    assert (layer.to_q.weight - (before + delta)).abs().max() < 1e-6
    out_lora = helpers.sample(with_lora, "sd15")
    comfy.model_management.unload_all_models()
    assert torch.equal(layer.to_q.weight, before)  # bit-identical restore
    assert (out_lora - out_plain).abs().max() > 1e-4
    assert torch.equal(helpers.sample(patched, "sd15"), out_plain)


def test_hybrid_below_threshold_is_the_models_own_attention(lf, node_classes, sd15, linfusion_dir):
    put_weights(lf, linfusion_dir, "sd15", sd15)
    plain = helpers.sample(sd15, "sd15")
    # 16x16 latent: the largest attn1 level has 256 tokens
    everywhere_softmax = apply(node_classes, sd15, "auto", softmax_max_tokens=256)
    assert torch.equal(helpers.sample(everywhere_softmax, "sd15"), plain)
    full = helpers.sample(apply(node_classes, sd15, "auto"), "sd15")
    mixed = helpers.sample(apply(node_classes, sd15, "auto", softmax_max_tokens=64), "sd15")
    assert (mixed - plain).abs().max() > 1e-4 and (mixed - full).abs().max() > 1e-4

    # layer level: exact equality with the original module below the threshold, LinFusion above
    layer = everywhere_softmax.object_patches["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1"]
    x = torch.randn(2, 256, layer.dim)
    assert torch.equal(layer(x), layer.softmax_attn(x))
    layer_lin = apply(node_classes, sd15, "auto", softmax_max_tokens=255).object_patches[
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1"]
    assert not torch.allclose(layer_lin(x), layer.softmax_attn(x))


def test_hybrid_lora_reaches_the_softmax_path(lf, node_classes, sd15, linfusion_dir):
    """In hybrid mode a LoRA on attn1 still changes the model's own attention where it runs,
    exactly as on the plain model, whether the LoRA comes before or after ApplyLinFusion."""
    put_weights(lf, linfusion_dir, "sd15", sd15)
    keys = [f"diffusion_model.{p}.to_v.weight" for p in
            ("input_blocks.1.1.transformer_blocks.0.attn1", "output_blocks.11.1.transformer_blocks.0.attn1")]
    unet = sd15.model.diffusion_model
    lora = {k: ("diff", (0.2 * torch.randn(unet.get_parameter(k[len("diffusion_model."):]).shape),)) for k in keys}

    plain_lora = sd15.clone()
    plain_lora.add_patches(lora, 1.0)
    expected = helpers.sample(plain_lora, "sd15")
    assert (expected - helpers.sample(sd15, "sd15")).abs().max() > 1e-4

    before = apply(node_classes, plain_lora, "auto", softmax_max_tokens=4096)
    assert torch.equal(helpers.sample(before, "sd15"), expected)
    after = apply(node_classes, sd15, "auto", softmax_max_tokens=4096).clone()
    after.add_patches(lora, 1.0)
    assert torch.equal(helpers.sample(after, "sd15"), expected)
    comfy.model_management.unload_all_models()
    # and the plain model's own weights were restored bit for bit
    assert torch.equal(helpers.sample(sd15, "sd15"), helpers.sample(helpers.small_model("sd15"), "sd15"))


def test_auto_offline_without_files_names_repo_and_folder(lf, node_classes, small, linfusion_dir):
    kind, model = small
    fam = lf.FAMILIES[helpers.LF_FAMILY[kind]]
    t = time.time()
    with pytest.raises(lf.LinFusionWeightsError) as e:
        apply(node_classes, model, "auto")
    msg = str(e.value)
    assert fam.repo_id in msg and str(linfusion_dir / fam.folder_name) in msg and "huggingface.co" in msg
    assert time.time() - t < 30
    assert list(linfusion_dir.iterdir()) == []  # no half-downloaded leftovers
    assert not model.object_patches


def test_wrong_family_weights_are_refused_at_apply(lf, node_classes, linfusion_dir):
    sd15, sdxl = helpers.small_model("sd15"), helpers.small_model("sdxl")
    put_weights(lf, linfusion_dir, "sdxl", sdxl, name="xl_weights")
    with pytest.raises(lf.IncompatibleModelError, match=r"SDXL layout.*model is SD1\.x.*Yuanshi/LinFusion-1-5"):
        apply(node_classes, sd15, "xl_weights")
    assert not sd15.object_patches


def test_unsupported_models_get_a_clear_error(lf, node_classes, linfusion_dir):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models as sm

    refiner_cfg = dict(helpers.LAYOUTS["sdxl"][1], model_channels=384, transformer_depth=[0, 0, 4, 4, 4, 4, 0, 0],
                       channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2], context_dim=1280, adm_in_channels=2560,
                       transformer_depth_output=[0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0], transformer_depth_middle=4)
    with torch.device("meta"):
        refiner = comfy.model_base.SDXLRefiner(sm.SDXLRefiner(refiner_cfg))
    patcher = comfy.model_patcher.ModelPatcher(refiner, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    with pytest.raises(lf.IncompatibleModelError, match=r"unsupported UNet \(44 self-attention.*LinFusion-XL"):
        apply(node_classes, patcher, "auto")


def test_weights_are_cached_while_the_file_is_unchanged(lf, pack, node_classes, sd15, linfusion_dir):
    folder = put_weights(lf, linfusion_dir, "sd15", sd15, name="mine")
    cache = pack.nodes.weights_store.CACHE
    apply(node_classes, sd15, "mine")
    loads = cache.loads
    apply(node_classes, sd15, "mine")
    assert cache.loads == loads
    f = folder / "diffusion_pytorch_model.safetensors"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    apply(node_classes, sd15, "mine")
    assert cache.loads == loads + 1


def test_choices_list_folders_and_files(lf, pack, sd15, linfusion_dir):
    put_weights(lf, linfusion_dir, "sd15", sd15, name="a_folder")
    (linfusion_dir / "a_folder" / "training_state.safetensors").write_bytes(b"")
    (linfusion_dir / "loose.safetensors").write_bytes(b"")
    (linfusion_dir / "old.ckpt").write_bytes(b"")
    (linfusion_dir / "x.partial").mkdir()
    (linfusion_dir / "x.partial" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    shared = linfusion_dir.parent / "shared_store" / "LinFusion-XL"
    shared.mkdir(parents=True)
    (shared / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (linfusion_dir / "linked").symlink_to(shared.parent, target_is_directory=True)
    assert pack.nodes.weights_store.choices() == [
        "auto", "a_folder", "linked/LinFusion-XL", "loose.safetensors", "old.ckpt"]


def test_memory_estimate_is_linear_while_sampling_and_restored(lf, pack, node_classes, sd15, linfusion_dir):
    """ComfyUI plans memory with BaseModel.memory_required; for a patched model it must be the
    linear estimate during sampling (4K..16K latents: far below the softmax estimate), and the
    shared base model must get its own method back afterwards."""
    put_weights(lf, linfusion_dir, "sd15", sd15)
    patched = apply(node_classes, sd15, "auto")
    base = sd15.model
    shapes = {px: [2, 4, px // 8, px // 8] for px in (4096, 8192, 16384)}
    plain = {px: base.memory_required(s) for px, s in shapes.items()}
    seen = {}

    def callback(step, *_):
        if step == 0:
            seen.update({px: patched.model.memory_required(s) for px, s in shapes.items()})

    helpers.sample(patched, "sd15", steps=2, callback=callback)
    expected = {px: pack.nodes.apply.linfusion_memory_required(base, s) for px, s in shapes.items()}
    assert seen == expected
    # the node hands ComfyUI this model's dtype (fp32 here) and usage factor
    assert base.get_dtype() == torch.float32
    assert expected[16384] == lf.memory.inference_bytes(shapes[16384], 4, base.memory_usage_factor)
    # independent number: bench/devmem.py's device-memory tracker measured 130.00 GiB of
    # activations for this SD1.5 layout at 16384 px, batch 2, fp16 (bench/RESULTS.md, "Device
    # memory of a high-res stage", normal); the estimate must stay within 20% of it
    fp16 = lf.memory.inference_bytes(shapes[16384], 2, base.memory_usage_factor)
    assert 0.8 < fp16 / (130.00 * 2**30) < 1.2
    assert expected[8192] * 4 == expected[16384]  # linear in area
    assert all(seen[px] < plain[px] / 3 for px in shapes)  # CPU baseline: sub-quadratic estimate
    assert "memory_required" not in vars(base)  # restored
    assert base.memory_required(shapes[4096]) == plain[4096]
