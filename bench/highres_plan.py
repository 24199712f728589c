"""Print the high-res stage plan the nodes run: sizes, strengths, steps, the reference start
timestep and the model's start sigma, and the dilation, for x4, x8 and x16 on SD1.5 (512 px
base, method auto = sdedit) and SDXL (1024 px base, auto = demofusion) at 30 and 50 steps.
Nothing is sampled; the model sampling is ComfyUI's own for each family (small models with
the real layouts from tests/helpers.py). The start sigma is checked to be the same (within
1%) for every scheduler in ComfyUI's list.

    .dev/venv/bin/python bench/highres_plan.py [--steps 30 50] [--scales 4 8 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"sd15": ("SD1.5", 512), "sdxl": ("SDXL", 1024)}


def _setup():
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "scripts"))
    import comfy_env

    comfy_env.setup(cpu=True)
    import comfy.model_management  # noqa: F401
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(REPO))):
        raise SystemExit("ComfyUI could not load the pack")
    return sys.modules[str(REPO)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 50])
    ap.add_argument("--scales", type=int, nargs="+", default=[4, 8, 16])
    args = ap.parse_args()
    pack = _setup()
    import comfy.samplers
    import helpers

    H, hr = pack.nodes.highres, pack.linfusion.highres
    for kind, (label, base_px) in FAMILIES.items():
        model = helpers.small_model(kind)
        axis = H.NoiseAxis(model)
        for steps in args.steps:
            s = H.HighResSettings(seed=0, steps=steps, cfg=hr.GUIDANCE, sampler_name="euler", scheduler="normal")
            res = H.resolve(model, s)
            print(f"\n### {label}, {base_px} px base, {steps} steps: {res.style}, strengths {res.schedule}, "
                  f"steps {'ceil' if res.rounding == 'ceil' else 'int'}(steps x strength), dilation from "
                  f"{res.native_px} px\n")
            print("| scale | stage | size (px) | strength | steps | start t | start sigma | dilation |")
            print("|---|---|---|---|---|---|---|---|")
            for scale in args.scales:
                b = base_px // 8
                stages = hr.plan_stages((b, b), (b * scale, b * scale), steps, res.strength, res.schedule,
                                        native_long=res.native_px // 8, rounding=res.rounding)
                for st in stages:
                    starts = [float(H.stage_sigmas(model, st, "euler", sch, axis)[0])
                              for sch in comfy.samplers.SCHEDULER_NAMES]
                    spread = max(starts) / min(starts) - 1
                    if spread > 0.01:
                        raise SystemExit(f"start sigmas differ by {spread:.1%} across schedulers: {starts}")
                    w, h = st.pixel_size
                    dil = str(st.dilation) if res.refine else f"({st.dilation}, off: sdedit)"
                    print(f"| x{scale} | {st.index}/{len(stages)} | {w}x{h} | {st.strength:.3g} | {st.steps} | "
                          f"{st.start_timestep} | {starts[0]:.4f} | {dil} |")


if __name__ == "__main__":
    main()
