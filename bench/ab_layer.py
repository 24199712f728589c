"""A/B of the LinFusion layer and its core against the same code at another git revision,
timed alternately in one process so that machine-wide drift hits both sides alike.

    .dev/venv/bin/python bench/ab_layer.py --rev e493a44 [--tokens 4096 16384 65536] [--rounds 6]

Loads linfusion/attention.py as it is at --rev (through `git show`, nothing is checked out)
and as it is in the working tree, builds both layers with the same weights, checks they
agree, then times layer and core on each side in turn. Prints the best of --rounds for each.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_attention(source: str, name: str):
    """Import an attention.py given as text, as a stand-alone module (it imports only torch)."""
    path = Path(tempfile.mkdtemp(prefix="linfusion-ab-")) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="git revision to compare with (e.g. a commit before a change)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--dim", type=int, default=320)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    old_src = subprocess.run(["git", "show", f"{a.rev}:linfusion/attention.py"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    old = load_attention(old_src, "attention_old")
    new = load_attention((REPO / "linfusion" / "attention.py").read_text(), "attention_new")
    print(f"layer d={a.dim}, {a.heads} heads, batch 2, fp32, {torch.get_num_threads()} threads; "
          f"best of {a.rounds} alternating rounds; old = {a.rev}, new = working tree")
    for n in a.tokens:
        compare(old, new, n, a.dim, a.heads, a.rounds)


def compare(old, new, n: int, dim: int, heads: int, rounds: int) -> None:
    torch.manual_seed(0)
    lo = old.LinFusionAttention(dim, heads).eval()
    ln = new.LinFusionAttention(dim, heads).eval()
    ln.load_state_dict(lo.state_dict())
    x = torch.randn(2, n, dim)
    with torch.no_grad():
        diff = (lo(x) - ln(x)).abs().max().item()
        q, k, v = (t.view(2, n, heads, -1).transpose(1, 2)
                   for t in (lo.to_q(x + lo.to_q_(x)), lo.to_k(x + lo.to_k_(x)), lo.to_v(x)))
        out = torch.empty(2, n, heads, dim // heads).transpose(1, 2)
        cases = {"old layer": lambda: lo(x), "new layer": lambda: ln(x),
                 "old core": lambda: old.linear_attention(q, k, v, out=out),
                 "new core": lambda: new.linear_attention(q, k, v, out=out)}
        for fn in cases.values():  # warm-up
            fn()
        times = {name: float("inf") for name in cases}
        for _ in range(rounds):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name] = min(times[name], time.perf_counter() - t)
    print(f"N={n:7d}: layer old {times['old layer'] * 1e3:8.1f} ms, new {times['new layer'] * 1e3:8.1f} ms "
          f"(new/old {times['new layer'] / times['old layer']:.3f}); core old {times['old core'] * 1e3:7.1f} ms, "
          f"new {times['new core'] * 1e3:7.1f} ms (new/old {times['new core'] / times['old core']:.3f}); "
          f"max |diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
