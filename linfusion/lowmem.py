"""Low-memory pieces of a UNet evaluation at very high resolution, in pure PyTorch.

The LinFusion reference fits a 16K SDXL image in 24 GB with four tricks (src/tools.py and the
superres_sdxl_low_w_mem notebook): classifier-free-guidance halves one at a time, feed-forward
layers on chunks of tokens (both in nodes/highres.py and linfusion/highres.py), in-place
activations in the resnets, and the UNet's skip connections parked in host memory. This file
holds the last two, written so that results equal the plain path:

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

Nothing here imports ComfyUI: the module structure read is the LDM UNet's (ResBlock with
in_layers / emb_layers / out_layers / skip_connection), the glue is nodes/lowmem.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .highres import forwards_replaced

# Rows per band: about this many bytes of the band's input. Large enough that each band's
# convolution is a big kernel launch, small next to a 16K level-0 tensor (1.3 GB in fp16).
BAND_BYTES = 64 << 20
# Below this size (bytes of one feature map of the batch) a resblock runs as it is: chunking
# small maps only adds passes.
MIN_CHUNK_BYTES = 32 << 20


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
        total += x[:, :, r:r + rows].float().reshape(b, groups, -1).sum(-1)
    mean = (total / count).view(b, groups, 1, 1, 1)
    # centred second pass: one-pass E[x^2] - E[x]^2 loses digits when |mean| >> std
    sq = torch.zeros(b, groups, dtype=torch.float32, device=x.device)
    for r in range(0, h, rows):
        band = x[:, :, r:r + rows].to(torch.float32, copy=True).view(b, groups, c // groups, -1, w)
        sq += band.sub_(mean).square_().reshape(b, groups, -1).sum(-1)
    rstd = (sq / count + eps).rsqrt_().view(b, groups, 1, 1, 1)
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
                             affine: Callable = _default_affine) -> Callable:
    """A forward(x, emb) for an LDM ResBlock that equals its own: in_layers and out_layers run
    band by band (chunked_norm_act_conv), the timestep embedding is added in place, and the
    skip connection is added into the output band by band. Peak inside the block: x, the
    in_layers result and the output, instead of up to five full-size tensors. Inputs smaller
    than `min_bytes` (default MIN_CHUNK_BYTES), and training, take the block's own forward."""
    own = block.forward
    skip = block.skip_connection

    def forward(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        limit = MIN_CHUNK_BYTES if min_bytes is None else min_bytes
        if x.ndim != 4 or x.numel() * x.element_size() < limit or (torch.is_grad_enabled() and x.requires_grad):
            return own(x, emb)
        if block.training and block.out_layers[2].p > 0:
            return own(x, emb)
        h = chunked_norm_act_conv(block.in_layers[0], block.in_layers[2], x, band_bytes, affine)
        if block.emb_layers is not None and not getattr(block, "skip_t_emb", False):
            e = block.emb_layers(emb).type(h.dtype)
            if getattr(block, "exchange_temb_dims", False):
                e = e.movedim(1, 2)
            while e.ndim < h.ndim:
                e = e[..., None]
            h += e  # the block's `h = h + emb_out`, without a second full-size tensor
        out = chunked_norm_act_conv(block.out_layers[0], block.out_layers[3], h, band_bytes, affine)
        del h
        # the block returns skip(x) + h; fp addition commutes, so out += skip(x) is the same sum
        rows = band_rows(x, band_bytes)
        for r in range(0, x.shape[2], rows):
            out[:, :, r:r + rows] += skip(x[:, :, r:r + rows])
        return out

    return forward


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
                      affine: Callable = _default_affine) -> Iterator[int]:
    """Give each chunkable block an instance-level chunked forward for the duration of the block
    (yields how many); removed on exit whatever happens, as linfusion.highres.chunked_token_forward."""
    with forwards_replaced([m for m in blocks if chunkable(m)],
                           lambda m: chunked_resblock_forward(m, band_bytes, min_bytes, affine)) as n:
        yield n


