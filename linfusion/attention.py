"""LinFusion's generalized linear attention (arXiv 2409.02097): the core math and the module.

The core is a function of already-projected (q, k, v) so it can be tested, benchmarked and
swapped on its own; `LinFusionAttention` owns the projections and is what replaces a UNet's
self-attention (`attn1`) layer.

For one head, with phi(t) = elu(t) + 1 and N key tokens:

    kv   = mean_n phi(k_n) v_n^T                  (dh x dh)
    z    = phi(q) . mean_n phi(k_n) + eps          (one number per query)
    out  = phi(q) kv / z

The means (not sums) matter: eps = 1e-4 is calibrated against them, and they keep the
normaliser well scaled at any token count. kv and mean(phi(k)) form one summary
([kv | mean phi(k)], dh x (dh+1)), so the numerator and normaliser of a query come out of one
matrix product with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EPS = 1e-4


# Tokens are processed one batch element and one chunk of about this many elements per
# operand (H * chunk * dh) at a time, so memory beyond the inputs and output stays bounded
# whatever the resolution (at 16K, SD1.5's first level has 4M tokens). On CPU a chunk's fp32
# scratch stays in the L2/L3 caches, which makes the element-wise passes cheap; on GPUs
# larger chunks keep the number of kernel launches low.
CHUNK_ELEMENTS = {"cpu": 1 << 19, "default": 1 << 24}

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _chunk_tokens(t: torch.Tensor) -> int:
    """Tokens per chunk for a (B, H, N, d) operand."""
    per_token = max(1, t.shape[1] * t.shape[-1])
    budget = CHUNK_ELEMENTS.get(t.device.type, CHUNK_ELEMENTS["default"])
    return max(256, budget // per_token)


def _phi(t: torch.Tensor) -> torch.Tensor:
    """elu(t) + 1 in fp32, out of place (the path autograd records), computed as
    min(exp(t), 1) + max(t, 0): the same values; exp overflowing to inf is clipped to 1."""
    t = t.float()
    return torch.exp(t).clamp(max=1.0) + t.clamp(min=0.0)


def _into(op, *args: Any, out: torch.Tensor, **kw: Any) -> torch.Tensor:
    """op(*args, **kw, out=out). Traced by torch.compile, whose dynamo refuses out= into a
    non-contiguous tensor (a graph break per call), a strided `out` gets out.copy_(op(...))
    instead: the same values, and inductor fuses the two into one pass."""
    if out.is_contiguous() or not torch.compiler.is_compiling():
        return op(*args, out=out, **kw)
    return out.copy_(op(*args, **kw))


def _phi_into(t: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """elu(t) + 1 written into the fp32 buffer `out` (same shape as t, any input dtype);
    `tmp` is scratch of the same shape. t is read once; the other passes run over
    cache-resident chunk buffers.

    On CPU exp(t) is taken as exp2(u) with u = t log2(e), and max(t, 0) as max(u, 0) ln(2):
    PyTorch's CPU exp2 is about 3x faster than its exp, and the two roundings cost a few
    fp32 ulps (relative error < 1e-6). elu itself is 10x slower than these passes on CPU.
    """
    if t.dtype != out.dtype:  # half inputs: one fp32 copy, so nothing below rounds to half
        t = out.copy_(t)
    if t.device.type == "cpu":
        _into(torch.mul, t, LOG2E, out=out)
        _into(torch.clamp, out, min=0.0, out=tmp)
        return out.exp2_().clamp_(max=1.0).add_(tmp, alpha=LN2)
    _into(torch.clamp, t, min=0.0, out=tmp)
    return _into(torch.exp, t, out=out).clamp_(max=1.0).add_(tmp)


def _grad(*ts: torch.Tensor) -> bool:
    """Whether autograd records these: training (distillation) takes the out-of-place path."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _check4(name: str, t: torch.Tensor) -> None:
    if t.ndim != 4:
        raise ValueError(f"LinFusion attention: {name} must be (batch, heads, tokens, dim), got shape "
                         f"{tuple(t.shape)}")


