"""The attention core and module against an independent implementation of the paper's formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.pure  # linfusion/attention.py alone: one ComfyUI version suffices (.ci/run)


def reference_attention(q, k, v, eps=1e-4):
    """Straight from the reference: phi = elu+1, kv = (phi(k)^T/sqrt(N)) (v/sqrt(N)),
    z = phi(q) mean(phi(k))^T + eps, out = phi(q) kv / z. fp64 for a clean oracle."""
    q, k, v = (t.double() for t in (q, k, v))
    n = k.shape[-2]
    pq, pk = F.elu(q) + 1, F.elu(k) + 1
    kv = (pk.transpose(-1, -2) / n ** 0.5) @ (v / n ** 0.5)
    z = pq @ pk.mean(dim=-2, keepdim=True).transpose(-1, -2) + eps
    return (pq @ kv) / z


@pytest.mark.parametrize("shape", [(2, 8, 64, 40, 40), (1, 5, 333, 64, 64), (3, 2, 17, 16, 16), (1, 4, 100, 8, 8)])
def test_core_matches_formula_fp32(lf, shape):
    b, h, nq, dh, dv = shape
    nk = nq + 7  # keys need not be the queries
    q, k, v = torch.randn(b, h, nq, dh) * 2, torch.randn(b, h, nk, dh) * 2, torch.randn(b, h, nk, dv)
    out = lf.linear_attention(q, k, v)
    assert out.shape == (b, h, nq, dv) and out.dtype == torch.float32
    err = (out.double() - reference_attention(q, k, v)).abs().max().item()
    assert err < 1e-5, err


def test_summary_is_mergeable(lf):
    """Averaging the [kv | mean phi(k)] summaries of two equal halves gives the full result:
    what patch-parallel generation relies on."""
    q, k, v = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    s = 0.5 * (lf.kv_summary(k[:, :, :32], v[:, :, :32]) + lf.kv_summary(k[:, :, 32:], v[:, :, 32:]))
    assert lf.kv_summary(k, v).shape == (1, 2, 16, 17)
    err = (lf.apply_summary(q, s) - lf.linear_attention(q, k, v)).abs().max().item()
    assert err < 1e-5, err
    # one summary (batch 1) serves a batch of queries, as broadcasting would
    q3 = torch.randn(3, 2, 50, 16)
    err = (lf.apply_summary(q3, s) - lf.linear_attention(q3, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1)))
    assert err.abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_million_tokens(lf, dtype):
    """2^20 tokens, one head of 64: finite, within 1e-2 relative of fp32 (fp32 accumulation)."""
    n = 1 << 20
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, n, 64, generator=g) * 3 for _ in range(3))
    ref = lf.linear_attention(q, k, v)
    out = lf.linear_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel


def _module_reference(layer, x, ctx=None):
    """The whole layer from its parameters, written out independently."""
    p = {k: t.double() for k, t in layer.named_parameters()}

    def proj(prefix, t):
        y = t @ p[f"{prefix}.0.weight"].T + p[f"{prefix}.0.bias"]
        y = F.layer_norm(y, y.shape[-1:], p[f"{prefix}.1.weight"], p[f"{prefix}.1.bias"], eps=1e-5)
        y = F.leaky_relu(y, 0.01)
        return y @ p[f"{prefix}.3.weight"].T + p[f"{prefix}.3.bias"]

    x = x.double()
    c = x if ctx is None else ctx.double()
    q = (x + proj("to_q_", x)) @ p["to_q.weight"].T
    k = (c + proj("to_k_", c)) @ p["to_k.weight"].T
    v = c @ p["to_v.weight"].T
    b, h = x.shape[0], layer.heads
    q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
    o = reference_attention(q, k, v).transpose(1, 2).reshape(b, x.shape[1], -1)
    return o @ p["to_out.0.weight"].T + p["to_out.0.bias"]


@pytest.mark.parametrize("dim,heads,mid", [(64, 8, 64), (128, 2, 8)])
def test_module_matches_formula(lf, dim, heads, mid):
    layer = lf.LinFusionAttention(dim, heads, mid)
    with torch.no_grad():
        for t in layer.parameters():
            t.copy_(torch.randn_like(t) * 0.2)
    x, ctx = torch.randn(2, 96, dim), torch.randn(2, 30, dim)
    out = layer(x)
    assert out.shape == x.shape
    assert (out.double() - _module_reference(layer, x)).abs().max().item() < 1e-5
    # context replaces the key/value tokens; callers' extra keywords are accepted
    out_c = layer(x, context=ctx, transformer_options={"block": ("input", 1)}, some_future_kwarg=1)
    assert (out_c.double() - _module_reference(layer, x, ctx)).abs().max().item() < 1e-5


def test_official_parameter_names_and_totals(lf):
    names = set(lf.LinFusionAttention(320, 8).state_dict())
    assert names == set(lf.weights.module_shapes(lf.ModuleSpec("x", 320, 8, 320)))
    totals = {k: sum(torch.Size(s).numel() for m in f.modules() for s in lf.weights.module_shapes(m).values())
              for k, f in lf.FAMILIES.items()}
    assert totals == {"sd1": 99_235_520, "sd2": 99_235_520, "sdxl": 435_480_800}


def test_feature_map_is_elu_plus_one(lf):
    """Both feature maps, the out-of-place one autograd records and the in-place one of the
    chunked core (exp2 of t log2 e on CPU), are elu + 1 to fp32 precision from half inputs too."""
    x = torch.cat([torch.linspace(-200, 200, 100001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.8, 1e4])])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        xx = xd.double()
        ref = torch.where(xx > 0, xx + 1, torch.exp(xx))  # elu + 1, without elu's cancellation
        into = lf.attention._phi_into(xd, torch.empty_like(x), torch.empty_like(x))
        for got in (lf.attention._phi(xd), into):
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            assert (got.double() - ref).abs().max().item() < 2e-6 * max(1.0, ref.abs().max().item())
            # relative precision where phi = exp(t) is small
            neg = (xd > -30) & (xd < 0)
            rel = ((got.double() - ref) / ref)[neg].abs().max().item()
            assert rel < 2e-6, (dtype, rel)


def test_core_refuses_other_ranks(lf):
    with pytest.raises(ValueError, match=r"\(batch, heads, tokens, dim\)"):
        lf.linear_attention(torch.randn(4, 10, 8), torch.randn(4, 10, 8), torch.randn(4, 10, 8))


def test_mask_is_refused_clearly(lf):
    layer = lf.LinFusionAttention(32, 4)
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(1, 8, 32), mask=torch.ones(1, 8, 8))


def test_chunk_boundaries(lf, monkeypatch):
    """Token chunking (bounded memory at any resolution) must not change the result."""
    monkeypatch.setitem(lf.attention.CHUNK_ELEMENTS, "cpu", 3000)  # 256-token chunks here
    q, k, v = torch.randn(2, 3, 1000, 8), torch.randn(2, 3, 777, 8), torch.randn(2, 3, 777, 5)
    assert lf.attention._chunk_tokens(q) == 256
    out = torch.empty(2, 1000, 3, 5).transpose(1, 2)  # a strided destination, as the layer uses
    lf.linear_attention(q, k, v, out=out)
    err = (out.double() - reference_attention(q, k, v)).abs().max().item()
    assert err < 1e-5, err


def test_gradients_match_formula(lf):
    """The layer trains as it runs (distillation): gradients through the core equal those of
    the formula, for inputs and for every parameter."""
    layer = lf.LinFusionAttention(32, 4, 8).double()
    with torch.no_grad():
        for t in layer.parameters():
            t.copy_(torch.randn_like(t) * 0.3)
    x = torch.randn(2, 50, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 50, 32, dtype=torch.float64)
    (layer(x).double() * w).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    (_module_reference(layer, x) * w).sum().backward()
    want = [x.grad] + [p.grad for p in layer.parameters()]
    # the core runs in fp32 whatever the input: compare at fp32 precision
    assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)) < 1e-5


def test_extra_key_tokens_normalise_by_key_count(lf):
    """With Nk key tokens != Nq queries, kv is a mean over the KEYS. The official module
    (src/linfusion/attention.py:70-73, github:Huage001/LinFusion @62ef289) divides kv by the
    query count (sequence_length = hidden_states' length) while its normaliser averages the
    keys: its output is ours x Nk / Nq. Repeating the key tokens leaves ours unchanged."""
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 4, 96, 16, generator=g), torch.randn(2, 4, 30, 16, generator=g), torch.randn(
        2, 4, 30, 16, generator=g)
    ours = lf.linear_attention(q, k, v).double()
    fq, fk = (torch.nn.functional.elu(t.double()) + 1 for t in (q, k))
    z = fq @ fk.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    official = fq @ ((fk.transpose(-2, -1) * 96**-0.5) @ (v.double() * 96**-0.5)) / z
    assert (ours - official * 96 / 30).abs().max() < 1e-5
    assert (ours - official).abs().max() > 0.5 * ours.abs().max()  # the two really differ here
    twice = lf.linear_attention(q, torch.cat([k, k], dim=2), torch.cat([v, v], dim=2)).double()
    assert (twice - ours).abs().max() < 1e-5
    # self-attention (Nk = Nq): the same as the official
    k2, v2 = torch.randn(2, 4, 96, 16, generator=g), torch.randn(2, 4, 96, 16, generator=g)
    fk2 = torch.nn.functional.elu(k2.double()) + 1
    z2 = fq @ fk2.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    off2 = fq @ ((fk2.transpose(-2, -1) * 96**-0.5) @ (v2.double() * 96**-0.5)) / z2
    assert (lf.linear_attention(q, k2, v2).double() - off2).abs().max() < 1e-5