# Tokens per chunk of LinFusion's projections (low-memory forward below): 2^16 tokens of a
# 1280-wide layer in fp16 is 160 MB per temporary.
PROJECTION_CHUNK_TOKENS = 1 << 16


def token_chunked_linfusion_forward(layer: nn.Module, chunk_tokens: int | None = None) -> Callable:
    """A forward(x, ...) for a LinFusionAttention that equals its own but builds q, k, v by chunks of
    tokens into preallocated tensors (the projections' hidden temporaries then exist for one
    chunk, not the whole image), and writes to_out's result into q's storage, which the core
    no longer needs. Peak: x, q, k, v and the core's output, instead of those plus two
    full-size temporaries of the to_q_/to_k_ branches. Other cases (context/value tokens,
    hybrid softmax, masks, autograd, small inputs) take the layer's own forward."""
    from .attention import linear_attention

    own = layer.forward

    def forward(x: torch.Tensor, context=None, value=None, mask=None, transformer_options=None, **kw):
        step = chunk_tokens or PROJECTION_CHUNK_TOKENS
        b, n, d = x.shape if x.ndim == 3 else (0, 0, 0)
        if (context is not None or value is not None or mask is not None or x.ndim != 3 or n <= step
                or layer.uses_softmax(n) or (torch.is_grad_enabled() and x.requires_grad)):
            return own(x, context=context, value=value, mask=mask, transformer_options=transformer_options, **kw)
        q, k, v = (torch.empty(b, n, d, dtype=x.dtype, device=x.device) for _ in range(3))
        for s in range(0, n, step):
            xc = x[:, s:s + step]
            q[:, s:s + step] = layer.to_q(xc + layer.to_q_(xc))
            k[:, s:s + step] = layer.to_k(xc + layer.to_k_(xc))
            v[:, s:s + step] = layer.to_v(xc)
        h = layer.heads
        out = torch.empty(b, n, h, d // h, dtype=x.dtype, device=x.device)
        linear_attention(*(t.view(b, n, h, -1).transpose(1, 2) for t in (q, k, v)), out=out.transpose(1, 2))
        del k, v
        out = out.view(b, n, d)
        for s in range(0, n, step):
            q[:, s:s + step] = layer.to_out(out[:, s:s + step])
        return q

    return forward


@contextmanager
def token_chunked_linfusion(unet: nn.Module, chunk_tokens: int | None = None) -> Iterator[int]:
    """Every LinFusionAttention under `unet` runs token_chunked_linfusion_forward for the duration
    of the block (yields how many); removed on exit whatever happens."""
    from .attention import LinFusionAttention

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
    memory when the source is on CUDA, so copies can run asynchronously). Counters:
    `parked`, `fetched` (calls that moved a tensor), `bytes_moved` (both directions).
    """

    def __init__(self, park_device: torch.device | str, min_bytes: int = 1 << 20,
                 allocate: Callable | None = None):
        self.park_device = torch.device(park_device)
        self.min_bytes = min_bytes
        self.allocate = allocate or self._allocate
        self.parked = self.fetched = self.bytes_moved = 0
        self._kept: torch.Tensor | None = None
        self._waiting: dict[int, torch.Tensor] = {}  # id -> parked copy, until its output block

    def reset(self) -> None:
        """Forget parked tensors of an evaluation that did not finish (an interrupt mid-UNet)."""
        self._kept = None
        self._waiting.clear()

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
        self.parked += 1
        self.bytes_moved += h.numel() * h.element_size()
        return host

    def resume(self, h: torch.Tensor, transformer_options=None) -> torch.Tensor:
        kept, self._kept = self._kept, None
        return h if kept is None else kept

    def fetch(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._waiting.pop(id(hsp), None) is None:  # not one of ours (too small to park)
            return h, hsp
        back = torch.empty(hsp.shape, dtype=hsp.dtype, device=h.device)
        back.copy_(hsp, non_blocking=True)
        self.fetched += 1
        self.bytes_moved += hsp.numel() * hsp.element_size()
        return h, back
