"""Low-memory mode of a UNet evaluation at very high resolution, in pure PyTorch: `LowMemory`,
the settings every piece reads, and the pieces that work on tokens and skip connections (the
banded spatial ones are in linfusion/banded.py).

The LinFusion reference fits a 16K SDXL image in 24 GB with four tricks (src/tools.py and the
superres_sdxl_low_w_mem notebook): classifier-free-guidance halves one at a time (the
sampler's cond batching, nodes/highres_sampling.py), feed-forward layers on chunks of tokens
(`chunked_token_forward`), in-place activations in the resnets (banded resnets,
linfusion/banded.py), and the UNet's skip connections parked in host memory, written so that
results equal the plain path:

* `SkipParking`: three callables for an LDM UNet's block patches. Each skip tensor (the
  `hs` list of the UNet's forward) is copied to `park_device` right after its input block and
  copied back just before the output block that concatenates it. The values round-trip
  exactly (a copy); what changes is where the bytes wait.

Beyond the reference (what brings SDXL 16K from ~20 to ~14 GiB, bench/RESULTS.md):

* `SkipConcat`: the decoder's `torch.cat([h, skip])` at the banded levels is never built; the
  ResBlock reads its two parts band by band (banded.split_input_resblock).
* `token_chunked_linfusion_forward`: keys and values first, reduced to LinFusion's summary,
  then the queries streamed through it chunk by chunk (q and the attention output never
  exist at full size).

Nothing here imports ComfyUI; the glue is nodes/lowmem.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import banded
from .attention import LinFusionAttention, kv_summary
from .forwards import forwards_replaced

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
    it run unbanded (None: banded.MIN_CHUNK_BYTES when the forward runs)."""

    token_chunks: int = TOKEN_CHUNKS
    max_chunk_tokens: int = MAX_CHUNK_TOKENS
    banded: bool = True
    levels: int = 2  # the reference's in-place resnets matter only where the maps are biggest
    min_chunk_bytes: int | None = None


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
        limit = banded.MIN_CHUNK_BYTES if self.min_bytes is None else self.min_bytes
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
            self._moments[id(host)] = banded.channel_moments(h, banded.band_rows(h))
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
