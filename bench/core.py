"""The attention core (after the projections) against its own matrix products, and its share
of a whole LinFusion layer.

    .dev/venv/bin/python bench/core.py [--px 1024 2048 4096] [--device cpu]

For SD1.5's first level (d=320, 8 heads of 40) and SDXL's (d=640, 10 heads of 64), batch 2:
- core: linear_attention on (B, H, N, dh) views of the projections, as the layer calls it;
- matmuls: the two products the core cannot avoid, phi(k)^T [v|1] and phi(q) S, on
  ready-made contiguous fp32 operands, written into preallocated outputs (as the core
  writes into the layer's output; a fresh 0.7 GB result would add page faults to them);
- layer: the whole LinFusionAttention forward (projections included).
Target: core <= 1.5 x matmuls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.memory import measure  # noqa: E402
from linfusion.attention import LinFusionAttention, linear_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--px", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), "
          f"{torch.get_num_threads()} threads, {dtype}")
    for name, dim, heads, div in (("SD1.5", 320, 8, 8), ("SDXL", 640, 10, 16)):
        for px in a.px:
            case(name, dim, heads, (px // div) ** 2, px, dev, dtype)


def case(name: str, dim: int, heads: int, n: int, px: int, dev: torch.device, dtype: torch.dtype) -> None:
    dh = dim // heads

    def strided() -> torch.Tensor:  # a head view of a (B, N, dim) projection, as in the layer
        return torch.randn(2, n, dim, device=dev, dtype=dtype).view(2, n, heads, dh).transpose(1, 2)

    q, k, v = strided(), strided(), strided()
    out = torch.empty(2, n, heads, dh, device=dev, dtype=dtype).transpose(1, 2)
    pk = torch.randn(2, heads, n, dh, device=dev)
    v1 = torch.randn(2, heads, n, dh + 1, device=dev)
    s = torch.randn(2, heads, dh, dh + 1, device=dev)
    kv_out = torch.empty(2, heads, dh, dh + 1, device=dev)
    num_out = torch.empty(2, heads, n, dh + 1, device=dev)
    layer = LinFusionAttention(dim, heads).to(dev, dtype).eval()
    x = torch.randn(2, n, dim, device=dev, dtype=dtype)
    with torch.no_grad():
        t_core, _ = measure(lambda: linear_attention(q, k, v, out=out), dev, repeats=5)
        t_mm, _ = measure(lambda: (torch.matmul(pk.transpose(-1, -2), v1, out=kv_out),
                                    torch.matmul(pk, s, out=num_out)), dev, repeats=5)
        t_layer, _ = measure(lambda: layer(x), dev, repeats=2)
    print(f"{name:5s} {px:5d}px N={n:8d}: core {t_core * 1e3:8.1f} ms, its matmuls {t_mm * 1e3:8.1f} ms "
          f"(core/matmuls x{t_core / t_mm:.2f}), layer {t_layer * 1e3:8.1f} ms (core share "
          f"{t_core / t_layer:.0%})", flush=True)

if __name__ == "__main__":
    main()
