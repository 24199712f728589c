"""Low-memory pieces of a UNet evaluation at very high resolution, in pure PyTorch.

The LinFusion reference fits a 16K SDXL image in 24 GB with four tricks (src/tools.py and the
superres_sdxl_low_w_mem notebook): classifier-free-guidance halves one at a time (the
sampler's cond batching, nodes/highres.py), feed-forward layers on chunks of tokens
(`chunked_token_forward`), in-place activations in the resnets, and the UNet's skip
connections parked in host memory. This file holds the last three, written so that results
equal the plain path, and `LowMemory`, the settings every piece reads:

* `SkipParking`: three callables for an LDM UNet's block patches. Each skip tensor (the
  `hs` list of the UNet's forward) is copied to `park_device` right after its input block and
  copied back just before the output block that concatenates it. The values round-trip
  exactly (a copy); what changes is where the bytes wait.
* `chunked_resblock_forward` / `chunked_norm_act_conv`: GroupNorm -> SiLU -> 3x3 conv over
  bands of rows. GroupNorm needs statistics over the whole feature map, so they are taken
  first (two fp32 passes: mean, then centred variance); each band is then normalised,
  activated and convolved with `pad` halo rows on each side, and its output rows are written
  into one preallocated result. Only one band's normalised activation exists at a time,
  instead of two full-size tensors (GroupNorm out, SiLU out). Not bit-exact: the
  normalisation is (x - mean) * rstd * gamma + beta in fp32 where PyTorch's kernel folds it
  into x * a + b and accumulates its moments in another order; the difference is a few fp32
  ulps (max abs ~1e-6 on the tests' layouts). The convolution of a band with halo rows reads
  exactly the same inputs as the full convolution (zero padding only at the image border).

Beyond the reference (what brings SDXL 16K from ~20 to ~14 GiB, bench/RESULTS.md):

* `SkipConcat` + `split_input_resblock`: the decoder's `torch.cat([h, skip])` at the banded
  levels is never built; the ResBlock reads its two parts band by band (a parked skip
  straight from host memory) and can write its output into h's own storage.
* `banded_upsample_forward` / `banded_sequence_forward`: the Upsample layers feeding the
  banded levels and the UNet's output head (GroupNorm, SiLU, conv) in bands of rows.
* `token_chunked_linfusion_forward`: keys and values first, reduced to LinFusion's summary,
  then the queries streamed through it chunk by chunk (q and the attention output never
  exist at full size).

Nothing here imports ComfyUI: the module structure read is the LDM UNet's (ResBlock with
in_layers / emb_layers / out_layers / skip_connection, Upsample), the glue is nodes/lowmem.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from torch import nn

from .attention import LinFusionAttention, kv_summary
from .forwards import forwards_replaced

# Rows per band: about this many bytes of the band's input. Large enough that each band's
# convolution is a big kernel launch, small next to a 16K level-0 tensor (1.3 GB in fp16).
BAND_BYTES = 64 << 20
# Below this size (bytes of one feature map of the batch) a resblock runs as it is: chunking
# small maps only adds passes. (linfusion/memory.py's low-memory estimate reads it too.)
MIN_CHUNK_BYTES = 32 << 20
# Token-wise layers in low-memory mode (feed-forward, cross-attention: its queries, output
# and to_out result; the 77 text tokens are shared) run on at least 16 chunks of tokens (the
# reference's feed-forward setting) and at most this many tokens per chunk, so their
# temporaries stay near 100 MB at any resolution (a 16K SDXL level-1 feed-forward's hidden
# activation would be 1.3 GB per 16th).
TOKEN_CHUNKS = 16
MAX_CHUNK_TOKENS = 1 << 14


@dataclass(frozen=True)
class LowMemory:
    """Low-memory mode as one object: the sampler decides it once and passes it down as is.

    token_chunks, max_chunk_tokens: feed-forward and cross-attention layers run on at least
    `token_chunks` slices of their tokens, each at most `max_chunk_tokens` long
    (chunked_token_forward). banded: the resnets, upsamplers and output head of the `levels`
    highest resolutions in bands of rows, the decoder's skip concatenations left to them, the
    skips parked in host memory and LinFusion layers streaming their queries; off when each
    device holds only a band of rows (band parallelism: a banded GroupNorm's statistics would
    be its band's own), where the feed-forward chunks stay. min_chunk_bytes: feature maps below
    it run unbanded (None: MIN_CHUNK_BYTES when the forward runs)."""

    token_chunks: int = TOKEN_CHUNKS
    max_chunk_tokens: int = MAX_CHUNK_TOKENS
    banded: bool = True
    levels: int = 2  # the reference's in-place resnets matter only where the maps are biggest
    min_chunk_bytes: int | None = None


def _default_affine(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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


def band_rows(x: torch.Tensor, band_bytes: int | None = None) -> int:
    """Rows per band so that a band of x (B, C, H, W) holds about `band_bytes` bytes (default
    BAND_BYTES), at least 8 rows."""
    band_bytes = band_bytes or BAND_BYTES
    row = x.shape[0] * x.shape[1] * x.shape[3] * x.element_size()
    return max(8, band_bytes // max(1, row))


def _same_size_conv(conv: nn.Module) -> bool:
    """A stride-1 2-D conv whose zero padding keeps the size: bands with `padding` halo rows are exact."""
    if not isinstance(conv, nn.Conv2d) or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return False
    (kh, _), (dh, _), (ph, _) = conv.kernel_size, conv.dilation, conv.padding
    return tuple(conv.stride) == (1, 1) and ph == dh * (kh - 1) // 2 and (kh % 2 == 1)


def chunked_norm_act_conv(norm: nn.GroupNorm, conv: nn.Module, x: torch.Tensor, band_bytes: int | None = None,
                          affine: Callable = _default_affine, out: torch.Tensor | None = None,
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
                             affine: Callable = _default_affine, pending: Callable | None = None) -> Callable:
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


def split_input_resblock(block: nn.Module, parts: list[torch.Tensor], emb: torch.Tensor,
                         moments: list | None = None, band_bytes: int | None = None,
                         affine: Callable = _default_affine, overwrite_first: bool = False) -> torch.Tensor:
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
    norm, conv = block.in_layers[0], block.in_layers[2]
    rows = max(8, (band_bytes or BAND_BYTES) // max(1, b * c * w * parts[0].element_size()))
    moments = list(moments or [None] * len(parts))
    stats = [m if m is not None else channel_moments(p, rows) for p, m in zip(parts, moments)]
    mean = torch.cat([s[0].to(device) for s in stats], 1)
    m2 = torch.cat([s[1].to(device) for s in stats], 1)
    ref = torch.empty(0, dtype=dtype, device=device)
    gamma, beta = affine(norm, ref)
    a, shift = (t[..., None, None] for t in group_affine(norm, mean, m2, h * w, gamma, beta))
    pad = conv.padding[0]
    h_in = out = carry = None
    first = parts[0]
    in_first = False  # out is a view of the first part's storage
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        lo, hi = max(0, r0 - pad), min(h, r1 + pad)
        band = torch.cat([p[:, :, lo:hi].to(device, non_blocking=True) for p in parts], 1)
        if carry is not None:  # rows above r0 of the first part were overwritten by the last band
            band[:, :carry.shape[1], :r0 - lo] = carry
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
        rows = max(8, (band_bytes or BAND_BYTES) // max(1, x.shape[0] * x.shape[1] * w * x.element_size()))
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
                            affine: Callable = _default_affine) -> Callable:
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
                      affine: Callable = _default_affine, pending: Callable | None = None) -> Iterator[int]:
    """Give each chunkable block an instance-level chunked forward for the duration of the block
    (yields how many); removed on exit whatever happens, as linfusion.highres.chunked_token_forward."""
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
                     affine: Callable = _default_affine) -> Iterator[int]:
    """banded_sequence_forward on each GroupNorm -> SiLU -> conv Sequential for the duration of
    the block (yields how many)."""
    with forwards_replaced([m for m in seqs if is_norm_act_conv(m)],
                           lambda m: banded_sequence_forward(m, band_bytes, min_bytes, affine)) as n:
        yield n


def _count(obj, **increments: int) -> None:
    """Add to an object's counters, in eager calls only: a counter that a graph traced by
    torch.compile reads becomes a guard on its value, which would recompile every call."""
    if not torch.compiler.is_compiling():
        for name, n in increments.items():
            setattr(obj, name, getattr(obj, name) + n)


class SkipConcat:
    """Leaves out the UNet decoder's `torch.cat([h, skip])` where a banded ResBlock consumes it.

    `patch` is an output_block_patch (it must run last among them): when the first layer of the
    output block is one of `blocks` (ResBlocks under chunked_resblocks with `pending=take`) and
    the concatenation would hold at least `min_bytes`, it keeps (h, skip) and hands the UNet two
    empty (B, 0, H, W) tensors, whose concatenation costs nothing; the block then takes the
    parts back with `take` and runs split_input_resblock on them. A skip parked in host memory
    by `parking` stays there (its per-channel moments were measured when it was parked) and is
    copied to the device one band at a time. With `overwrite` (set when no other patch sees
    the decoder's maps, so nothing else can hold them) the block writes its output into h's
    storage. Anything else goes on as usual (through `parking.fetch` when parking is given).
    Counters (eager calls only, see _count): `deferred`."""

    def __init__(self, unet: nn.Module, blocks: Iterable[nn.Module], min_bytes: int | None = None,
                 parking: SkipParking | None = None):
        self.unet = unet
        self.blocks = {id(b) for b in blocks}
        self.min_bytes = min_bytes
        self.parking = parking
        self.overwrite = False  # may the blocks write into h (set per call: only when no other patch saw it)
        self.deferred = 0
        self._pending: dict[int, tuple[list[torch.Tensor], list, bool]] = {}

    def reset(self) -> None:
        self._pending.clear()

    def patch(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options=None):
        where = (transformer_options or {}).get("block", (None, None))
        first = None
        if where[0] == "output" and isinstance(where[1], int) and where[1] < len(self.unet.output_blocks):
            first = self.unet.output_blocks[where[1]][0]
        limit = MIN_CHUNK_BYTES if self.min_bytes is None else self.min_bytes
        # hsp None: an earlier patch consumed the skip (newer UNet forwards then skip the concatenation)
        if (hsp is None or first is None or id(first) not in self.blocks or "forward" not in vars(first) or h.ndim != 4
                or hsp.shape[0] != h.shape[0] or hsp.shape[2:] != h.shape[2:]
                or (h.shape[1] + hsp.shape[1]) * h[:, :1].numel() * h.element_size() < limit):
            return self.parking.fetch(h, hsp, transformer_options) if self.parking is not None else (h, hsp)
        moments = self.parking.claim(hsp) if self.parking is not None else None
        self._pending[id(first)] = ([h, hsp], [None, moments], self.overwrite)
        _count(self, deferred=1)
        empty = h.new_empty((h.shape[0], 0, *h.shape[2:]))
        return empty, empty

    def take(self, block: nn.Module):
        return self._pending.pop(id(block), None)


# Tokens per chunk of LinFusion's projections (low-memory forward below): 2^16 tokens of a
# 1280-wide layer in fp16 is 160 MB per temporary.
PROJECTION_CHUNK_TOKENS = 1 << 16


def token_chunked_linfusion_forward(layer: nn.Module, chunk_tokens: int | None = None) -> Callable:
    """A forward(x, ...) for a LinFusionAttention that equals its own but never holds q or the
    attention output at full size: k and v are built by chunks of tokens into preallocated
    tensors, reduced to the key/value summary (dh x (dh+1) per head), and then each chunk of
    queries is projected, attended to the summary and passed through to_out into k's storage,
    which the summary no longer needs. Peak: x, k and v (then x and the result), instead of
    x, q, k, v, the core's output and two full-size temporaries of the to_q_/to_k_ branches.
    Other cases (context/value tokens, hybrid softmax, masks, autograd, small inputs) take
    the layer's own forward."""
    own = layer.forward

    def forward(x: torch.Tensor, context=None, value=None, mask=None, transformer_options=None, **kw):
        step = chunk_tokens or PROJECTION_CHUNK_TOKENS
        b, n, d = x.shape if x.ndim == 3 else (0, 0, 0)
        if (context is not None or value is not None or mask is not None or x.ndim != 3 or n <= step
                or layer.uses_softmax(n) or (torch.is_grad_enabled() and x.requires_grad)):
            return own(x, context=context, value=value, mask=mask, transformer_options=transformer_options, **kw)
        k, v = (torch.empty(b, n, d, dtype=x.dtype, device=x.device) for _ in range(2))
        for s in range(0, n, step):
            xc = x[:, s:s + step]
            k[:, s:s + step] = layer.project_k(xc)
            v[:, s:s + step] = layer.project_v(xc)
        summary = kv_summary(layer.split_heads(k), layer.split_heads(v))
        del v
        out = k  # the result goes where the keys were
        o = torch.empty(b, min(step, n), layer.heads, d // layer.heads, dtype=x.dtype, device=x.device)
        for s in range(0, n, step):
            out[:, s:s + step] = layer.attend(x[:, s:s + step], summary, scratch=o)
        return out

    return forward


def cross_attention_layers(unet: nn.Module) -> list[nn.Module]:
    """The transformer blocks' cross-attention modules (`...transformer_blocks.N.attn2`)."""
    return [m for n, m in unet.named_modules() if n.endswith(".attn2")]


def feed_forward_layers(unet: nn.Module) -> list[nn.Module]:
    """The transformer blocks' feed-forward modules (`...transformer_blocks.N.ff`)."""
    return [m for n, m in unet.named_modules() if n.endswith(".ff") and hasattr(m, "net")]


def _chunked(forward, chunks: int, min_tokens: int, max_tokens: int | None = None):
    def run(x: torch.Tensor, *args, **kwargs):
        n = min(chunks, x.shape[1] // max(1, min_tokens)) if x.ndim == 3 else 1
        if max_tokens and x.ndim == 3:
            n = max(n, -(-x.shape[1] // max_tokens))
        if n < 2 or kwargs.get("mask") is not None:  # a mask has a query axis of its own
            return forward(x, *args, **kwargs)
        out, s = None, 0
        for part in x.chunk(n, dim=1):  # each result straight into its rows: no list, no concatenation
            y = forward(part, *args, **kwargs)
            if out is None:
                out = y.new_empty((y.shape[0], x.shape[1], *y.shape[2:]))
            out[:, s:s + y.shape[1]] = y
            s += y.shape[1]
            del y
        return out

    return run


@contextmanager
def chunked_token_forward(modules: Iterable[nn.Module], chunks: int, min_tokens: int = 4096,
                          max_tokens: int | None = None) -> Iterator[None]:
    """Run each module's forward on `chunks` slices of its token axis (dim 1 of a (B, N, C)
    input), each result written into one output: a feed-forward layer's wide hidden
    activation (or a cross-attention's queries and scores) then exists for N / chunks tokens
    at a time. Exact for token-wise layers (cross-attention is: each query attends to the
    same text tokens; calls with a mask run whole). Slices keep at least
    `min_tokens` tokens (fewer chunks for small inputs): each chunk re-reads the layer's
    weights, which costs more than it saves when activations are small; `max_tokens` caps a
    slice (more chunks for big inputs). The modules themselves are not
    replaced (their names, parameters and weight patches stay), only an instance-level
    forward is set, and removed on exit whatever happens."""
    with forwards_replaced(list(modules) if chunks > 1 else [],
                           lambda m: _chunked(m.forward, chunks, min_tokens, max_tokens)):
        yield


@contextmanager
def token_chunked_linfusion(unet: nn.Module, chunk_tokens: int | None = None) -> Iterator[int]:
    """Every LinFusionAttention under `unet` runs token_chunked_linfusion_forward for the duration
    of the block (yields how many); removed on exit whatever happens."""
    with forwards_replaced([m for m in unet.modules() if isinstance(m, LinFusionAttention)],
                           lambda m: token_chunked_linfusion_forward(m, chunk_tokens)) as n:
        yield n


class SkipParking:
    """Keeps an LDM UNet's skip connections in host memory between their input block and the
    output block that uses them. Use as three block patches (ComfyUI's transformer_options
    "patches"):

        input_block_patch(h, opts)             -> a copy of h on park_device (what the UNet stores
                                                  in its skip list); h itself is kept for the next block
        input_block_patch_after_skip(h, opts)  -> the kept h again (the computation continues on device)
        output_block_patch(h, hsp, opts)       -> (h, hsp copied back to h's device)

    Only skips of at least `min_bytes` move (small ones would cost a synchronising copy for
    nothing). `allocate(shape, dtype, device)` makes the host buffer (default: pinned CPU
    memory when the source is on CUDA, so copies can run asynchronously). Counters (eager
    calls only, see _count): `parked`, `fetched` (calls that moved a tensor), `bytes_moved`
    (both directions).
    """

    def __init__(self, park_device: torch.device | str, min_bytes: int = 1 << 20,
                 allocate: Callable | None = None, moments: bool = False):
        self.park_device = torch.device(park_device)
        self.min_bytes = min_bytes
        self.allocate = allocate or self._allocate
        self.moments = moments  # measure each parked skip's per-channel moments (for SkipConcat)
        self.parked = self.fetched = self.bytes_moved = 0
        self._kept: torch.Tensor | None = None
        self._waiting: dict[int, torch.Tensor] = {}  # id -> parked copy, until its output block
        self._moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        """Forget parked tensors of an evaluation that did not finish (an interrupt mid-UNet)."""
        self._kept = None
        self._waiting.clear()
        self._moments.clear()

    def _allocate(self, shape, dtype, like: torch.Tensor) -> torch.Tensor:
        pin = self.park_device.type == "cpu" and like.device.type == "cuda"
        return torch.empty(shape, dtype=dtype, device=self.park_device, pin_memory=pin)

    def park(self, h: torch.Tensor, transformer_options=None) -> torch.Tensor:
        if h.numel() * h.element_size() < self.min_bytes:
            self._kept = None
            return h
        host = self.allocate(h.shape, h.dtype, h)
        host.copy_(h, non_blocking=True)
        self._kept = h
        self._waiting[id(host)] = host
        if self.moments:  # measured here, on the device: a SkipConcat never reads the skip twice
            self._moments[id(host)] = channel_moments(h, band_rows(h))
        _count(self, parked=1, bytes_moved=h.numel() * h.element_size())
        return host

    def resume(self, h: torch.Tensor, transformer_options=None) -> torch.Tensor:
        kept, self._kept = self._kept, None
        return h if kept is None else kept

    def claim(self, hsp: torch.Tensor):
        """Take a parked skip off the waiting list without copying it back (SkipConcat reads it in
        bands): its per-channel moments when measured, else None; None for a skip not parked."""
        if self._waiting.pop(id(hsp), None) is None:
            return None
        _count(self, fetched=1, bytes_moved=hsp.numel() * hsp.element_size())  # it still crosses, one band at a time
        return self._moments.pop(id(hsp), None)

    def fetch(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options=None) -> tuple[torch.Tensor, torch.Tensor]:
        self._moments.pop(id(hsp), None)
        if self._waiting.pop(id(hsp), None) is None:  # not one of ours (too small to park)
            return h, hsp
        back = torch.empty(hsp.shape, dtype=hsp.dtype, device=h.device)
        back.copy_(hsp, non_blocking=True)
        _count(self, fetched=1, bytes_moved=hsp.numel() * hsp.element_size())
        return h, back
