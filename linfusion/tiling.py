"""Tiled application of a resolution-changing function (a VAE's decoder or encoder) with one
output buffer, in pure PyTorch.

At 16K a decoded image is 16384 x 16384 x 3 fp32 = 3.2 GB of host memory. The usual tiled
scheme (ComfyUI's tiled_scale) accumulates the weighted tiles in one full-size buffer and the
weights in another, divides them into a third, and ComfyUI's 2-D VAE decode runs that three
times with differently shaped tiles and averages the results: several full-size buffers at
once and three decodes of every pixel. Here each tile is decoded once and added into the
single output with weights that already sum to one:

* along each axis the tiles are spans of `tile` input units, evenly spread so that
  neighbours overlap by at least `overlap`, starts on multiples of `align`;
* a span's 1-D weight ramps linearly over `overlap` output units at each side that has a
  neighbour (none at the image border), and the weights of all spans are divided by their sum
  at every position (a 1-D array per axis);
* a tile's 2-D weight is the product of its two 1-D weights, so the 2-D weights also sum to
  one everywhere (the sum over a grid of products is the product of the sums) and no
  full-size weight buffer is needed.

A function that is pointwise across tiles (the same value whichever tile computes it) comes
out unchanged up to rounding; a VAE gives the seamless blend of its tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def spans(size: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, end) spans of length `tile` (or `size`, if smaller) covering 0..size, neighbours
    overlapping by at least `overlap`, starts multiples of `align` (size and tile should be)."""
    if size <= tile:
        return [(0, size)]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be from 0 to below the tile size {tile}")
    last = size - tile
    step = tile - overlap - (align - 1)  # before rounding starts down to `align`
    if step <= 0:
        raise ValueError(f"tile {tile} leaves no room for overlap {overlap} at alignment {align}")
    n = math.ceil(last / step) + 1
    starts = sorted({(i * last // (n - 1)) // align * align for i in range(n)} | {last})
    return [(s, s + tile) for s in starts]


def axis_weights(parts: list[tuple[int, int]], size: int, ramp: float, dtype=torch.float32) -> list[torch.Tensor]:
    """1-D blend weights (output units) for `parts` (spans in output units) of an axis of `size`:
    linear ramps of `ramp` units at inner edges, normalised so that they sum to 1 everywhere."""
    total = torch.zeros(size, dtype=torch.float64)
    raw = []
    for s, e in parts:
        x = torch.arange(s, e, dtype=torch.float64) + 0.5
        w = torch.ones(e - s, dtype=torch.float64)
        if ramp > 0 and s > 0:
            w = torch.minimum(w, (x - s) / ramp)
        if ramp > 0 and e < size:
            w = torch.minimum(w, (e - x) / ramp)
        raw.append(w)
        total[s:e] += w
    if (total <= 0).any():
        raise ValueError("tiles leave a gap: every position must be inside some tile")
    return [(w / total[s:e]).to(dtype) for w, (s, e) in zip(raw, parts)]


def tiled_map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
              scale: tuple[int, int] = (1, 1), dims: tuple[int, int] = (2, 3), out_dims: tuple[int, int] = (2, 3),
              align: int = 1, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """fn applied to tiles of x, blended into one output.

    x: spatial axes `dims` (height, width). fn maps a tile to a tensor whose spatial axes
    `out_dims` are the tile's sizes times scale[0] / scale[1] (8/1 for a VAE decoder, 1/8 for
    an encoder; tile starts then need `align` = scale[1]). The output is allocated once, on
    the device and in the dtype of fn's first result, and each tile's result is added into it
    with the weights of `axis_weights`. `progress(done, total)` is called after each tile (an
    interrupt raised there stops the work)."""
    num, den = scale
    hy, wx = x.shape[dims[0]], x.shape[dims[1]]
    if hy % den or wx % den or tile % den or overlap % den:
        raise ValueError(f"sizes {hy}x{wx}, tile {tile} and overlap {overlap} must be multiples of {den}")
    rows, cols = spans(hy, tile, overlap, den), spans(wx, tile, overlap, den)
    out_h, out_w = hy * num // den, wx * num // den
    ramp = overlap * num / den
    wr = axis_weights([(a * num // den, b * num // den) for a, b in rows], out_h, ramp)
    wc = axis_weights([(a * num // den, b * num // den) for a, b in cols], out_w, ramp)
    out = None
    done, total = 0, len(rows) * len(cols)
    for (r0, r1), w_r in zip(rows, wr):
        for (c0, c1), w_c in zip(cols, wc):
            y = fn(x.narrow(dims[0], r0, r1 - r0).narrow(dims[1], c0, c1 - c0))
            if out is None:
                shape = list(y.shape)
                shape[out_dims[0]], shape[out_dims[1]] = out_h, out_w
                out = torch.zeros(shape, dtype=y.dtype, device=y.device)
            view = [1] * y.ndim
            view[out_dims[0]], view[out_dims[1]] = -1, 1
            weight = w_r.to(y.device, y.dtype).view(view) * w_c.to(y.device, y.dtype).view(
                [-1 if i == out_dims[1] else 1 for i in range(y.ndim)])
            region = out.narrow(out_dims[0], r0 * num // den, y.shape[out_dims[0]]).narrow(
                out_dims[1], c0 * num // den, y.shape[out_dims[1]])
            region.addcmul_(y, weight)
            del y
            done += 1
            if progress is not None:
                progress(done, total)
    return out
