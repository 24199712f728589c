"""How much inference memory a LinFusion-patched UNet needs: one number, shared by the
ComfyUI glue (which hands it to ComfyUI's memory planning) and the benchmarks (which check
it against measured peaks)."""

from __future__ import annotations

# MiB per latent element (batch x latent height x width) per byte of the compute dtype, times
# the model's memory-usage factor. Calibrated on the full SD1.5 layout, one UNet step of
# batch 2 in fp32 (bench/step.py, 2026-11-26): measured 0.0109 at 1024 px; 0.012 keeps the
# measured peak under the estimate. ComfyUI uses 0.01 for attention backends whose memory is
# linear in the tokens, and 0.15 MiB per element, whatever the dtype, for the others
# (sub-quadratic, split), which assume softmax attention's quadratic temporaries.
LINEAR_MIB_PER_ELEMENT_BYTE = 0.012
SOFTMAX_HEADS_MAX = 20  # the most heads any supported family has in one self-attention layer


def inference_bytes(input_shape, dtype_size: int, usage_factor: float = 1.0, softmax_max_tokens: int = 0) -> float:
    """Bytes a LinFusion UNet needs for an input (B, C, H, W): linear in latent area. Hybrid mode
    adds the softmax layers' fp32 score matrices, at most `softmax_max_tokens` tokens each."""
    b = input_shape[0]
    area = b
    for s in input_shape[2:]:
        area *= s
    linear = area * dtype_size * LINEAR_MIB_PER_ELEMENT_BYTE * usage_factor * (1 << 20)
    return linear + b * SOFTMAX_HEADS_MAX * softmax_max_tokens ** 2 * 4
