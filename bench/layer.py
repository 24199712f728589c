"""One self-attention layer: LinFusion against every attention backend ComfyUI offers here.

    .dev/venv/bin/python bench/layer.py [--px 512 1024 2048 4096] [--timeout 120] [--device cpu]

Shapes: SD1.5 (d=320/640/1280, 8 heads) and SDXL (d=640/1280, head dim 64) at the first
attention level of an image of `px` pixels (N = (px/8)^2 tokens for SD1.5, (px/16)^2 for
SDXL's first attention level), batch 2 (cond + uncond). The baseline is ComfyUI's own
CrossAttention with each registered backend (sub-quadratic, split, PyTorch SDPA, ...);
LinFusion is this pack's layer with the same width. Each case runs in a fresh child process
(clean memory high-water mark); a case that runs past --timeout is stopped and marked.
Prints a table of times, peak memory and ratios, writes bench/out/layer.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE.parent))

SHAPES = [  # (family, dim, heads, token divisor: px / divisor = latent side at that level)
    ("SD1.5", 320, 8, 8), ("SD1.5", 640, 8, 16), ("SD1.5", 1280, 8, 32),
    ("SDXL", 640, 10, 16), ("SDXL", 1280, 20, 32),
]


def run_case(backend: str, dim: int, heads: int, tokens: int, device: str) -> dict:
    """In the child: build the layer, measure one forward, return numbers."""
    import comfy_env

    comfy_env.setup(cpu=device == "cpu")
    import comfy.ldm.modules.attention as cattn
    import comfy.ops
    import torch

    from bench.memory import measure
    from linfusion.attention import LinFusionAttention

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if backend == "linfusion":
        layer = LinFusionAttention(dim, heads)
    else:
        cattn.optimized_attention = cattn.REGISTERED_ATTENTION_FUNCTIONS[backend]
        layer = cattn.CrossAttention(dim, heads=heads, dim_head=dim // heads, operations=comfy.ops.disable_weight_init)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=dim ** -0.5)
    layer = layer.to(dev, dtype).eval()
    x = torch.randn(2, tokens, dim, device=dev, dtype=dtype)
    with torch.no_grad():
        seconds, peak = measure(lambda: layer(x), dev, repeats=2)
    # tensors the layer cannot avoid: input, q, k, v, output
    unavoidable = 5 * x.numel() * x.element_size()
    return {"seconds": seconds, "peak_bytes": peak, "unavoidable_bytes": unavoidable}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--px", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a case is stopped")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="all", help="'all' or comma-separated dims, e.g. 320")
    ap.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        backend, dim, heads, tokens, device = a.case
        print(json.dumps(run_case(backend, int(dim), int(heads), int(tokens), device)))
        return

    import comfy_env

    comfy_env.setup(cpu=a.device == "cpu")
    import comfy.ldm.modules.attention as cattn

    from bench.memory import fmt_bytes, run_child

    backends = [b for b in cattn.REGISTERED_ATTENTION_FUNCTIONS if b in ("sub_quad", "split", "pytorch", "xformers",
                                                                        "flash", "sage")]
    shapes = SHAPES if a.shapes == "all" else [s for s in SHAPES if str(s[1]) in a.shapes.split(",")]
    rows, too_slow = [], set()
    for fam, dim, heads, div in shapes:
        for px in a.px:
            tokens = (px // div) ** 2
            row = {"family": fam, "dim": dim, "heads": heads, "px": px, "tokens": tokens}
            for backend in ["linfusion", *backends]:
                key = (backend, fam, dim)
                if key in too_slow:
                    row[backend] = {"stopped": True, "why": "a smaller size already ran past the time limit"}
                    continue
                cmd = [sys.executable, __file__, "--case", backend, str(dim), str(heads), str(tokens), a.device]
                row[backend] = run_child(cmd, a.timeout)
                if row[backend].get("stopped"):
                    too_slow.add(key)
            rows.append(row)
            print(format_row(row, backends, fmt_bytes), flush=True)

    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "layer.json").write_text(json.dumps({"device": a.device, "rows": rows}, indent=1))
    plot(rows, backends, out_dir / "layer.png")
    print(f"wrote {out_dir / 'layer.json'} and {out_dir / 'layer.png'}")


def format_row(row: dict, backends: list[str], fmt_bytes) -> str:
    lin = row["linfusion"]
    parts = [f"{row['family']:5s} d={row['dim']:4d} {row['px']:5d}px N={row['tokens']:8d} | linfusion "
             f"{lin.get('seconds', float('nan')) * 1e3:9.1f} ms {fmt_bytes(lin.get('peak_bytes', 0)):>10s} "
             f"(x{lin.get('peak_bytes', 0) / lin['unavoidable_bytes']:.2f} of unavoidable)" if "seconds" in lin
             else f"linfusion {lin}"]
    for b in backends:
        r = row[b]
        if "seconds" in r and "seconds" in lin:
            speedup, mem = r["seconds"] / lin["seconds"], r["peak_bytes"] / max(1, lin["peak_bytes"])
            parts.append(f"{b} {r['seconds'] * 1e3:9.1f} ms {fmt_bytes(r['peak_bytes']):>10s} "
                         f"speedup x{speedup:.1f} mem x{mem:.1f}")
        else:
            parts.append(f"{b} {'stopped: ' + r['why'] if r.get('stopped') else r.get('error')}")
    return " | ".join(parts)


def plot(rows: list[dict], backends: list[str], path: Path) -> None:
    from bench.memory import plot_loglog

    series = {b: [(r["tokens"], r[b]["seconds"]) for r in rows if r["dim"] == 320 and "seconds" in r[b]]
              for b in ["linfusion", *backends]}
    plot_loglog(series, "tokens (SD1.5 first level, d=320)", "seconds per layer forward (batch 2)",
                "One self-attention layer", path)

if __name__ == "__main__":
    main()
