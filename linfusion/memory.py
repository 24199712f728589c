"""How much inference memory a LinFusion-patched UNet needs: the numbers shared by the ComfyUI
glue (which hands them to ComfyUI's memory planning) and the benchmarks (which check them
against the device-memory tracker, bench/devmem.py).

Both estimates are activation bytes of one UNet evaluation (ComfyUI counts the weights
apart), linear in latent area. Calibrated with bench/devmem.py (fp16, 1024-16384 px, the
full layouts; bench/RESULTS.md, "Device memory"): the normal path's peak is 0.00795 MiB per
latent element-byte for SD1.x/2.x and 0.0048 for SDXL at every size; with
`memory_usage_factor` (1.0 and 0.8) one coefficient puts both within 20%.
"""

from __future__ import annotations

import math

from .banded import MIN_CHUNK_BYTES

# MiB per latent element (batch x latent height x width) per byte of the compute dtype, times
# the model's memory-usage factor: 0.007 gives 0.88x the tracker's peak for SD1.x/2.x and
# 1.17x for SDXL. (ComfyUI uses 0.01 for attention backends whose memory is linear in the
# tokens, and 0.15 MiB per element, whatever the dtype, for the others, which assume softmax
# attention's quadratic temporaries.) The previous value, 0.012, was fitted to fp32 CPU RSS,
# which carries the CPU's convolution scratch; it read 1.5x high against the device peak.
LINEAR_MIB_PER_ELEMENT_BYTE = 0.007
SOFTMAX_HEADS_MAX = 20  # the most heads any supported family has in one self-attention layer

# low_memory (nodes/lowmem.py: one cond per evaluation, banded resnets, upsamplers and out
# head, the decoder's skip concatenations left to the banded resnets, k/v-then-streamed-q
# LinFusion layers, token-chunked feed-forward and cross-attention, skips parked in host
# memory): bytes of ONE evaluation, fitted to the tracker (fp16, bench/RESULTS.md). What is
# left at the peak is a few full-size maps that ComfyUI's own blocks hold at once: in a
# transformer block of the first level with attention (SD1.x/2.x: the latent's own size,
# SDXL: half of it), or the decoder's banded resnets at the full size. Once the
# full-resolution feature maps (320 channels) reach MIN_CHUNK_BYTES the resnets run in bands,
# whose fixed-size scratch is the constant term; below, a plain coefficient.
#   key: attention at full resolution? -> (MiB fixed, MiB per element-byte banded, unbanded)
LOW_MEMORY_FIT = {True: (200.0, 0.00213, 0.00625), False: (200.0, 0.00110, 0.00406)}
FULL_RES_CHANNELS = 320  # model_channels of every supported family


# Hybrid mode without a layer list: a softmax layer at each of the four levels of SD1.x/2.x
# (latent size, /2, /4, /8), each with the most heads: an upper bound for every family.
DEFAULT_SOFTMAX_LAYERS = tuple((level, SOFTMAX_HEADS_MAX) for level in range(4))


def tokens_at_level(latent_hw, level: int) -> int:
    """Tokens of a self-attention layer `level` downsamplings below a latent of size `latent_hw`
    (each of the UNet's stride-2 convolutions, padding 1, rounds a side up)."""
    out = 1
    for s in latent_hw:
        out *= -(-int(s) // (1 << level))
    return out


def softmax_bytes(input_shape, softmax_max_tokens: int, layers=DEFAULT_SOFTMAX_LAYERS) -> float:
    """Hybrid mode's peak extra: the largest fp32 score matrix (batch x heads x tokens^2) among
    the `layers` ((downsampling level, heads) of each self-attention layer) that keep softmax
    at this input's size, i.e. whose tokens are at most `softmax_max_tokens`. Layers run one
    after another, so only the largest counts; a layer above the threshold runs LinFusion and
    adds nothing beyond the linear estimate."""
    if softmax_max_tokens <= 0:
        return 0.0
    hw = input_shape[2:]
    peak = 0
    for level, heads in layers:
        t = tokens_at_level(hw, level)
        if t <= softmax_max_tokens:
            peak = max(peak, heads * t * t)
    return float(input_shape[0] * peak * 4)


def inference_bytes(input_shape, dtype_size: int, usage_factor: float = 1.0, softmax_max_tokens: int = 0,
                    softmax_layers=DEFAULT_SOFTMAX_LAYERS) -> float:
    """Bytes a LinFusion UNet needs for an input (B, C, H, W): linear in latent area. Hybrid mode
    adds the largest score matrix of the layers that keep softmax at this size (`softmax_bytes`)."""
    b = input_shape[0]
    area = b
    for s in input_shape[2:]:
        area *= s
    linear = area * dtype_size * LINEAR_MIB_PER_ELEMENT_BYTE * usage_factor * (1 << 20)
    return linear + softmax_bytes(input_shape, softmax_max_tokens, softmax_layers)


def low_memory_inference_bytes(input_shape, dtype_size: int, attention_at_full_res: bool = True) -> float:
    """Bytes one low-memory UNet evaluation of an input (B, C, H, W) needs (B: the batch of one
    evaluation, i.e. one cond of the latent batch). `attention_at_full_res`: the UNet has
    transformer blocks at the latent's own resolution (SD1.x/2.x yes, SDXL no)."""
    element_bytes = input_shape[0] * math.prod(input_shape[2:]) * dtype_size
    fixed, per_banded, per_plain = LOW_MEMORY_FIT[bool(attention_at_full_res)]
    if element_bytes * FULL_RES_CHANNELS >= MIN_CHUNK_BYTES:
        return (fixed + element_bytes * per_banded) * (1 << 20)
    return element_bytes * per_plain * (1 << 20)
