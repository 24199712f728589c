"""LinFusion's generalized linear attention (arXiv 2409.02097): the core math and the module.

The core is a function of already-projected (q, k, v) so it can be tested, benchmarked and
swapped on its own; `LinFusionAttention` owns the projections and is what replaces a UNet's
self-attention (`attn1`) layer.

For one head, with phi(t) = elu(t) + 1 and N key tokens:

    kv   = mean_n phi(k_n) v_n^T                  (dh x dh)
    z    = phi(q) . mean_n phi(k_n) + eps          (one number per query)
    out  = phi(q) kv / z

The means (not sums) matter: eps = 1e-4 is calibrated against them, and they keep the
normaliser well scaled at any token count. We append a column of ones to v so that kv and
mean(phi(k)) form one summary ([kv | mean phi(k)], dh x (dh+1)), and the numerator and
normaliser come out of one matrix product with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EPS = 1e-4


# Tokens are processed in chunks of about this many elements per operand (B*H*chunk*dh),
# so memory beyond the inputs and output stays bounded whatever the resolution (at 16K,
# SD1.5's first level has 4M tokens). On CPU the chunk's fp32 temporaries fit in the L2
# cache, which makes the element-wise passes cheap; on GPUs larger chunks keep the number
# of kernel launches low.
CHUNK_ELEMENTS = {"cpu": 1 << 18, "default": 1 << 24}


def _chunk_tokens(t: torch.Tensor) -> int:
    per_token = max(1, t.numel() // max(1, t.shape[-2]))
    budget = CHUNK_ELEMENTS.get(t.device.type, CHUNK_ELEMENTS["default"])
    return max(256, budget // per_token)


def _phi(t: torch.Tensor) -> torch.Tensor:
    """elu(t) + 1 in fp32, computed as min(exp(t), 1) + max(t, 0): the same values, but
    PyTorch's CPU elu kernel is several times slower than these vectorised passes.
    exp overflowing to inf for large t is clipped to 1 as it should be."""
    t = t.float()
    if _grad(t):  # autograd needs exp's output intact: no in-place passes
        return torch.exp(t).clamp(max=1.0) + t.clamp(min=0.0)
    return torch.exp(t).clamp_(max=1.0).add_(t.clamp(min=0.0))


def _grad(*ts: torch.Tensor) -> bool:
    """Whether autograd records these: training (distillation) takes the out-of-place path."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def kv_summary(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-head summary of the keys and values, [mean phi(k) v^T | mean phi(k)].

    k: (B, H, N, dh), v: (B, H, N, dv), any float dtype and strides. Returns fp32
    (B, H, dh, dv + 1). The summary is all a query needs from the keys, so it can be
    averaged across devices holding different bands of the image (patch parallelism) and
    stay exact.
    """
    n = k.shape[-2]
    kv = torch.zeros(k.shape[:-2] + (k.shape[-1], v.shape[-1]), dtype=torch.float32, device=k.device)
    ksum = torch.zeros(k.shape[:-2] + (k.shape[-1], 1), dtype=torch.float32, device=k.device)
    step = _chunk_tokens(k)
    for s in range(0, n, step):
        phi_k = _phi(k[..., s:s + step, :]).transpose(-1, -2)
        kv.add_(torch.matmul(phi_k, v[..., s:s + step, :].float()))
        ksum.add_(phi_k.sum(dim=-1, keepdim=True))
    # Means, not sums: eps is calibrated against them and they stay in range at any N.
    return torch.cat([kv, ksum], dim=-1).div_(n)


def apply_summary(q: torch.Tensor, summary: torch.Tensor, eps: float = EPS,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Attend queries q (B, H, N, dh) to a `kv_summary` (B, H, dh, dv + 1).

    Returns (B, H, N, dv), written into `out` when given (any dtype and strides, e.g. a
    transposed view of the layer's (B, N, H, dv) output), else a new fp32 tensor.
    """
    n = q.shape[-2]
    if out is None:
        out = torch.empty(q.shape[:-1] + (summary.shape[-1] - 1,), dtype=torch.float32, device=q.device)
    step = _chunk_tokens(q)
    grad = _grad(q, summary)
    for s in range(0, n, step):
        num = torch.matmul(_phi(q[..., s:s + step, :]), summary)
        z = num[..., -1:] + eps if grad else num[..., -1:].add_(eps)
        out[..., s:s + step, :] = num[..., :-1] / z if grad else num[..., :-1].div_(z)
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
        """x: (B, N, dim) -> (B, N, dim). `context`/`value` replace the key/value tokens
        (reference-style patches feed extra tokens this way). Unknown keywords from other
        callers are accepted and ignored."""
        if self.uses_softmax(x.shape[1]):
            kwargs = {} if transformer_options is None else {"transformer_options": transformer_options}
            return self.softmax_attn(x, context=context, value=value, mask=mask, **kwargs)
        if mask is not None:
            raise ValueError(
                "LinFusion attention got an attention mask; linear self-attention has no masked form. "
                "Remove the node that adds a self-attention mask, or leave this layer unpatched."
            )
        kv_in = x if context is None else context
        v_in = kv_in if value is None else value
        q = self.to_q(x + self.to_q_(x))
        k = self.to_k(kv_in + self.to_k_(kv_in))
        v = self.to_v(v_in)
        b, nq, _ = q.shape
        h = self.heads
        # Heads as strided views of the (B, N, H, dh) projections: no transposed copies; the
        # core writes straight into the (B, N, H, dv) output that to_out reads.
        q, k, v = (t.view(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.empty(b, nq, h, v.shape[-1], dtype=q.dtype, device=q.device)
        linear_attention(q, k, v, out=out.transpose(1, 2))
        return self.to_out(out.view(b, nq, -1))
