"""Checks that need an NVIDIA GPU (marked `cuda`: skipped without one; scripts/gpu_check.py runs
them with LINFUSION_TEST_GPU=1, ComfyUI in GPU mode)."""

from __future__ import annotations

import comfy.model_management
import helpers
import pytest
import torch
from hybrid_cases import PATH, TENSORS, during_sampling, pristine_attn_weights, reference_attention

pytestmark = pytest.mark.cuda


def test_linfusion_layer_in_fp16_on_the_gpu_matches_fp32(lf):
    """The fp16 GPU path of one SD1.5 first-level layer against the fp32 CPU computation."""
    torch.manual_seed(0)
    layer = lf.LinFusionAttention(320, 8).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 320 ** -0.5)
    x = torch.randn(2, 4096, 320)
    with torch.no_grad():
        ref = layer(x)
        out = layer.to("cuda", torch.float16)(x.to("cuda", torch.float16)).float().cpu()
    assert (out - ref).abs().max() < 2e-2 * ref.abs().max()


def test_hybrid_lora_on_the_gpu(node_classes, hybrid_case):
    """test_hybrid's check with ComfyUI loading the model on the GPU (whole, or per operation
    under Dynamic VRAM where this ComfyUI has it)."""
    if comfy.model_management.get_torch_device().type != "cuda":
        pytest.skip("ComfyUI is in CPU mode here: run with LINFUSION_TEST_GPU=1 (scripts/gpu_check.py)")
    model, pristine, lora, loraed = hybrid_case
    hybrid = helpers.apply(node_classes, model, "auto", 4096).clone()
    hybrid.add_patches(lora, 1.0)

    def probe():
        layer = hybrid.model.diffusion_model.get_submodule(PATH)
        dev = next(layer.softmax_attn.parameters()).device
        x = torch.randn(2, 256, layer.dim, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            out = layer(x.to(dev)).cpu()
        return dev.type, (out - reference_attention(x, loraed, layer.softmax_attn.heads)).abs().max().item()

    dev, err = during_sampling(hybrid, probe)
    assert dev == "cuda" and err < 1e-3
    comfy.model_management.unload_all_models()
    after = pristine_attn_weights(model)
    assert all(torch.equal(after[t], pristine[t]) for t in TENSORS)
