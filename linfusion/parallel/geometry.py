"""Row geometry of band parallelism: which rows each rank owns at every UNet level, the halo
rows each conv needs from its neighbours, and the checks that a model fits a band layout.

Pure functions of shapes and module settings (no process group): the runtime, the Multi-GPU
node's planning and bench/parallel.py's byte counts share them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..attention import LinFusionAttention
from ..forwards import has_own_forward


class BandParallelError(RuntimeError):
    """A band-parallel forward failed: bad input, a layout it cannot split, or a peer that died."""


@dataclass(frozen=True)
class Bands:
    """Row partition of one feature-map height: rank r owns rows [edges[r], edges[r + 1])."""

    edges: tuple[int, ...]

    @property
    def height(self) -> int:
        return self.edges[-1]

    @property
    def world(self) -> int:
        return len(self.edges) - 1

    def rows(self, rank: int) -> int:
        return self.edges[rank + 1] - self.edges[rank]


def split_rows(height: int, world: int, row_multiple: int = 8) -> Bands:
    """Cut `height` rows into `world` bands at multiples of `row_multiple`, as even as possible.

    Cutting at multiples of the UNet's total downsampling (8 for SD1.x/2.x, 4 would do for
    SDXL) keeps band edges even at every level, so the nearest 2x upsample of a band is the
    band of the upsampled map. Uneven bands differ by `row_multiple` rows.
    """
    if world < 1:
        raise BandParallelError(f"band-parallel: world size must be >= 1, got {world}")
    if height % row_multiple:
        raise BandParallelError(
            f"band-parallel: latent height {height} is not a multiple of {row_multiple} (the UNet's total "
            f"downsampling): use an image height that is a multiple of {8 * row_multiple} pixels")
    units = height // row_multiple
    if units < world:
        raise BandParallelError(
            f"band-parallel: latent height {height} gives {units} bands of {row_multiple} rows, fewer than the "
            f"{world} ranks: use a taller image or fewer devices")
    base, extra = divmod(units, world)
    edges = [0]
    for r in range(world):
        edges.append(edges[-1] + (base + (1 if r < extra else 0)) * row_multiple)
    return Bands(tuple(edges))


def level_bands(bands: Bands, height: int) -> Bands:
    """The bands of a feature map `height` rows tall inside a forward whose latent has `bands`.

    The UNet halves the rows at each level (stride-2 convs) and `conv_plan` halves the band edges
    with them (edges are multiples of `row_multiple`), so a level 2^k times smaller than the
    latent has the edges divided by 2^k: the rows each rank's activations hold at that level.
    """
    full = bands.height
    ratio = full // height if height and full % height == 0 else 0
    if ratio == 0 or ratio & (ratio - 1) or any(e % ratio for e in bands.edges):
        raise BandParallelError(
            f"band-parallel: a residual of {height} rows matches no UNet level of a {full}-row latent cut into bands "
            f"{bands.edges} (levels are the latent halved while the band edges stay whole): a ControlNet or adapter "
            "made for another latent size; match its input image to the latent, or run on one device")
    return Bands(tuple(e // ratio for e in bands.edges))


def split_control(control: dict | None, bands: Bands, rank: int) -> dict | None:
    """Rank `rank`'s rows of a UNet's `control` argument (ControlNet, T2I-Adapter, ControlLoRA).

    `control` is {"input": [...], "middle": [...], "output": [...]}, each entry a residual
    (B, C, h, W) at the resolution of the UNet level it is added to, or None; the UNet adds it
    to its activations there, so each rank takes the rows of its band at that level
    (`level_bands`). Returns new lists (the UNet pops from them) of views, or None.
    """
    if control is None:
        return None
    out = {}
    for key, items in control.items():
        if not isinstance(items, (list, tuple)):
            raise BandParallelError(f"band-parallel: control[{key!r}] is a {type(items).__name__}, not a list of "
                                    "residuals; this ControlNet kind is not supported band-parallel: run on one device")
        band = []
        for t in items:
            if t is not None:
                if not isinstance(t, torch.Tensor) or t.ndim != 4:
                    raise BandParallelError(f"band-parallel: control[{key!r}] holds a {type(t).__name__} of shape "
                                            f"{getattr(t, 'shape', None)}, not a (B, C, H, W) residual: run on one "
                                            "device")
                b = level_bands(bands, t.shape[-2])
                t = t[..., b.edges[rank]:b.edges[rank + 1], :]
            band.append(t)
        out[key] = band
    return out


@dataclass(frozen=True)
class Halo:
    """What one rank's conv needs beyond its band: zero rows at the image edge, rows from the
    rank above/below, and rows of its own band the conv never reads (strided convs)."""

    top_zeros: int
    top_rows: int
    skip_top: int
    skip_bottom: int
    bottom_rows: int
    bottom_zeros: int


@dataclass(frozen=True)
class ConvPlan:
    out: Bands
    halos: tuple[Halo, ...]


def conv_plan(bands: Bands, kernel: int, stride: int, padding: int, dilation: int = 1) -> ConvPlan:
    """Output bands and per-rank halos of a conv along the row axis.

    Output row o reads input rows [o*s - p, o*s - p + d*(k-1)]; it belongs to the rank owning
    the centre row of that window, so a 'same' conv keeps the bands and a stride-2 conv halves
    them. Raises if a band would be empty or a halo would reach past the neighbouring band.
    """
    reach = dilation * (kernel - 1)
    h_out = (bands.height + 2 * padding - reach - 1) // stride + 1
    starts = [0]
    for a in bands.edges[1:-1]:
        starts.append(min(h_out, max(0, -(-(a + padding - reach // 2) // stride))))
    starts.append(h_out)
    out = Bands(tuple(starts))
    halos = []
    for r in range(bands.world):
        a, b = bands.edges[r], bands.edges[r + 1]
        o0, o1 = out.edges[r], out.edges[r + 1]
        if o1 <= o0:
            raise BandParallelError(
                f"band-parallel: a conv (kernel {kernel}, stride {stride}) leaves rank {r} no output rows at height "
                f"{bands.height}: use a taller image or fewer devices")
        lo = o0 * stride - padding
        hi = (o1 - 1) * stride - padding + reach
        top_rows, bottom_rows = max(0, a - max(lo, 0)), max(0, min(hi, bands.height - 1) - (b - 1))
        if (r > 0 and top_rows > bands.rows(r - 1)) or (r + 1 < bands.world and bottom_rows > bands.rows(r + 1)):
            raise BandParallelError(
                f"band-parallel: a conv (kernel {kernel}, dilation {dilation}) needs more rows than a "
                f"neighbouring band holds at height {bands.height} (bands {bands.edges}): "
                "use a taller image or fewer devices")
        halos.append(Halo(max(0, -lo), top_rows, max(0, lo - a), max(0, (b - 1) - hi), bottom_rows,
                          max(0, hi - (bands.height - 1))))
    return ConvPlan(out, tuple(halos))


def conv_geometry(m: nn.Conv2d) -> tuple[int, int, int, int, int]:
    """(kernel, stride, padding, dilation) along rows and the padding along columns of a Conv2d."""
    if m.padding_mode != "zeros":
        raise BandParallelError(f"band-parallel: conv padding mode {m.padding_mode!r} is not supported (only zeros)")
    pad = m.padding
    if pad == "valid":
        pad = (0, 0)
    elif isinstance(pad, str):
        pad = tuple(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
    return m.kernel_size[0], m.stride[0], pad[0], m.dilation[0], pad[1]


def check_conv_fit(model: nn.Module, bands: Bands, levels: int) -> None:
    """Raise BandParallelError if a Conv2d of `model`, with its current dilation and padding,
    would need more halo rows than a neighbouring band holds at one of a UNet's `levels` + 1
    resolutions (level l: the bands' edges / 2^l; stride-2 convs only at the first `levels`).

    The runtime raises the same error at the conv itself, mid-forward; checking first lets a
    host run the call on one device instead (DemoFusion's dilated branch on small latents)."""
    seen = set()
    for m in model.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        k, s, p, d, _ = conv_geometry(m)
        if (k == 1 and s == 1 and p == 0) or (k, s, p, d) in seen:
            continue
        seen.add((k, s, p, d))
        for level in range(levels + (1 if s == 1 else 0)):
            conv_plan(Bands(tuple(e >> level for e in bands.edges)), k, s, p, d)


def conv_settings(model: nn.Module) -> list[tuple]:
    """(dilation, padding) of every Conv2d of `model` in module order: what a host changes at run
    time (DemoFusion's dilated branch) and a worker's copy of the model must mirror."""
    return [(m.dilation, m.padding) for m in model.modules() if isinstance(m, nn.Conv2d)]


@contextlib.contextmanager
def conv_settings_applied(model: nn.Module, settings: list[tuple] | None) -> Iterator[None]:
    """Give the Conv2d layers of `model` the (dilation, padding) of `settings` (conv_settings of an
    identical model) for the duration of the block; the previous values come back on exit."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if settings is None:
        yield
        return
    if len(settings) != len(convs):
        raise BandParallelError(f"band-parallel: {len(settings)} conv settings for a model with {len(convs)} "
                                "Conv2d layers: the worker's copy of the model differs from rank 0's")
    saved = [(c.dilation, c.padding) for c in convs]
    try:
        for c, (dil, pad) in zip(convs, settings):
            c.dilation, c.padding = tuple(dil), pad if isinstance(pad, str) else tuple(pad)
        yield
    finally:
        for c, (dil, pad) in zip(convs, saved):
            c.dilation, c.padding = dil, pad


def replaced_forwards(model: nn.Module) -> list[str]:
    """Modules of `model` with an instance-level `forward` (a host's monkey patch) that read rows
    across a band edge (a Conv2d or GroupNorm inside): band parallelism patches those layers
    itself, and a replaced forward around them (e.g. banded resnets computing their own GroupNorm
    statistics) would run on one rank only. Token-wise replacements (feed-forward chunking) and
    LinFusion layers (band_parallel replaces their forward whole) are not listed."""
    out = []
    for name, m in model.named_modules():
        if not has_own_forward(m) or isinstance(m, LinFusionAttention):
            continue
        if any(isinstance(c, (nn.Conv2d, nn.GroupNorm)) for c in m.modules()):
            out.append(name or type(m).__name__)
    return out
