"""One UNet step of the SD1.5 layout with ComfyUI's own high-resolution speed-ups against LinFusion.

    .dev/venv/bin/python bench/peers.py [--px 1024 2048 4096] [--cases default hypertile ...]
                                        [--timeout 600] [--budget 3600] [--channels 320]

Batch 2 (cond + uncond), random weights, the same inputs in every case, timestep 800 (inside
Deep Shrink's default window, the first 35% of the schedule). Cases, each in a fresh process
(clean peak memory) and stopped past --timeout:

  default          ComfyUI's default attention on this device (CPU: sub-quadratic attention)
  hypertile        HyperTile node defaults (comfy_extras/nodes_hypertile.py: tile 256 px, swap 2, depth 0)
  hypertile384     HyperTile with tile 384 px, the upper of the README's "256 or 384 for the SD1.5 U-Net"
  tome             ToMe (comfy_extras/nodes_tomesd.py), ratio 0.5
  deepshrink       Kohya Deep Shrink (comfy_extras/nodes_model_downscale.py), node defaults
  linfusion        every attn1 replaced by this pack's layer (random weights)
  linfusion+tome, linfusion+deepshrink: both patches (HyperTile's query tiles do not compose
                   with a layer that reads the whole image: not run)
  linfusion-compiled  the LinFusion UNet under torch.compile (inductor), as ComfyUI's
                   TorchCompileModel compiles it; the first call (the compile) is timed apart

The peers are applied with their nodes' own patch functions on a ModelPatcher, and the UNet
is called with that patcher's transformer_options (patches, plus the sigmas Deep Shrink reads),
as ComfyUI's sampler does. Each case saves its output (bench/out/peers/, safetensors); the
summary gives time and peak memory as ratios to `default` at the same size, and each output's
max abs / relative difference from `default` (LinFusion's own difference is meaningless
with random LinFusion weights; compiled LinFusion is compared with eager LinFusion).
--budget: cases that would start after this many seconds are not run (marked). Results go to
bench/out/peers.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

CASES = ["default", "hypertile", "hypertile384", "tome", "deepshrink", "linfusion", "linfusion+tome",
         "linfusion+deepshrink", "linfusion-compiled"]
TIMESTEP = 800.0
OUT = HERE / "out" / "peers"


def _node(module: str, cls: str, patcher, *args):
    """Run a comfy_extras node's patch on `patcher` (0.3.75+: io.ComfyNode.execute; older: .patch)."""
    import importlib

    node = getattr(importlib.import_module(f"comfy_extras.{module}"), cls)
    out = node.execute(patcher, *args) if hasattr(node, "execute") else node().patch(patcher, *args)
    return out.result[0] if hasattr(out, "result") else out[0]


def apply_peer(patcher, name: str, px: int):
    if name in ("hypertile", "hypertile384"):
        return _node("nodes_hypertile", "HyperTile", patcher, 256 if name == "hypertile" else 384, 2, 0, False)
    if name == "tome":
        return _node("nodes_tomesd", "TomePatchModel", patcher, 0.5)
    if name == "deepshrink":
        return _node("nodes_model_downscale", "PatchModelAddDownscale", patcher, 3, 2.0, 0.0, 0.35, True,
                     "bicubic", "bicubic")
    raise ValueError(f"unknown peer {name!r}")


