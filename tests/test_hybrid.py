"""Hybrid mode (softmax_max_tokens > 0) and weight patches: the kept softmax layer
(`<attn1>.softmax_attn`) sees the LoRA the model has, through ComfyUI's own patch mechanism (no
ON_LOAD callback, no weight written by the pack): loaded whole, loaded per layer in low-VRAM
mode, in a copy of the model ComfyUI made, before or after Apply LinFusion; and the model's
weights come back bit for bit."""

from __future__ import annotations

import copy

import comfy.model_management
import helpers
import pytest
import torch
from comfy.patcher_extension import CallbacksMP
from hybrid_cases import PATH, TENSORS, during_sampling, pristine_attn_weights, reference_attention


def softmax_path_error(patcher, want: dict) -> float:
    """Max abs difference between the kept softmax layer of the LOADED `patcher` at PATH and the
    written-out attention with weights `want`."""
    layer = patcher.model.diffusion_model.get_submodule(PATH)
    assert "LinFusionAttention" in {t.__name__ for t in type(layer).__mro__} and layer.uses_softmax(256)
    x = torch.randn(2, 256, layer.dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return (layer(x) - reference_attention(x, want, layer.softmax_attn.heads)).abs().max().item()


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-before-apply", "lora-after-apply"])
def test_softmax_path_computes_with_the_lora_weights(node_classes, hybrid_case, lora_first):
    model, pristine, lora, loraed = hybrid_case
    if lora_first:
        m = model.clone()
        m.add_patches(lora, 1.0)
        hybrid = helpers.apply(node_classes, m, "auto", 4096)
    else:
        hybrid = helpers.apply(node_classes, model, "auto", 4096).clone()
        hybrid.add_patches(lora, 1.0)
    # no ON_LOAD callback: the softmax layer's patches are ComfyUI's own, on its own keys
    assert not any(hybrid.callbacks.get(CallbacksMP.ON_LOAD, {}).values())
    err = during_sampling(hybrid, lambda: softmax_path_error(hybrid, loraed))
    assert err < 2e-5
    comfy.model_management.unload_all_models()
    # bit-identical restore of the model's own weights
    after = pristine_attn_weights(model)
    assert all(torch.equal(after[t], pristine[t]) for t in TENSORS)
    # and without the LoRA the softmax path is the model's own attention again
    plain_hybrid = helpers.apply(node_classes, model, "auto", 4096)
    assert during_sampling(plain_hybrid, lambda: softmax_path_error(plain_hybrid, pristine)) < 2e-5


def test_lora_added_after_a_sampled_and_still_loaded_hybrid_model(node_classes, hybrid_case):
    """The hybrid model samples (and stays loaded), then a LoRA clone of it samples: ComfyUI
    re-patches, and the softmax path follows; the first model is unchanged afterwards."""
    model, pristine, lora, loraed = hybrid_case
    hybrid = helpers.apply(node_classes, model, "auto", 4096)
    assert during_sampling(hybrid, lambda: softmax_path_error(hybrid, pristine)) < 2e-5
    with_lora = hybrid.clone()
    with_lora.add_patches(lora, 1.0)
    assert during_sampling(with_lora, lambda: softmax_path_error(with_lora, loraed)) < 2e-5
    assert during_sampling(hybrid, lambda: softmax_path_error(hybrid, pristine)) < 2e-5
    comfy.model_management.unload_all_models()
    assert all(torch.equal(pristine_attn_weights(model)[t], pristine[t]) for t in TENSORS)


def test_lowvram_per_layer_patching_reaches_the_softmax_path(pack, node_classes, hybrid_case):
    """Low-VRAM loading leaves weights unpatched and applies the patches per operation (as
    Dynamic VRAM does for every layer): the softmax layer's mirrored patches work that way too."""
    model, pristine, lora, loraed = hybrid_case
    hybrid = helpers.apply(node_classes, model, "auto", 4096).clone()
    hybrid.add_patches(lora, 1.0)
    pack.nodes.apply.mirror_patches_to_softmax(hybrid, [PATH])  # what the sampling wrapper does
    hybrid.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        soft = hybrid.model.diffusion_model.get_submodule(PATH).softmax_attn
        assert torch.equal(soft.to_q.weight, pristine["to_q.weight"])  # not written ...
        assert len(soft.to_q.weight_function) == 1  # ... applied per operation
        assert softmax_path_error(hybrid, loraed) < 2e-5
    finally:
        hybrid.unpatch_model(torch.device("cpu"))
    assert all(torch.equal(pristine_attn_weights(model)[t], pristine[t]) for t in TENSORS)


def test_a_copy_of_the_model_uses_its_own_softmax_layers(node_classes, hybrid_case):
    """ComfyUI may sample a deep copy of the model (one per GPU): the kept softmax layer is bound
    to the copy actually sampled, not to the model the node saw."""
    model, pristine, lora, loraed = hybrid_case
    hybrid = helpers.apply(node_classes, model, "auto", 4096).clone()
    hybrid.add_patches(lora, 1.0)
    copied = hybrid.clone()
    copied.backup = {}
    copied.object_patches_backup = {}
    copied.model = copy.deepcopy(hybrid.model)
    copy_own = copied.model.diffusion_model.get_submodule(PATH)

    def probe():
        layer = copied.model.diffusion_model.get_submodule(PATH)
        return layer.softmax_attn is copy_own, softmax_path_error(copied, loraed)

    same, err = during_sampling(copied, probe)
    assert same and err < 2e-5
    comfy.model_management.unload_all_models()
    # the original model, sampled again, gets its own layers back
    own = model.model.diffusion_model.get_submodule(PATH)
    same, err = during_sampling(hybrid, lambda: (
        hybrid.model.diffusion_model.get_submodule(PATH).softmax_attn is own, softmax_path_error(hybrid, loraed)))
    assert same and err < 2e-5
