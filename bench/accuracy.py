"""Accuracy of the attention core against the reference formula in fp64, and of half
precision against fp32 at a million tokens.

    .dev/venv/bin/python bench/accuracy.py [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linfusion.attention import linear_attention  # noqa: E402


def reference(q, k, v, eps=1e-4):
    """The reference's formula: 1/N split as 1/sqrt(N) on each operand, in fp64."""
    q, k, v = (t.double() for t in (q, k, v))
    n = k.shape[-2]
    pq, pk = F.elu(q) + 1, F.elu(k) + 1
    kv = (pk.transpose(-1, -2) / n ** 0.5) @ (v / n ** 0.5)
    return (pq @ kv) / (pq @ pk.mean(-2, keepdim=True).transpose(-1, -2) + eps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(ap.parse_args().device)
    g = torch.Generator(device=dev).manual_seed(0)
    for b, h, n, dh in ((2, 8, 4096, 40), (2, 10, 4096, 64), (1, 5, 333, 64)):
        q, k, v = (torch.randn(b, h, n, dh, generator=g, device=dev) * 2 for _ in range(3))
        err = (linear_attention(q, k, v).double() - reference(q, k, v)).abs().max().item()
        print(f"fp32 B{b} H{h} N{n} dh{dh}: max abs error vs fp64 formula {err:.2e}")
    n = 1 << 20
    q, k, v = (torch.randn(1, 1, n, 64, generator=g, device=dev) * 3 for _ in range(3))
    ref = linear_attention(q, k, v)
    for dtype in (torch.float16, torch.bfloat16):
        out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype)).float()
        rel = ((out - ref).norm() / ref.norm()).item()
        finite = bool(torch.isfinite(out).all())
        print(f"{str(dtype)[6:]} N=2^20 dh64: finite {finite}, relative error vs fp32 {rel:.2e}")


if __name__ == "__main__":
    main()
