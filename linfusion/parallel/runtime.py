"""The band-parallel runtime: one rank's patched forwards (conv halos, GroupNorm statistics,
LinFusion summaries, gathered softmax attention) and the collectives under them, each with
a timeout and an error naming rank, operation and module.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import einops
import torch
import torch.distributed as dist
from torch import nn

from ..attention import LinFusionAttention
from ..forwards import calling, forwards_replaced
from .geometry import BandParallelError, Bands, ConvPlan, Halo, conv_geometry, conv_plan, split_rows

DEFAULT_TIMEOUT_S = 120.0
OTHER_ATTENTION = ("gather", "error")


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
        plan = self._conv_plan(self._level(x.shape[-2], m), k, s, p, d)
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
            parts.append(run(self._assembled_rows(xl, me, t, length, top, bot, works, m)))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        if out.shape[-2] != n_out:
            raise BandParallelError(f"band-parallel rank {self.rank}: {self._name(m)!r} made {out.shape[-2]} "
                                    f"rows, expected {n_out} (an internal geometry error)")
        return out

    def _conv_plan(self, bands: Bands, k: int, s: int, p: int, d: int) -> ConvPlan:
        """The halo plan of a conv geometry at one level, made once and kept."""
        key = (bands, k, s, p, d)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = conv_plan(bands, k, s, p, d)
        return plan

    def _assembled_rows(self, xl: torch.Tensor, me: Halo, t: int, length: int, top: torch.Tensor | None,
                        bot: torch.Tensor | None, works: list, m: nn.Module) -> torch.Tensor:
        """The conv's input rows in one tensor: band and zero rows written while the halos travel, then the halos."""
        b, c, _, w = xl.shape
        n_in = min(length, me.top_zeros + (0 if top is None else top.shape[2]) + xl.shape[2]
                   + (0 if bot is None else bot.shape[2]) + me.bottom_zeros)
        full = xl.new_empty(b, c, n_in, w)
        end = min(n_in, t + xl.shape[2])
        full[:, :, t:end].copy_(xl[:, :, :end - t])
        full[:, :, :me.top_zeros].zero_()
        full[:, :, end + (0 if bot is None else bot.shape[2]):].zero_()
        self._wait(works, m)
        if top is not None:
            full[:, :, me.top_zeros:t].copy_(top)
        if bot is not None and end < n_in:
            full[:, :, end:end + bot.shape[2]].copy_(bot[:, :, :n_in - end])
        return full

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
        count = torch.tensor(float(n), dtype=torch.float64, device=x.device)
        stats, layout = einops.pack([mean64 * n, (var64 + mean64 * mean64) * n, count], "*")
        self.all_reduce(stats, "groupnorm", m)
        sums, squares, total = einops.unpack(stats, layout, "*")
        g_mean = sums / total
        g_var = (squares / total - g_mean * g_mean).clamp_(min=0)
        # y = x * scale + shift per (sample, channel): one pass over x after the statistics,
        # as in the fused native kernel (the unfused form took 4 passes: 20% of a band step).
        scale = einops.repeat(torch.rsqrt(g_var + m.eps), "b g -> b (g k)", k=c // g)
        shift = -einops.repeat(g_mean, "b g -> b (g k)", k=c // g) * scale
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
        # Sums and the token count in one all-reduce; the mean over all bands is then exact.
        packed, layout = einops.pack([m.summary(x, x) * n, torch.tensor(float(n), device=x.device)], "*")
        self.all_reduce(packed, "summary", m)
        sums, total = einops.unpack(packed, layout, "*")
        return m.attend(x, sums / total)

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
