"""The hybrid-mode LoRA case of tests/test_hybrid.py and tests/test_cuda.py: a LoRA ('diff' patch) on
the attention tensors of one SD1.5 first-level self-attention layer (PATH), the softmax attention
written out to compare that layer with, and a probe run at the first step of a real sampling run.
The fixture that builds the case, `hybrid_case`, is in conftest.py.
"""

from __future__ import annotations

import helpers
import torch

PATH = "input_blocks.1.1.transformer_blocks.0.attn1"  # SD1.5's first level: 256 tokens at 16x16
TENSORS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")


def lora_for(model, scale=0.2, seed=3) -> dict:
    """A 'diff' patch on every attention tensor of the layer at PATH (ComfyUI keys)."""
    g = torch.Generator().manual_seed(seed)
    unet = model.model.diffusion_model
    return {f"diffusion_model.{PATH}.{t}": ("diff", (scale * torch.randn(unet.get_parameter(f"{PATH}.{t}").shape,
                                                                          generator=g),))
            for t in TENSORS}


def reference_attention(x: torch.Tensor, w: dict, heads: int) -> torch.Tensor:
    """Softmax self-attention written out: x (B, N, C) with weights w (ComfyUI tensor names)."""
    b, n, c = x.shape
    q, k, v = (x @ w[f"to_{t}.weight"].T for t in "qkv")
    q, k, v = (t.view(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)
    out = (att @ v).transpose(1, 2).reshape(b, n, c)
    return out @ w["to_out.0.weight"].T + w["to_out.0.bias"]


def with_lora(pristine: dict, lora: dict) -> dict:
    """The attention tensors at PATH with the 'diff' patch of lora_for added."""
    return {t: pristine[t] + lora[f"diffusion_model.{PATH}.{t}"][1][0] for t in TENSORS}


def pristine_attn_weights(model) -> dict:
    unet = model.model.diffusion_model
    return {t: unet.get_parameter(f"{PATH}.{t}").detach().clone() for t in TENSORS}


def during_sampling(patcher, probe):
    """Run `probe(patcher)` at the first step of a real sampling run of `patcher` (loaded then)."""
    seen = []
    helpers.sample(patcher, "sd15", steps=1, callback=lambda step, *_: seen.append(probe()) if step == 0 else None)
    return seen[0]
