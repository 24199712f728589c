"""Exact band (patch) parallelism of one UNet forward over a torch.distributed process group.

The latent (B, C, H, W) is cut into horizontal bands of rows, one per rank; every rank runs
the whole UNet on its band, and the result equals the single-process forward (up to float
rounding), unlike DistriFusion's displaced (stale-activation) patch parallelism:

- LinFusion self-attention needs from the other bands only their key/value summary
  (`kv_summary`: [mean phi(k) v^T | mean phi(k)], B x H x dh x (dh+1) numbers): each rank
  all-reduces its summary times its token count together with the count, divides by the
  global count, and applies it to its own queries. ComfyUI's and diffusers' transformer
  blocks flatten (B, C, h, W) to (B, h*W, C), so a band's tokens are exactly its rows.
- Every Conv2d with a kernel taller than one row reads halo rows of its neighbours, sent
  with non-blocking point-to-point ops while the rows that need no halo are computed.
  Strided convs (the UNet's Downsample: k3, stride 2, padding 1) give each output row to
  the rank owning the centre of its receptive field; nearest 2x upsampling (the UNet's
  Upsample: interpolate, then a 3x3 conv) is exact per band as long as band edges are even
  at every level, which `split_rows` guarantees by cutting at multiples of `row_multiple`.
- GroupNorm normalises with global statistics: an all-reduce of per-group sums and sums of
  squares (fp64, built from each band's own fp32 mean and variance, so no cancellation).
- Everything per token or per pixel (linear layers, LayerNorm, cross-attention to the text,
  feed-forward, 1x1 convs, activations) runs on the band alone.
- ControlNet / T2I-Adapter residuals are added per pixel at each level: `split_control` gives
  each rank the rows of its band of every residual (`level_bands`: the latent's band edges
  halved once per level, as the activations' bands are).
- Any other self-attention (a model's own softmax `attn1`, or a LinFusion layer in hybrid
  mode taking its softmax branch) gathers every band's tokens, runs on all of them and keeps
  its own rows (exact, with the memory cost of the full sequence), or refuses if asked to.

Modules are found by type (nn.Conv2d, nn.GroupNorm, LinFusionAttention, modules with
`to_q`/`to_k`/`to_v`), so the same code serves ComfyUI's UNet and a diffusers UNet. Patches
are instance-level `forward` attributes, removed on exit of `band_parallel` (also on error).
Every collective has a timeout; a failure names this rank, the operation and the module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as queue_mod
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .attention import LinFusionAttention
from .forwards import calling, forwards_replaced, has_own_forward

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
OTHER_ATTENTION = ("gather", "error")


class BandParallelError(RuntimeError):
    """A band-parallel forward failed: bad input, a layout it cannot split, or a peer that died."""


# --------------------------------------------------------------------------------------------
# Row geometry (pure functions: the runtime and bench/parallel.py's byte counts share them)


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


# --------------------------------------------------------------------------------------------
# The runtime


def _is_self_attention_like(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("to_q", "to_k", "to_v")) and not isinstance(m, LinFusionAttention)


class BandParallel:
    """One rank's side of band-parallel forwards in `group` (default: the default group).

    Use `band_parallel(model, ...)` to patch a module tree; then `forward(fn, x, ...)` splits a
    full latent, runs fn on this rank's band and gathers the full output on every rank.
    overlap: compute a conv's halo-free rows while its halos travel (three conv calls);
    None: on GPUs only. Otherwise the band is copied into the conv's input while they travel.
    `bytes_sent` counts this rank's payload bytes per kind ("summary", "halo", "groupnorm",
    "gather", "output") for the benchmark.
    """

    def __init__(self, group: Any = None, *, row_multiple: int = 8, timeout_s: float = DEFAULT_TIMEOUT_S,
                 other_attention: str = "gather", overlap: bool | None = None) -> None:
        if not dist.is_initialized():
            raise BandParallelError("band-parallel: torch.distributed is not initialised: call "
                                    "torch.distributed.init_process_group (or use launch()) first")
        if other_attention not in OTHER_ATTENTION:
            raise BandParallelError(f"band-parallel: other_attention={other_attention!r}; use one of {OTHER_ATTENTION}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.row_multiple = row_multiple
        self.timeout = timedelta(seconds=timeout_s)
        self.other_attention = other_attention
        self.overlap = overlap
        self.bytes_sent: Counter[str] = Counter()
        self.names: dict[int, str] = {}
        self._levels: dict[int, Bands] = {}
        self._level0: Bands | None = None
        self._plans: dict[tuple, ConvPlan] = {}

    def _name(self, m: nn.Module) -> str:
        return self.names.get(id(m), type(m).__name__)

    # ---- collectives, each wrapped so a failure names rank, operation and module
    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _fail(self, what: str, m: nn.Module | None, e: BaseException) -> BandParallelError:
        where = f" in {self._name(m)!r}" if m is not None else ""
        return BandParallelError(f"band-parallel rank {self.rank}/{self.world}: {what}{where} failed "
                                 f"(a peer rank died, raised, or timed out after "
                                 f"{self.timeout.total_seconds():.0f} s): {e}")

    def all_reduce(self, t: torch.Tensor, kind: str, m: nn.Module | None = None) -> torch.Tensor:
        self.bytes_sent[kind] += t.numel() * t.element_size()
        try:
            dist.all_reduce(t, group=self.group, async_op=True).wait(self.timeout)
        except Exception as e:
            raise self._fail(f"all-reduce of {kind}", m, e) from e
        return t

    def all_gather_rows(self, t: torch.Tensor, dim: int, kind: str, m: nn.Module | None = None) -> list[torch.Tensor]:
        """Every rank's `t`, which may differ in size along `dim` only (padded for the collective)."""
        sizes = torch.tensor([t.shape[dim]], dtype=torch.int64, device=t.device)
        sizes = self._gather(sizes, "sizes", m)
        n = [int(s) for s in sizes]
        padded = t
        if t.shape[dim] < max(n):
            pad_shape = list(t.shape)
            pad_shape[dim] = max(n) - t.shape[dim]
            padded = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
        self.bytes_sent[kind] += padded.numel() * padded.element_size()
        parts = self._gather(padded.contiguous(), kind, m)
        return [p.narrow(dim, 0, k) for p, k in zip(parts, n)]

    def _gather(self, t: torch.Tensor, kind: str, m: nn.Module | None) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        try:
            dist.all_gather(out, t, group=self.group, async_op=True).wait(self.timeout)
        except Exception as e:
            raise self._fail(f"all-gather of {kind}", m, e) from e
        return out

    # ---- geometry of the current forward
    def bands(self, height: int) -> Bands:
        return split_rows(height, self.world, self.row_multiple)

    def start(self, height: int) -> Bands:
        """Set the latent height of the next forward; returns its level-0 bands."""
        b = self.bands(height)
        self._levels = {b.rows(self.rank): b}
        self._level0 = b
        return b

    def _level(self, rows: int, m: nn.Module) -> Bands:
        b = self._levels.get(rows)
        if b is None:
            raise BandParallelError(
                f"band-parallel rank {self.rank}: {self._name(m)!r} got a band of {rows} rows, "
                f"which matches no level of this forward ({sorted(self._levels)}): call forward()/start() with the "
                f"full latent height, and keep it a multiple of {self.row_multiple}")
        return b

    def _register(self, b: Bands, m: nn.Module) -> None:
        old = self._levels.setdefault(b.rows(self.rank), b)
        if old != b:
            raise BandParallelError(f"band-parallel rank {self.rank}: two levels have bands of {b.rows(self.rank)} "
                                    f"rows ({old.edges}, {b.edges}) at {self._name(m)!r}: the layout is ambiguous")

    # ---- whole forward
    def split(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's band of a full (..., H, W) tensor (rows along dim -2), from the current bands."""
        b = self._level0
        if b is None or b.height != x.shape[-2]:
            b = self.start(x.shape[-2])
        return x[..., b.edges[self.rank]:b.edges[self.rank + 1], :]

    def forward(self, fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """fn(band of x, *args, **kwargs) on every rank; returns the full (B, C, H, W) output on every rank.

        x: the full latent (B, C, H, W), identical on all ranks; other arguments (timesteps,
        text context) are passed unchanged.
        """
        self.start(x.shape[-2])
        y = fn(self.split(x).contiguous(), *args, **kwargs)
        return torch.cat(self.all_gather_rows(y, -2, "output"), dim=-2)

    # ---- patched forwards
    def conv(self, m: nn.Conv2d, orig: Callable, x: torch.Tensor) -> torch.Tensor:
        k, s, p, d, pw = conv_geometry(m)
        if x.ndim != 4 or (k == 1 and s == 1 and p == 0):
            return orig(x)  # 1x1 convs are per pixel
        bands = self._level(x.shape[-2], m)
        key = (bands, k, s, p, d)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = conv_plan(bands, k, s, p, d)
        self._register(plan.out, m)
        me = plan.halos[self.rank]
        works, top, bot = self._exchange(x, plan, m)
        h = x.shape[-2]
        xl = x[:, :, me.skip_top:h - me.skip_bottom]
        t = me.top_zeros + me.top_rows  # rows of the assembled input above the band
        n_out, reach = plan.out.rows(self.rank), d * (k - 1)
        length = (n_out - 1) * s + reach + 1  # rows of the assembled input the conv reads
        j0 = min(n_out, -(-t // s))  # first output row that reads no row above the band
        jb = min(n_out, max(0, -(-(t + xl.shape[-2] - reach) // s)))  # first one reading below it

        def run(rows: torch.Tensor) -> torch.Tensor:
            saved = m.padding
            m.padding = (0, pw)
            try:
                return orig(rows)
            finally:
                m.padding = saved

        def zeros(n: int) -> list[torch.Tensor]:
            return [x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3])] if n else []

        parts = []
        if self._split_convs(x) and j0 < jb:
            # The rows needing no halo run while the halos travel (three conv calls: worth it
            # where a call is cheap to launch, i.e. on GPUs).
            mid = run(xl[:, :, j0 * s - t:(jb - 1) * s + reach + 1 - t])
            self._wait(works, m)
            if j0 > 0:
                parts.append(run(torch.cat(zeros(me.top_zeros) + ([top] if top is not None else [])
                                           + [xl[:, :, :max(0, (j0 - 1) * s + reach + 1 - t)]], dim=2)))
            parts.append(mid)
            if jb < n_out:
                tail = torch.cat([xl[:, :, jb * s - t:]] + ([bot] if bot is not None else []) + zeros(me.bottom_zeros),
                                 dim=2)
                parts.append(run(tail[:, :, :length - jb * s]))
        else:
            # One conv call over the assembled rows; the band is copied in while the halos
            # travel. On CPU this is the faster form: each oneDNN conv call re-lays out its
            # weights, so three calls per conv cost a third more CPU time (measured, SD1.5
            # layout, 64 channels, 1024 px: bench/RESULTS.md).
            b, c, _, w = x.shape
            n_in = min(length, me.top_zeros + (0 if top is None else top.shape[2]) + xl.shape[2]
                       + (0 if bot is None else bot.shape[2]) + me.bottom_zeros)
            full = x.new_empty(b, c, n_in, w)
            end = min(n_in, t + xl.shape[2])
            full[:, :, t:end].copy_(xl[:, :, :end - t])
            full[:, :, :me.top_zeros].zero_()
            full[:, :, end + (0 if bot is None else bot.shape[2]):].zero_()
            self._wait(works, m)
            if top is not None:
                full[:, :, me.top_zeros:t].copy_(top)
            if bot is not None and end < n_in:
                full[:, :, end:end + bot.shape[2]].copy_(bot[:, :, :n_in - end])
            parts.append(run(full))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        if out.shape[-2] != n_out:
            raise BandParallelError(f"band-parallel rank {self.rank}: {self._name(m)!r} made {out.shape[-2]} "
                                    f"rows, expected {n_out} (an internal geometry error)")
        return out

    def _split_convs(self, x: torch.Tensor) -> bool:
        return x.device.type != "cpu" if self.overlap is None else self.overlap

    def _exchange(self, x: torch.Tensor, plan: ConvPlan, m: nn.Module):
        """Post the halo receives and sends of one conv; returns (works, top, bottom)."""
        r, me = self.rank, plan.halos[self.rank]
        ops, top, bot = [], None, None
        shape = (x.shape[0], x.shape[1])
        if me.top_rows:
            top = x.new_empty(*shape, me.top_rows, x.shape[3])
            ops.append(dist.P2POp(dist.irecv, top, self._global(r - 1), self.group))
        if me.bottom_rows:
            bot = x.new_empty(*shape, me.bottom_rows, x.shape[3])
            ops.append(dist.P2POp(dist.irecv, bot, self._global(r + 1), self.group))
        h = x.shape[-2]
        if r + 1 < self.world and plan.halos[r + 1].top_rows:
            send = x[:, :, h - plan.halos[r + 1].top_rows:].contiguous()
            self.bytes_sent["halo"] += send.numel() * send.element_size()
            ops.append(dist.P2POp(dist.isend, send, self._global(r + 1), self.group))
        if r > 0 and plan.halos[r - 1].bottom_rows:
            send = x[:, :, :plan.halos[r - 1].bottom_rows].contiguous()
            self.bytes_sent["halo"] += send.numel() * send.element_size()
            ops.append(dist.P2POp(dist.isend, send, self._global(r - 1), self.group))
        try:
            works = dist.batch_isend_irecv(ops) if ops else []
        except Exception as e:
            raise self._fail("posting halo send/receive", m, e) from e
        return works, top, bot

    def _wait(self, works: list, m: nn.Module) -> None:
        try:
            for w in works:
                w.wait(self.timeout)
        except Exception as e:
            peers = [q for q in (self.rank - 1, self.rank + 1) if 0 <= q < self.world]
            raise self._fail(f"halo exchange with ranks {peers}", m, e) from e

    def group_norm(self, m: nn.GroupNorm, orig: Callable, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            return orig(x)
        b, c = x.shape[:2]
        g = m.num_groups
        xg = x.reshape(b, g, -1)
        var, mean = torch.var_mean(xg.float(), dim=-1, unbiased=False)
        n = xg.shape[-1]
        # fp64 sums built from the band's own mean and variance: no cancellation across bands.
        mean64, var64 = mean.double(), var.double()
        stats = torch.cat([(mean64 * n).flatten(), ((var64 + mean64 * mean64) * n).flatten(),
                           torch.tensor([float(n)], dtype=torch.float64, device=x.device)])
        self.all_reduce(stats, "groupnorm", m)
        total = stats[-1]
        g_mean = stats[:b * g] / total
        g_var = (stats[b * g:2 * b * g] / total - g_mean * g_mean).clamp_(min=0)
        # y = x * scale + shift per (sample, channel): one pass over x after the statistics,
        # as in the fused native kernel (the unfused form took 4 passes: 20% of a band step).
        inv = torch.rsqrt(g_var + m.eps).view(b, g, 1)
        scale = inv.expand(b, g, c // g).reshape(b, c)
        shift = -g_mean.view(b, g, 1).expand(b, g, c // g).reshape(b, c) * scale
        if m.affine:
            w64, b64 = m.weight.detach().double().to(x.device), m.bias.detach().double().to(x.device)
            scale, shift = scale * w64, shift * w64 + b64
        view = (b, c) + (1,) * (x.ndim - 2)
        if x.dtype in (torch.float32, torch.float64):
            return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))
        # half inputs: normalise in fp32 like the native kernel, then round once
        return torch.addcmul(shift.float().view(view), x.float(), scale.float().view(view)).to(x.dtype)

    def linfusion(self, m: LinFusionAttention, orig: Callable, x: torch.Tensor, context=None, value=None, mask=None,
                  transformer_options=None, **extra: Any) -> torch.Tensor:
        if context is not None or value is not None or mask is not None:
            raise BandParallelError(
                f"band-parallel: {self._name(m)!r} got a context/value/mask (a reference-style or masking "
                "patch on self-attention); band-parallel LinFusion supports plain self-attention only: remove that "
                "patch or run on one device")
        if m.softmax_attn is not None:  # hybrid: decide on the global token count, as one device would
            total = self.all_reduce(torch.tensor([x.shape[1]], dtype=torch.int64, device=x.device), "summary", m)
            if m.uses_softmax(int(total)):
                kwargs = {} if transformer_options is None else {"transformer_options": transformer_options}
                return self.gathered(m, lambda full: m.softmax_attn(full, **kwargs), x)
        n = x.shape[1]
        summary = m.summary(x, x)
        # Sums and the token count in one all-reduce; the mean over all bands is then exact.
        packed = torch.cat([summary.flatten() * n, torch.tensor([float(n)], device=x.device)])
        self.all_reduce(packed, "summary", m)
        return m.attend(x, (packed[:-1] / packed[-1]).view(summary.shape))

    def gathered(self, m: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn on the tokens of all bands (B, N, C) concatenated in row order; returns this band's rows."""
        if self.other_attention == "error":
            raise BandParallelError(
                f"band-parallel: {self._name(m)!r} is a softmax self-attention, which needs every band's tokens; "
                "other_attention='error' refuses it. Apply LinFusion without a softmax range (softmax_max_tokens=0), "
                "or allow other_attention='gather'")
        parts = self.all_gather_rows(x, 1, "gather", m)
        start = sum(p.shape[1] for p in parts[:self.rank])
        return fn(torch.cat(parts, dim=1))[:, start:start + x.shape[1]]

    def other_attention_forward(self, m: nn.Module, orig: Callable, x: torch.Tensor, *args: Any,
                                **kwargs: Any) -> torch.Tensor:
        context = args[0] if args else kwargs.get("context", kwargs.get("encoder_hidden_states"))
        if context is not None or x.ndim != 3:
            return orig(x, *args, **kwargs)  # cross-attention to the text: per token
        return self.gathered(m, lambda full: orig(full, *args, **kwargs), x)


@contextlib.contextmanager
def band_parallel(model: nn.Module, group: Any = None, **options: Any) -> Iterator[BandParallel]:
    """Patch `model` for band-parallel forwards in `group`; every patch is undone on exit, also on error.

    options: row_multiple, timeout_s, other_attention ("gather" or "error"), overlap. Yields the
    BandParallel whose `forward(fn, x, ...)` runs one forward.
    """
    bp = BandParallel(group, **options)
    skip = {id(m.softmax_attn) for m in model.modules() if isinstance(m, LinFusionAttention) and m.softmax_attn}
    wrappers = {}
    for name, m in model.named_modules():
        bp.names[id(m)] = name
        if isinstance(m, LinFusionAttention):
            wrappers[m] = bp.linfusion
        elif isinstance(m, nn.Conv2d):
            conv_geometry(m)  # refuse unsupported padding before any forward
            wrappers[m] = bp.conv
        elif isinstance(m, nn.GroupNorm):
            wrappers[m] = bp.group_norm
        elif _is_self_attention_like(m) and id(m) not in skip:
            wrappers[m] = bp.other_attention_forward
    with forwards_replaced(wrappers, lambda m: calling(wrappers[m], m)):
        yield bp


# --------------------------------------------------------------------------------------------
# Process launching: a group of worker processes with a clear error when one dies


class WorkerError(RuntimeError):
    """A band-parallel worker process died or raised; the message names its rank."""


def _worker_main(rank: int, world: int, init_method: str, backend: str, timeout_s: float, threads: int | None,
                 fn: Callable, args: tuple, results: Any) -> None:
    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def launch(fn: Callable, world: int, args: tuple = (), *, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S,
           threads: int | None = None, join_timeout_s: float = 600.0) -> list[Any]:
    """Run fn(rank, world, *args) in `world` spawned processes sharing one process group.

    fn must be importable (module level) and return picklable values (plain Python or numpy:
    tensors would travel through shared memory that dies with the worker). Returns the values
    by rank. If a worker dies or raises, the others are stopped and WorkerError names the
    rank(s); no process is left behind, whatever happens.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    fd, path = tempfile.mkstemp(prefix="linfusion-band-")
    os.close(fd)
    os.unlink(path)  # the file store creates it
    procs = [ctx.Process(target=_worker_main, daemon=True,
                         args=(r, world, f"file://{path}", backend, timeout_s, threads, fn, args, results))
             for r in range(world)]
    got: dict[int, tuple[str, Any]] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + join_timeout_s
        dead: dict[int, int] = {}
        while len(got) < world:
            try:
                r, status, value = results.get(timeout=0.2)
                got[r] = (status, value)
                continue
            except queue_mod.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in got and r not in dead and p.exitcode is not None:
                    dead[r] = p.exitcode
            if dead:
                # Give the survivors a moment to report the failed collective, then stop them.
                grace = time.monotonic() + min(10.0, timeout_s)
                while len(got) + len(dead) < world and time.monotonic() < grace:
                    with contextlib.suppress(queue_mod.Empty):
                        r, status, value = results.get(timeout=0.2)
                        got[r] = (status, value)
                break
            if time.monotonic() > deadline:
                raise WorkerError(f"band-parallel workers did not finish within {join_timeout_s:.0f} s "
                                  f"(ranks {sorted(set(range(world)) - set(got))} still running)")
        errors = {r: v for r, (s, v) in got.items() if s != "ok"}
        if dead or errors:
            msg = [f"rank {r} died (exit code {c})" for r, c in sorted(dead.items())]
            msg += [f"rank {r} raised:\n{v}" for r, v in sorted(errors.items())]
            raise WorkerError("band-parallel worker failure: " + "; ".join(msg))
        return [got[r][1] for r in range(world)]
    finally:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


__all__ = ["BandParallel", "BandParallelError", "Bands", "ConvPlan", "Halo", "WorkerError", "band_parallel",
           "check_conv_fit", "conv_plan", "conv_settings", "conv_settings_applied", "launch", "level_bands",
           "replaced_forwards", "serve", "split_control", "split_rows"]


# --------------------------------------------------------------------------------------------
# A persistent worker: one extra device of a host application (the ComfyUI node)


def _to(t: Any, device: torch.device) -> Any:
    """Tensors moved to `device`, also inside dicts and lists (a ControlNet's residuals)."""
    if isinstance(t, dict):
        return {k: _to(v, device) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        return type(t)(_to(v, device) for v in t)
    return t.to(device) if isinstance(t, torch.Tensor) else t


def serve(rank: int, world: int, init_method: str, backend: str, timeout_s: float, device: str,
          builder_file: str, requests: Any, replies: Any) -> None:
    """Worker loop of a persistent band-parallel group (run in a spawned process).

    Replies ("ok", rank, "started"), joins the group, then serves messages from `requests`:
    ("load", payload) builds the model with build_unet(payload, device) from `builder_file` (a
    host-specific file loaded by path, so this module stays free of host imports);
    ("forward", x, args, kwargs, convs) runs this rank's band of one forward in step with rank 0,
    with rank 0's conv settings (conv_settings, or None); kwargs may hold `control`, already cut
    to this rank's rows (split_control); ("stop",) leaves. Replies
    ("ok"|"error", rank, text) go to `replies`. The worker also leaves when its parent process
    is gone. The process group is destroyed on the way out.
    """
    import importlib.util

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    replies.put(("ok", rank, "started"))  # the host waits for this before it joins the group
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    unet = None
    try:
        spec = importlib.util.spec_from_file_location("linfusion_band_builder", builder_file)
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        parent = os.getppid()
        while True:
            try:
                msg = requests.get(timeout=1.0)
            except queue_mod.Empty:
                if os.getppid() != parent:
                    return  # the host died without stopping us (SIGKILL, or SIGTERM without cleanup)
                continue
            try:
                if msg[0] == "stop":
                    replies.put(("ok", rank, "stopped"))
                    return
                if msg[0] == "load":
                    unet = builder.build_unet(msg[1], dev)
                    replies.put(("ok", rank, "loaded"))
                elif msg[0] == "forward":
                    _, x, args, kwargs, convs = msg
                    with conv_settings_applied(unet, convs), band_parallel(unet, timeout_s=timeout_s) as bp, \
                            torch.no_grad():
                        bp.forward(unet, _to(x, dev), *[_to(a, dev) for a in args],
                                   **{k: _to(v, dev) for k, v in kwargs.items()})
                    replies.put(("ok", rank, "forward"))
            except Exception:
                replies.put(("error", rank, traceback.format_exc()))
                if isinstance(sys.exc_info()[1], BandParallelError) or msg[0] == "load":
                    return  # the group is out of step: rank 0 tears it down
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
