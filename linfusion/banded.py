"""The banded spatial pieces of low-memory mode (linfusion/lowmem.py owns the mode and its
settings), in pure PyTorch: an LDM UNet's GroupNorm -> SiLU -> conv layers over bands of rows.

* `chunked_resblock_forward` / `chunked_norm_act_conv`: GroupNorm -> SiLU -> 3x3 conv over
  bands of rows (the reference's in-place resnet activations, taken further). GroupNorm needs
  statistics over the whole feature map, so they are taken first (two fp32 passes: mean, then
  centred variance); each band is then normalised, activated and convolved with `pad` halo
  rows on each side, and its output rows are written into one preallocated result. Only one
  band's normalised activation exists at a time, instead of two full-size tensors (GroupNorm
  out, SiLU out). Not bit-exact: the normalisation is (x - mean) * rstd * gamma + beta in fp32
  where PyTorch's kernel folds it into x * a + b and accumulates its moments in another order;
  the difference is a few fp32 ulps (max abs ~1e-6 on the tests' layouts). The convolution of
  a band with halo rows reads exactly the same inputs as the full convolution (zero padding
  only at the image border).
* `split_input_resblock`: a ResBlock on the decoder's `torch.cat([h, skip])` that is never
  built (linfusion.lowmem.SkipConcat leaves it out): the block reads its two parts band by
  band (a parked skip straight from host memory) and can write its output into h's own storage.
* `banded_upsample_forward` / `banded_sequence_forward`: the Upsample layers feeding the
  banded levels and the UNet's output head (GroupNorm, SiLU, conv) in bands of rows.

`top_level_resblocks` / `top_level_upsamples` find the layers of the highest levels;
`chunked_resblocks`, `banded_upsamples` and `banded_sequences` set the forwards for the
duration of a block. Nothing here imports ComfyUI: the module structure read is the LDM UNet's
(ResBlock with in_layers / emb_layers / out_layers / skip_connection, Upsample), the glue is
nodes/lowmem.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import einops
import torch
import torch.nn.functional as F
from torch import nn

from .forwards import forwards_replaced

# Rows per band: about this many bytes of the band's input. Large enough that each band's
# convolution is a big kernel launch, small next to a 16K level-0 tensor (1.3 GB in fp16).
BAND_BYTES = 64 << 20
# Below this size (bytes of one feature map of the batch) a resblock runs as it is: chunking
# small maps only adds passes. (lowmem.SkipConcat and linfusion/memory.py's low-memory
# estimate read it too.)
MIN_CHUNK_BYTES = 32 << 20


def default_affine(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    w = None if norm.weight is None else norm.weight.to(x.device, torch.float32)
    b = None if norm.bias is None else norm.bias.to(x.device, torch.float32)
    return w, b


def group_stats(x: torch.Tensor, groups: int, eps: float, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and 1/sqrt(var + eps) of x (B, C, H, W) in fp32, each (B, G, 1, 1, 1),
    computed over bands of `rows` rows: the global statistics GroupNorm uses (biased variance)."""
    b, c, h, w = x.shape
    count = (c // groups) * h * w
    total = torch.zeros(b, groups, dtype=torch.float32, device=x.device)
    for r in range(0, h, rows):
        total += einops.rearrange(x[:, :, r:r + rows].float(), "b (g c) h w -> b g (c h w)", g=groups).sum(-1)
    mean = einops.rearrange(total / count, "b g -> b g 1 1 1")
    # centred second pass: one-pass E[x^2] - E[x]^2 loses digits when |mean| >> std
    sq = torch.zeros(b, groups, dtype=torch.float32, device=x.device)
    for r in range(0, h, rows):
        band = einops.rearrange(x[:, :, r:r + rows].to(torch.float32, copy=True), "b (g c) h w -> b g c h w", g=groups)
        sq += einops.rearrange(band.sub_(mean).square_(), "b g c h w -> b g (c h w)").sum(-1)
    rstd = einops.rearrange((sq / count + eps).rsqrt_(), "b g -> b g 1 1 1")
    return mean, rstd


def rows_per_band(row_bytes: int, band_bytes: int | None = None) -> int:
    """Rows per band so that a band of rows of `row_bytes` bytes each holds about `band_bytes`
    bytes (default BAND_BYTES), at least 8 rows."""
    return max(8, (band_bytes or BAND_BYTES) // max(1, row_bytes))


def band_rows(x: torch.Tensor, band_bytes: int | None = None) -> int:
    """rows_per_band for x (B, C, H, W)."""
    return rows_per_band(x.shape[0] * x.shape[1] * x.shape[3] * x.element_size(), band_bytes)


def _same_size_conv(conv: nn.Module) -> bool:
    """A stride-1 2-D conv whose zero padding keeps the size: bands with `padding` halo rows are exact."""
    if not isinstance(conv, nn.Conv2d) or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return False
    (kh, _), (dh, _), (ph, _) = conv.kernel_size, conv.dilation, conv.padding
    return tuple(conv.stride) == (1, 1) and ph == dh * (kh - 1) // 2 and (kh % 2 == 1)


def chunked_norm_act_conv(norm: nn.GroupNorm, conv: nn.Module, x: torch.Tensor, band_bytes: int | None = None,
                          affine: Callable = default_affine, out: torch.Tensor | None = None,
                          accumulate: bool = False) -> torch.Tensor:
    """conv(silu(norm(x))) for x (B, C, H, W), one band of rows at a time -> (B, C_out, H, W).

    `affine(norm, x)` returns GroupNorm's (gamma, beta) in fp32 on x's device (a host can cast
    offloaded or LoRA-patched weights there). With `out` given and `accumulate`, the result is
    added into it (out += conv(...)); otherwise written into `out` or a new tensor."""
    b, c, h, w = x.shape
    rows = band_rows(x, band_bytes)
    mean, rstd = group_stats(x, norm.num_groups, norm.eps, rows)
    gamma, beta = affine(norm, x)
    g = norm.num_groups
    pad = conv.padding[0]
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        lo, hi = max(0, r0 - pad), min(h, r1 + pad)
        band = x[:, :, lo:hi].to(torch.float32, copy=True).view(b, g, c // g, hi - lo, w)
        band = band.sub_(mean).mul_(rstd).view(b, c, hi - lo, w)
        if gamma is not None:
            band.mul_(gamma.view(1, c, 1, 1))
        if beta is not None:
            band.add_(beta.view(1, c, 1, 1))
        # copy=True above: .float() of an fp32 tensor is x itself, which the in-place ops would change
        band = F.silu(band.to(x.dtype), inplace=True)
        y = conv(band)[:, :, r0 - lo:r0 - lo + (r1 - r0)]
        del band
        if out is None:
            out = torch.empty((b, y.shape[1], h, w), dtype=y.dtype, device=y.device)
        if accumulate:
            out[:, :, r0:r1] += y
        else:
            out[:, :, r0:r1] = y
    return out


def is_resblock(m: nn.Module) -> bool:
    """An LDM UNet ResBlock (norm-act-conv in/out layers, timestep embedding, skip connection)."""
    return all(hasattr(m, a) for a in ("in_layers", "out_layers", "emb_layers", "skip_connection", "updown"))


def chunkable(block: nn.Module) -> bool:
    """Whether `chunked_resblock_forward` reproduces this block: no up/down-sampling inside, no
    scale-shift norm, 2-D same-size convs after a GroupNorm and SiLU."""
    if not is_resblock(block) or block.updown or getattr(block, "use_scale_shift_norm", False):
        return False
    il, ol = block.in_layers, block.out_layers
    return (len(il) == 3 and isinstance(il[0], nn.GroupNorm) and isinstance(il[1], nn.SiLU) and _same_size_conv(il[2])
            and len(ol) == 4 and isinstance(ol[0], nn.GroupNorm) and isinstance(ol[1], nn.SiLU)
            and isinstance(ol[2], nn.Dropout) and _same_size_conv(ol[3]))


def chunked_resblock_forward(block: nn.Module, band_bytes: int | None = None, min_bytes: int | None = None,
                             affine: Callable = default_affine, pending: Callable | None = None) -> Callable:
    """A forward(x, emb) for an LDM ResBlock that equals its own: in_layers and out_layers run
    band by band (chunked_norm_act_conv), the timestep embedding is added in place, and the
    skip connection is added into the output band by band. Peak inside the block: x, the
    in_layers result and the output, instead of up to five full-size tensors. Inputs smaller
    than `min_bytes` (default MIN_CHUNK_BYTES), and training, take the block's own forward.

    `pending(block)`, when given, may return the parts of a concatenation the UNet did not
    make (SkipConcat): then x has no channels and the block runs split_input_resblock on the
    parts (with their precomputed moments)."""
    own = block.forward
    skip = block.skip_connection

    def forward(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        deferred = pending(block) if pending is not None else None
        if deferred is not None:
            parts, moments, overwrite = deferred
            if x.ndim != 4 or x.shape[1] != 0:
                raise RuntimeError("LinFusion low memory: a deferred skip concatenation reached a block that got "
                                   f"a {tuple(x.shape)} input; another patch changed the output blocks' input")
            del deferred
            return split_input_resblock(block, parts, emb, moments, band_bytes, affine, overwrite)
        limit = MIN_CHUNK_BYTES if min_bytes is None else min_bytes
        if x.ndim != 4 or x.numel() * x.element_size() < limit or (torch.is_grad_enabled() and x.requires_grad):
            return own(x, emb)
        if block.training and block.out_layers[2].p > 0:
            return own(x, emb)
        h = chunked_norm_act_conv(block.in_layers[0], block.in_layers[2], x, band_bytes, affine)
        _add_emb(block, h, emb)
        out = chunked_norm_act_conv(block.out_layers[0], block.out_layers[3], h, band_bytes, affine)
        del h
        # the block returns skip(x) + h; fp addition commutes, so out += skip(x) is the same sum
        rows = band_rows(x, band_bytes)
        for r in range(0, x.shape[2], rows):
            out[:, :, r:r + rows] += skip(x[:, :, r:r + rows])
        return out

    return forward


def channel_moments(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and sum of squared deviations (M2) of x (B, C, H, W) in fp32, each
    (B, C), over bands of `rows` rows (two passes, centred as group_stats)."""
    b, c, h, _ = x.shape
    total = torch.zeros(b, c, dtype=torch.float32, device=x.device)
    for r in range(0, h, rows):
        total += x[:, :, r:r + rows].float().sum((2, 3))
    mean = total / (h * x.shape[3])
    m2 = torch.zeros(b, c, dtype=torch.float32, device=x.device)
    for r in range(0, h, rows):
        band = x[:, :, r:r + rows].to(torch.float32, copy=True)
        m2 += band.sub_(mean[..., None, None]).square_().sum((2, 3))
    return mean, m2


def group_affine(norm: nn.GroupNorm, mean: torch.Tensor, m2: torch.Tensor, count: int, gamma, beta):
    """GroupNorm as a per-channel affine map (a, b), each (B, C) fp32, from per-channel means and
    M2 over `count` elements each: groups combine their channels' moments exactly (the parallel
    variance formula), so the parts of a concatenation can be measured apart."""
    b, c = mean.shape
    g = norm.num_groups
    cm, c2 = (einops.rearrange(t, "b (g k) -> b g k", g=g) for t in (mean, m2))
    gm = cm.mean(-1, keepdim=True)
    var = (c2 + count * (cm - gm).square()).sum(-1, keepdim=True) / (count * (c // g))
    rstd = (var + norm.eps).rsqrt()
    a = einops.repeat(rstd, "b g 1 -> b (g k)", k=c // g)
    shift = einops.repeat(-gm * rstd, "b g 1 -> b (g k)", k=c // g)
    if gamma is not None:
        a, shift = a * gamma, shift * gamma
    if beta is not None:
        shift = shift + beta
    return a, shift


def _concat_affine(norm: nn.GroupNorm, parts: list[torch.Tensor], moments: list | None, rows: int,
                   affine: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of the parts' concatenation as a per-channel affine map (a, shift), each (B, C, 1, 1) fp32."""
    device, dtype = parts[0].device, parts[0].dtype
    moments = list(moments or [None] * len(parts))
    stats = [m if m is not None else channel_moments(p, rows) for p, m in zip(parts, moments)]
    mean = torch.cat([s[0].to(device) for s in stats], 1)
    m2 = torch.cat([s[1].to(device) for s in stats], 1)
    ref = torch.empty(0, dtype=dtype, device=device)
    gamma, beta = affine(norm, ref)
    h, w = parts[0].shape[2:]
    a, shift = (t[..., None, None] for t in group_affine(norm, mean, m2, h * w, gamma, beta))
    return a, shift


def _gather_rows(parts: list[torch.Tensor], lo: int, hi: int, carry: torch.Tensor | None, kept: int) -> torch.Tensor:
    """Rows lo:hi of the parts' concatenation on the first part's device; `carry`: its first `kept` rows there."""
    band = torch.cat([p[:, :, lo:hi].to(parts[0].device, non_blocking=True) for p in parts], 1)
    if carry is not None:  # rows above r0 of the first part were overwritten by the last band
        band[:, :carry.shape[1], :kept] = carry
    return band


def split_input_resblock(block: nn.Module, parts: list[torch.Tensor], emb: torch.Tensor,
                         moments: list | None = None, band_bytes: int | None = None,
                         affine: Callable = default_affine, overwrite_first: bool = False) -> torch.Tensor:
    """block(torch.cat(parts, 1), emb) without ever making the concatenation: the decoder side of
    a UNet concatenates the upsampled map with a skip connection, and at 16K that tensor, held
    next to both of its parts, is the largest moment of a step. Here each band of rows is
    gathered from the parts (which may live in host memory: only the band is copied to the
    device), normalised with GroupNorm's global statistics (per-channel moments of each part,
    taken from `moments[i]` when given, combined per group), activated and convolved for
    in_layers, and passed through the skip connection into the output, band by band. Peak: the
    device parts, the in_layers result and the output. The block must be `chunkable`; the
    parts must share batch, height and width. The caller should drop its references to the
    parts before calling, so that they can be freed when this returns.

    overwrite_first: the first part is the caller's to destroy (nothing else will read it):
    the output is then written into its first channels, row band after row band, instead of
    a new tensor (the rows a later band still reads as its halo are kept aside first), and
    the result is a view of that storage. Peak: the parts and the in_layers result."""
    device = parts[0].device  # the decoder's own map is on the compute device; skips may be parked
    dtype = parts[0].dtype
    b, _, h, w = parts[0].shape
    c = sum(p.shape[1] for p in parts)
    conv = block.in_layers[2]
    rows = rows_per_band(b * c * w * parts[0].element_size(), band_bytes)  # a row of the concatenation
    a, shift = _concat_affine(block.in_layers[0], parts, moments, rows, affine)
    pad = conv.padding[0]
    h_in = out = carry = None
    first = parts[0]
    in_first = False  # out is a view of the first part's storage
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        lo, hi = max(0, r0 - pad), min(h, r1 + pad)
        band = _gather_rows(parts, lo, hi, carry, r0 - lo)
        s = block.skip_connection(band[:, :, r0 - lo:r1 - lo])
        if out is None:
            if overwrite_first and first.shape[1] >= s.shape[1] and first.dtype == s.dtype:
                out, in_first = first[:, :s.shape[1]], True
            else:
                out = torch.empty((b, s.shape[1], h, w), dtype=s.dtype, device=device)
        if pad and in_first:  # (a flag, not a storage comparison: torch.compile traces this without a break)
            carry = band[:, :s.shape[1], r1 - pad - lo:r1 - lo].clone()
        out[:, :, r0:r1] = s
        del s
        band = band.float().mul_(a).add_(shift)  # band is a new tensor when parts are fp32 (the cat)
        band = F.silu(band.to(dtype), inplace=True)
        y = conv(band)[:, :, r0 - lo:r1 - lo]
        del band
        if h_in is None:
            h_in = torch.empty((b, y.shape[1], h, w), dtype=y.dtype, device=device)
        h_in[:, :, r0:r1] = y
    del parts[:], first, carry  # the caller's list: the parts can go now, before out_layers
    _add_emb(block, h_in, emb)
    return chunked_norm_act_conv(block.out_layers[0], block.out_layers[3], h_in, band_bytes, affine,
                                 out=out, accumulate=True)


def _add_emb(block: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> None:
    """The block's `h = h + emb_out`, in place (no second full-size tensor)."""
    if block.emb_layers is not None and not getattr(block, "skip_t_emb", False):
        e = block.emb_layers(emb).type(h.dtype)
        if getattr(block, "exchange_temb_dims", False):
            e = e.movedim(1, 2)
        while e.ndim < h.ndim:
            e = e[..., None]
        h += e


def is_upsample(m: nn.Module) -> bool:
    """An LDM UNet Upsample (nearest x2, then an optional conv)."""
    return type(m).__name__ == "Upsample" and hasattr(m, "use_conv") and hasattr(m, "dims")


def banded_upsample_forward(up: nn.Module, band_bytes: int | None = None, min_bytes: int | None = None) -> Callable:
    """A forward(x, output_shape=None) for an LDM Upsample with a same-size conv that equals its
    own: nearest x2 and the conv run over bands of output rows (with the conv's halo), written
    into one result, so the upsampled map before the conv never exists at full size. Nearest
    x2 maps output row i to input row i // 2 whatever the band, so the bands read exactly the
    full upsampling's values. Other cases (3-D, no conv, an output_shape other than 2x, small
    maps) take the layer's own forward."""
    own = up.forward

    def forward(x: torch.Tensor, output_shape=None):
        limit = MIN_CHUNK_BYTES if min_bytes is None else min_bytes
        h, w = x.shape[-2] * 2, x.shape[-1] * 2
        if (up.dims != 2 or not up.use_conv or x.ndim != 4 or not _same_size_conv(up.conv)
                or (output_shape is not None and tuple(output_shape[2:4]) != (h, w))
                or 4 * x.numel() * x.element_size() < limit):
            return own(x, output_shape=output_shape)
        pad = up.conv.padding[0]
        rows = rows_per_band(x.shape[0] * x.shape[1] * w * x.element_size(), band_bytes)  # a row of the output
        rows += rows % 2
        out = None
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            lo, hi = max(0, r0 - pad), min(h, r1 + pad)
            s0, s1 = lo // 2, (hi + 1) // 2
            band = F.interpolate(x[:, :, s0:s1], size=(2 * (s1 - s0), w), mode="nearest")
            y = up.conv(band[:, :, lo - 2 * s0:hi - 2 * s0])[:, :, r0 - lo:r1 - lo]
            del band
            if out is None:
                out = torch.empty((x.shape[0], y.shape[1], h, w), dtype=y.dtype, device=y.device)
            out[:, :, r0:r1] = y
        return out

    return forward


def is_norm_act_conv(seq: nn.Module) -> bool:
    """A Sequential GroupNorm -> SiLU -> same-size conv (an LDM UNet's `out` head)."""
    return (isinstance(seq, nn.Sequential) and len(seq) == 3 and isinstance(seq[0], nn.GroupNorm)
            and isinstance(seq[1], nn.SiLU) and _same_size_conv(seq[2]))


def banded_sequence_forward(seq: nn.Module, band_bytes: int | None = None, min_bytes: int | None = None,
                            affine: Callable = default_affine) -> Callable:
    """A forward(x) for a GroupNorm -> SiLU -> conv Sequential (is_norm_act_conv) that runs it
    with chunked_norm_act_conv; small inputs take its own forward."""
    own = seq.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        limit = MIN_CHUNK_BYTES if min_bytes is None else min_bytes
        if x.ndim != 4 or x.numel() * x.element_size() < limit or (torch.is_grad_enabled() and x.requires_grad):
            return own(x)
        return chunked_norm_act_conv(seq[0], seq[2], x, band_bytes, affine)

    return forward


def top_level_upsamples(unet: nn.Module, levels: int = 2) -> list[nn.Module]:
    """The Upsample layers of an LDM UNet's output blocks whose result lands in one of the
    `levels` highest resolutions (level counting as top_level_resblocks)."""
    level = sum(any(type(m).__name__ == "Downsample" for m in blk) for blk in getattr(unet, "input_blocks", []))
    found = []
    for block in getattr(unet, "output_blocks", []):
        for m in block:
            if is_upsample(m):
                level -= 1
                if level < levels:
                    found.append(m)
    return found


def top_level_resblocks(unet: nn.Module, levels: int = 2) -> list[nn.Module]:
    """The ResBlocks of an LDM UNet (input_blocks / middle_block / output_blocks) that run at
    its `levels` highest resolutions: level 0 is the latent's own size; each Downsample in
    the input blocks goes one level down, each Upsample in the output blocks one level up."""
    found = []
    level = 0
    for block in getattr(unet, "input_blocks", []):
        for m in block:
            if is_resblock(m) and level < levels:
                found.append(m)
        if any(type(m).__name__ == "Downsample" for m in block):
            level += 1
    for block in getattr(unet, "output_blocks", []):
        for m in block:
            if is_resblock(m) and level < levels:
                found.append(m)
        if any(type(m).__name__ == "Upsample" for m in block):
            level -= 1
    return found


@contextmanager
def chunked_resblocks(blocks: Iterable[nn.Module], band_bytes: int | None = None, min_bytes: int | None = None,
                      affine: Callable = default_affine, pending: Callable | None = None) -> Iterator[int]:
    """Give each chunkable block an instance-level chunked forward for the duration of the block
    (yields how many); removed on exit whatever happens, as linfusion.lowmem.chunked_token_forward."""
    with forwards_replaced([m for m in blocks if chunkable(m)],
                           lambda m: chunked_resblock_forward(m, band_bytes, min_bytes, affine, pending)) as n:
        yield n


@contextmanager
def banded_upsamples(layers: Iterable[nn.Module], band_bytes: int | None = None,
                     min_bytes: int | None = None) -> Iterator[int]:
    """banded_upsample_forward on each Upsample for the duration of the block (yields how many)."""
    with forwards_replaced([m for m in layers if is_upsample(m)],
                           lambda m: banded_upsample_forward(m, band_bytes, min_bytes)) as n:
        yield n


@contextmanager
def banded_sequences(seqs: Iterable[nn.Module], band_bytes: int | None = None, min_bytes: int | None = None,
                     affine: Callable = default_affine) -> Iterator[int]:
    """banded_sequence_forward on each GroupNorm -> SiLU -> conv Sequential for the duration of
    the block (yields how many)."""
    with forwards_replaced([m for m in seqs if is_norm_act_conv(m)],
                           lambda m: banded_sequence_forward(m, band_bytes, min_bytes, affine)) as n:
        yield n