def _scratch(like: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` fp32 buffers shaped and, where `like` is dense, laid out like it: element-wise
    passes then stream through memory in the input's own order instead of transposing."""
    return [torch.empty_like(like, dtype=torch.float32) for _ in range(count)]


def kv_summary(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-head summary of the keys and values, [mean phi(k) v^T | mean phi(k)].

    k: (B, H, N, dh), v: (B, H, N, dv), any float dtype and strides. Returns fp32
    (B, H, dh, dv + 1). The summary is all a query needs from the keys, so it can be
    averaged across devices holding different bands of the image (patch parallelism) and
    stay exact.
    """
    _check4("k", k)
    _check4("v", v)
    n, dh, dv = k.shape[-2], k.shape[-1], v.shape[-1]
    if _grad(k, v):
        pk = _phi(k)
        kv = torch.matmul(pk.transpose(-1, -2), v.float())
        return torch.cat([kv, pk.sum(dim=-2).unsqueeze(-1)], dim=-1) / n
    summary = torch.zeros(k.shape[:2] + (dh, dv + 1), dtype=torch.float32, device=k.device)
    step = _chunk_tokens(k)
    pk, tmp = _scratch(k[0, :, :step], 2)
    vbuf = None if v.dtype == torch.float32 else _scratch(v[0, :, :step], 1)[0]
    part = torch.empty(k.shape[1], dh, dv, dtype=torch.float32, device=k.device)
    for b in range(k.shape[0]):
        kv, ksum = summary[b, :, :, :dv], summary[b, :, :, dv]
        for s in range(0, n, step):
            m = min(step, n - s)
            phi_k = _phi_into(k[b, :, s:s + m], pk[:, :m], tmp[:, :m])
            vc = v[b, :, s:s + m] if vbuf is None else vbuf[:, :m].copy_(v[b, :, s:s + m])
            # bmm into a contiguous block, then one small add: baddbmm_ into the strided
            # summary runs as one addmm per head on CPU, 1.3x slower.
            kv.add_(torch.bmm(phi_k.transpose(-1, -2), vc, out=part))
            ksum.add_(phi_k.sum(dim=-2))
    # Means, not sums: eps is calibrated against them and they stay in range at any N.
    return summary.div_(n)


def apply_summary(q: torch.Tensor, summary: torch.Tensor, eps: float = EPS,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Attend queries q (B, H, N, dh) to a `kv_summary` (B, H, dh, dv + 1).

    Returns (B, H, N, dv), written into `out` when given (any dtype and strides, e.g. a
    transposed view of the layer's (B, N, H, dv) output), else a new fp32 tensor.
    """
    _check4("q", q)
    n, dv = q.shape[-2], summary.shape[-1] - 1
    if out is None:
        out = torch.empty(q.shape[:-1] + (dv,), dtype=torch.float32, device=q.device)
    if _grad(q, summary):
        num = torch.matmul(_phi(q), summary)
        out[...] = num[..., :-1] / (num[..., -1:] + eps)
        return out
    step = _chunk_tokens(q)
    pq, tmp = _scratch(q[0, :, :step], 2)
    heads = q.shape[1]
    numbuf = torch.empty(heads * step * (dv + 1), dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        sb = summary[b if summary.shape[0] > 1 else 0]  # a batch-1 summary serves every query batch
        for s in range(0, n, step):
            m = min(step, n - s)
            phi_q = _phi_into(q[b, :, s:s + m], pq[:, :m], tmp[:, :m])
            num = torch.matmul(phi_q, sb, out=numbuf[:heads * m * (dv + 1)].view(heads, m, dv + 1))
            z = num[..., dv:].add_(eps)
            _into(torch.div, num[..., :dv], z, out=out[b, :, s:s + m])
    return out


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = EPS,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized non-causal linear attention, all heads at once.

    q: (B, H, Nq, dh), k: (B, H, Nk, dh), v: (B, H, Nk, dv). Returns (B, H, Nq, dv) in q's
    dtype (or written into `out`). Accumulates in fp32 whatever the input dtype; memory
    beyond inputs and output is O(chunk), never N x N.
    """
    if out is None:
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    return apply_summary(q, kv_summary(k, v), eps, out=out)


class LinFusionAttention(nn.Module):
    """Drop-in replacement of a UNet self-attention layer with LinFusion's linear attention.

    Parameter names match the official weights (`to_q`, `to_k`, `to_v`, `to_out.0`,
    `to_q_.{0,1,3}`, `to_k_.{0,1,3}`) so a state dict loads as is, and so that LoRA weight
    patches addressed to `...attn1.to_q.weight` reach this module's own projections.

    `operations` provides the Linear and LayerNorm classes (default: torch.nn). A host
    application can pass its own layer classes (ComfyUI's ops, for weight casting and
    partial loading) without this module knowing about it.

    Hybrid mode: when `softmax_attn` (the model's own attention module) is given, inputs with
    at most `softmax_max_tokens` query tokens go through it unchanged; larger ones use the
    linear attention.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mid_dim: int | None = None,
        *,
        operations: Any = nn,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        softmax_attn: nn.Module | None = None,
        softmax_max_tokens: int = 0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"LinFusion layer: dim {dim} is not divisible by {heads} heads")
        mid = dim if mid_dim is None else mid_dim
        self.dim, self.heads, self.mid_dim = dim, heads, mid
        kw = {"dtype": dtype, "device": device}
        self.to_q = operations.Linear(dim, dim, bias=False, **kw)
        self.to_k = operations.Linear(dim, dim, bias=False, **kw)
        self.to_v = operations.Linear(dim, dim, bias=False, **kw)
        self.to_out = nn.Sequential(operations.Linear(dim, dim, bias=True, **kw), nn.Dropout(0.0))
        self.to_q_ = self._projection(operations, dim, mid, kw)
        self.to_k_ = self._projection(operations, dim, mid, kw)
        self.softmax_attn = softmax_attn
        self.softmax_max_tokens = int(softmax_max_tokens)

    @staticmethod
    def _projection(operations: Any, dim: int, mid: int, kw: dict) -> nn.Sequential:
        # Indices 0, 1, 3 carry weights: the official keys are to_q_.0/.1/.3.
        return nn.Sequential(
            operations.Linear(dim, mid, bias=True, **kw),
            operations.LayerNorm(mid, **kw),
            nn.LeakyReLU(0.01),
            operations.Linear(mid, dim, bias=True, **kw),
        )

    def uses_softmax(self, tokens: int) -> bool:
        """Whether an input of `tokens` query tokens runs through the model's own attention."""
        return self.softmax_attn is not None and tokens <= self.softmax_max_tokens

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        transformer_options: dict | None = None,
        **_ignored: Any,
    ) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim). `context`/`value` (B, Nk, dim) replace the key/value
        tokens (reference-style patches feed extra tokens this way). Unknown keywords from other
        callers are accepted and ignored.

        With Nk key tokens != N query tokens, both kv and mean(phi(k)) are means over the Nk
        KEY tokens. The official module (src/linfusion/attention.py:70-73) takes the normaliser's
        mean over keys but divides kv by the QUERY count (sequence_length**-0.5 twice); it only
        ever runs self-attention, where the counts agree. Its output would scale by Nk / N with
        extra keys (twice the key tokens, twice the output); the mean over keys keeps numerator
        and normaliser consistent, so repeating the key tokens changes nothing."""
        if self.uses_softmax(x.shape[1]):
            kwargs = {} if transformer_options is None else {"transformer_options": transformer_options}
            return self.softmax_attn(x, context=context, value=value, mask=mask, **kwargs)
        if mask is not None:
            raise ValueError(
                "LinFusion attention got an attention mask; linear self-attention has no masked form. "
                "Remove the node that adds a self-attention mask, or leave this layer unpatched."
            )
        kv_in = x if context is None else context
        return self.attend(x, self.summary(kv_in, kv_in if value is None else value))

    # The layer's linear-attention path in named steps, shared by this forward, the band-parallel
    # forward (linfusion/parallel/: the summary is all-reduced between the two steps) and the
    # token-streamed low-memory forward (linfusion/lowmem.py: both steps run on chunks of tokens).
    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """Queries (B, N, dim) of tokens x (B, N, dim): to_q(x + to_q_(x))."""
        return self.to_q(x + self.to_q_(x))

    def project_k(self, x: torch.Tensor) -> torch.Tensor:
        """Keys (B, N, dim) of tokens x (B, N, dim): to_k(x + to_k_(x))."""
        return self.to_k(x + self.to_k_(x))

    def project_v(self, x: torch.Tensor) -> torch.Tensor:
        """Values (B, N, dim) of tokens x (B, N, dim)."""
        return self.to_v(x)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, H * d) -> (B, H, N, d) as a strided view of the projection: no transposed copy."""
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def summary(self, kv_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
        """`kv_summary` (B, H, dh, dh + 1) of the key tokens kv_in and value tokens v_in (B, Nk, dim)."""
        return kv_summary(self.split_heads(self.project_k(kv_in)), self.split_heads(self.project_v(v_in)))

    def attend(self, x: torch.Tensor, summary: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output (B, N, dim) for query tokens x (B, N, dim) and a key/value `summary`.

        The core writes straight into a (B, N, H, dh) buffer that to_out reads (`scratch`, when
        given, a buffer of at least N tokens in x's dtype that is reused across calls)."""
        q = self.split_heads(self.project_q(x))
        b, n = x.shape[:2]
        if scratch is None:
            out = torch.empty(b, n, self.heads, summary.shape[-1] - 1, dtype=q.dtype, device=q.device)
        else:
            out = scratch[:, :n]
        apply_summary(q, summary, out=out.transpose(1, 2))
        return self.to_out(out.reshape(b, n, -1))
