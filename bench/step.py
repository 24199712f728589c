"""One full UNet denoising step of the SD1.5 layout (random weights), plain vs LinFusion.

    .dev/venv/bin/python bench/step.py [--px 512 1024 2048 4096] [--plain-px 512 1024 2048]
                                       [--timeout 900] [--device cpu] [--channels 320]
                                       [--once-from 2048]

Batch 2 (cond + uncond, as with CFG). The plain model uses ComfyUI's default attention on
this machine; the LinFusion model has every attn1 replaced by this pack's layer. Each case
runs in a fresh process (clean peak memory); sizes below --once-from are timed as the best
of one call after a warm-up, larger ones (minutes each) by a single call. Prints time and peak memory per case, the
speed-up at each size, the exponent of LinFusion's time vs pixel count between the
smallest and largest sizes from 1024 px up, and the ratio of measured peak memory to the
estimate ComfyUI is given for a LinFusion model (nodes/apply.py). Writes bench/out/step.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))


def sd15_unet(channels: int, with_linfusion: bool, dtype):
    """A ComfyUI BaseModel with the SD1.5 layout (`channels` wide) and seeded random weights, on
    the CPU; with_linfusion: every attn1 replaced by a LinFusion layer with random weights (the
    base weights are the same either way). Call after comfy_env.setup."""
    import helpers  # tests/helpers.py: the exact SD1.5 layout
    import torch

    import linfusion

    torch.manual_seed(0)
    model = helpers.base_model("sd15", channels)
    unet = model.diffusion_model
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim <= 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 1 / math.sqrt(math.prod(p.shape[1:])))
    if with_linfusion:
        mods = helpers.lf_modules(linfusion, "sd15", unet)
        weights = linfusion.LinFusionWeights(mods, helpers.random_state(linfusion, mods, dtype=dtype))
        plan = linfusion.plan_replacements(weights, unet)
        layers = linfusion.build_replacements(weights, plan, {}, dtype=dtype, device="cpu")
        for path, layer in layers.items():
            parent, name = path.rsplit(".", 1)
            setattr(unet.get_submodule(parent), name, layer)
    return model


def run_case(mode: str, px: int, device: str, channels: int = 320, once: bool = False) -> dict:
    import comfy_env

    comfy_env.setup(cpu=device == "cpu")
    import torch

    from bench.memory import measure, measure_once
    from linfusion.memory import inference_bytes

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = sd15_unet(channels, mode == "linfusion", dtype)
    unet = model.diffusion_model
    unet.to(dev, dtype).eval()
    lat = px // 8
    x = torch.randn(2, 4, lat, lat, device=dev, dtype=dtype)
    t = torch.full((2,), 500.0, device=dev)
    ctx = torch.randn(2, 77, 768, device=dev, dtype=dtype)
    with torch.no_grad():
        step = lambda: unet(x, timesteps=t, context=ctx)  # noqa: E731
        seconds, peak = measure_once(step, dev) if once else measure(step, dev, repeats=1)
    # what ComfyUI is told a LinFusion model needs for this input (nodes/apply.py)
    estimate = inference_bytes(x.shape, x.element_size(), model.memory_usage_factor)
    return {"seconds": seconds, "peak_bytes": peak, "linfusion_estimate_bytes": estimate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--px", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="LinFusion sizes")
    ap.add_argument("--plain-px", type=int, nargs="+", default=[512, 1024, 2048], help="plain-model sizes")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels", type=int, default=320,
                    help="UNet model_channels: 320 is SD1.5 itself; 32 is the small test layout")
    ap.add_argument("--once-from", type=int, default=2048,
                    help="from this size up, time one call with no warm-up (a 4096 px CPU step takes ~10 min)")
    ap.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case[0], int(a.case[1]), a.case[2], int(a.case[3]), a.case[4] == "once")))
        return
    from bench.memory import fmt_bytes, run_child

    results: dict[str, dict[int, dict]] = {"linfusion": {}, "plain": {}}
    for px in sorted(set(a.px) | set(a.plain_px)):
        for mode, sizes in (("linfusion", a.px), ("plain", a.plain_px)):
            if px not in sizes:
                continue
            once = "once" if px >= a.once_from else "best"
            r = run_child([sys.executable, __file__, "--case", mode, str(px), a.device, str(a.channels), once],
                          a.timeout)
            results[mode][px] = r
            if "seconds" in r:
                extra = (f", peak/estimate {r['peak_bytes'] / r['linfusion_estimate_bytes']:.2f}"
                         if mode == "linfusion" else "")
                peak = fmt_bytes(r["peak_bytes"])
                print(f"{mode:9s} {px:5d}px  {r['seconds']:8.2f} s  peak {peak}{extra}", flush=True)
            else:
                print(f"{mode:9s} {px:5d}px  {r}", flush=True)
        lin, pl = results["linfusion"].get(px, {}), results["plain"].get(px, {})
        if "seconds" in lin and "seconds" in pl:
            print(f"          {px:5d}px  speed-up x{pl['seconds'] / lin['seconds']:.2f}, "
                  f"peak memory x{pl['peak_bytes'] / max(1, lin['peak_bytes']):.2f} lower", flush=True)
    timed = sorted(p for p, r in results["linfusion"].items() if "seconds" in r and p >= 1024)
    if len(timed) >= 2:
        lo, hi = timed[0], timed[-1]
        t_lo, t_hi = results["linfusion"][lo]["seconds"], results["linfusion"][hi]["seconds"]
        k = math.log(t_hi / t_lo) / math.log((hi / lo) ** 2)
        print(f"LinFusion time ~ pixels^{k:.2f} from {lo} to {hi} px")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    tag = "" if a.channels == 320 else f"_ch{a.channels}"
    (out / f"step{tag}.json").write_text(json.dumps({"device": a.device, "channels": a.channels, "results": results},
                                                    indent=1))
    plot(results, out / f"step{tag}.png")


def plot(results: dict, path: Path) -> None:
    from bench.memory import plot_loglog

    series = {mode: [(p * p / 1e6, r["seconds"]) for p, r in rs.items() if "seconds" in r]
              for mode, rs in results.items()}
    plot_loglog(series, "megapixels", "seconds per UNet step (batch 2)", "SD1.5 layout, one denoising step", path)

if __name__ == "__main__":
    main()