def run_case(case: str, px: int, device: str, channels: int) -> dict:
    import comfy_env

    comfy_env.setup(cpu=device == "cpu")
    import comfy.model_patcher
    import torch
    from safetensors.torch import save_file

    from bench.memory import measure_once
    from bench.step import sd15_unet

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    parts = case.split("+")
    lin = parts[0].startswith("linfusion")
    model = sd15_unet(channels, lin, dtype)
    unet = model.diffusion_model.to(dev, dtype).eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)
    for peer in parts[1:] if lin else ([] if case == "default" else [case]):
        patcher = apply_peer(patcher, peer, px)
    g = torch.Generator().manual_seed(1)
    lat = px // 8
    x = torch.randn(2, 4, lat, lat, generator=g).to(dev, dtype)
    ctx = torch.randn(2, 77, 768, generator=g).to(dev, dtype)
    t = torch.full((2,), TIMESTEP, device=dev)
    sigmas = model.model_sampling.sigma(t).to(dev)
    opts = dict(patcher.model_options.get("transformer_options", {}))
    opts.update(sigmas=sigmas, cond_or_uncond=[0, 1])
    fn = torch.compile(unet, backend="inductor") if case == "linfusion-compiled" else unet
    result: dict = {}
    with torch.no_grad():
        def step():
            torch.manual_seed(0)  # HyperTile picks its tile grid with torch's RNG
            return fn(x, timesteps=t, context=ctx, transformer_options=dict(opts))

        if fn is not unet:
            start = time.perf_counter()
            step()
            result["compile_seconds"] = time.perf_counter() - start
        out = []
        seconds, peak = measure_once(lambda: out.append(step()), dev)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({"out": out[0].float().cpu().contiguous()}, str(OUT / f"{case}_{px}_{channels}.safetensors"))
    return {**result, "seconds": seconds, "peak_bytes": peak}


def difference(case: str, ref: str, px: int, channels: int) -> tuple[float, float] | None:
    """(max abs, max abs / max |ref|) of two saved outputs, None when either is missing."""
    from safetensors.torch import load_file

    a, b = (OUT / f"{c}_{px}_{channels}.safetensors" for c in (case, ref))
    if not (a.is_file() and b.is_file()):
        return None
    x, y = load_file(str(a))["out"], load_file(str(b))["out"]
    d = (x - y).abs().max().item()
    return d, d / max(1e-30, y.abs().max().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--px", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    ap.add_argument("--budget", type=float, default=math.inf, help="seconds for the whole run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels", type=int, default=320, help="UNet model_channels: 320 is SD1.5 itself")
    ap.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case[0], int(a.case[1]), a.case[2], int(a.case[3]))))
        return
    from bench.memory import fmt_bytes, run_child

    start = time.monotonic()
    results: dict[int, dict[str, dict]] = {}
    for px in a.px:
        for case in a.cases:
            for c in (OUT / f"{case}_{px}_{a.channels}.safetensors",):
                c.unlink(missing_ok=True)
            left = a.budget - (time.monotonic() - start)
            if left < 30:
                r = {"stopped": True, "why": "not run: the run's time budget was spent"}
            else:
                r = run_child([sys.executable, __file__, "--case", case, str(px), a.device, str(a.channels)],
                              min(a.timeout, left))
            results.setdefault(px, {})[case] = r
            if "seconds" in r:
                extra = f" (compile {r['compile_seconds']:.0f} s)" if "compile_seconds" in r else ""
                print(f"{px:5d}px {case:22s} {r['seconds']:8.2f} s  peak {fmt_bytes(r['peak_bytes'])}{extra}",
                      flush=True)
            else:
                print(f"{px:5d}px {case:22s} {r}", flush=True)
    print()
    print("| image | case | step | time / default | peak | peak / default | difference from default "
          "(max abs, relative) |")
    print("|---|---|---|---|---|---|---|")
    for px, rs in results.items():
        base = rs.get("default", {})
        for case, r in rs.items():
            if "seconds" not in r:
                why = r.get("why") or r.get("error", "")
                print(f"| {px} px | {case} | {why} | | | | |")
                continue
            tr = f"{r['seconds'] / base['seconds']:.2f}" if "seconds" in base else "n/a"
            mr = f"{r['peak_bytes'] / max(1, base['peak_bytes']):.2f}" if "seconds" in base else "n/a"
            ref = "linfusion" if case == "linfusion-compiled" else "default"
            d = None if case.startswith("linfusion") and ref == "default" else difference(case, ref, px, a.channels)
            diff = "" if d is None or case == "default" else f"{d[0]:.3g}, {d[1]:.2e}" + (
                " (vs eager LinFusion)" if ref == "linfusion" else "")
            print(f"| {px} px | {case} | {r['seconds']:.1f} s | {tr} | {fmt_bytes(r['peak_bytes'])} | {mr} | "
                  f"{diff} |")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "peers.json").write_text(json.dumps({"device": a.device, "channels": a.channels, "timestep": TIMESTEP,
                                                "results": results}, indent=1))


if __name__ == "__main__":
    main()
