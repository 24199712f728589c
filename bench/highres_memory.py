"""High-res sampler on CPU with the small SD1.5-layout model (tests/helpers.py) and LinFusion:
wall time per stage, and peak memory of one x2 stage with the low-memory option off and on.

    .dev/venv/bin/python bench/highres_memory.py [--stage-size 1024] [--threads 1]

How it measures
* Each measurement runs in a fresh subprocess (so one run's allocator state cannot hide the
  other's peak). Peak memory is the growth of the process's peak resident set size
  (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) across the one stage, over a baseline taken
  right before it with the model, conditioning and input latent already in memory. It counts
  every allocation torch makes on the CPU (tracemalloc would not see them).
* The stage is DemoFusion refinement (two UNet evaluations per step, CFG 5) with latent
  upscaling, so the VAE is not part of the number; the model has LinFusion in every
  self-attention layer (random weights in the official format).
* Times are wall-clock on this machine's CPU; on a shared machine they vary run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup(threads: int):
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "scripts"))
    import comfy_env

    comfy_env.setup(cpu=True)
    import comfy.model_management  # noqa: F401
    import nodes
    import torch

    torch.set_num_threads(threads)
    if not asyncio.run(nodes.load_custom_node(str(REPO))):
        raise SystemExit("ComfyUI could not load the pack")
    return sys.modules[str(REPO)]


def _linfusion_model(pack, folder: Path):
    import folder_paths
    import helpers

    lf = pack.linfusion
    model = helpers.small_model("sd15")
    unet = model.get_model_object("diffusion_model")
    mods = helpers.lf_modules(lf, "sd15", unet)
    state = helpers.random_state(lf, mods, dtype=helpers.torch.float32)
    helpers.write_official(folder / "LinFusion-bench", lf, mods, state)
    folder_paths.folder_names_and_paths["linfusion"] = ([str(folder)], {".safetensors"})
    patched, _ = pack.nodes.apply.apply_linfusion(model, "LinFusion-bench")
    return patched


def child(args) -> dict:
    pack = _setup(args.threads)
    import helpers
    import torch

    H = pack.nodes.highres
    with tempfile.TemporaryDirectory() as tmp:
        model = _linfusion_model(pack, Path(tmp))
    pos, neg = helpers.conds("sd15")
    steps = args.memory_steps if args.what == "memory" else args.steps
    s = H.HighResSettings(seed=1, steps=steps, cfg=5.0, sampler_name="euler", scheduler="normal",
                          method="demofusion", upscale_method="latent", low_memory=args.low_memory)
    if args.what == "memory":
        base_px = args.stage_size // 2
        g = torch.Generator().manual_seed(0)
        base = torch.randn(1, 4, base_px // 8, base_px // 8, generator=g) * 5
        # warm up (model load, first-call allocations) on a small stage, then measure the big one
        with torch.inference_mode():
            H.run_stages(model, pos, neg, {"samples": base[..., :8, :8]}, None, (128, 128), s)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        with torch.inference_mode():
            _, rep = H.run_stages(model, pos, neg, {"samples": base}, None, (args.stage_size, args.stage_size), s)
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"low_memory": args.low_memory, "stage_px": args.stage_size, "steps": rep.stages[0].steps,
                "peak_rss_growth_mb": (after - before) / 1024, "peak_rss_mb": after / 1024, "seconds": seconds}
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 8, 8, generator=g) * 5  # 64 px
    with torch.inference_mode():
        _, rep = H.run_stages(model, pos, neg, {"samples": base}, None, (args.stage_size, args.stage_size), s)
    return {"stages": [{"px": st.pixel_size, "steps": st.steps, "dilation": st.dilation, "seconds": sec}
                       for st, sec in zip(rep.stages, rep.seconds)]}


def run_child(*extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *extra], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--what", choices=["memory", "stages"], default="memory", help=argparse.SUPPRESS)
    ap.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage-size", type=int, default=2048, help="px of the measured x2 stage (memory)")
    ap.add_argument("--plan-size", type=int, default=1024, help="px of the final stage of the timed plan")
    ap.add_argument("--steps", type=int, default=20, help="full-schedule steps of the timed plan")
    ap.add_argument("--memory-steps", type=int, default=8,
                    help="full-schedule steps of the memory stage (x 0.32: 2 steps, the first with the dilated branch)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    common = ["--steps", str(args.steps), "--memory-steps", str(args.memory_steps), "--threads", str(args.threads)]
    stages = run_child("--what", "stages", "--stage-size", str(args.plan_size), *common)
    print(f"Wall time per stage (small SD1.5-layout model + LinFusion, CPU, {args.threads} thread(s), "
          f"demofusion, {args.steps}-step schedule, 64 px base):")
    for st in stages["stages"]:
        w, h = st["px"]
        print(f"  {w}x{h} px: {st['steps']} steps, dilation {st['dilation']}: {st['seconds']:.2f} s")
    print(f"Peak memory of one x2 stage {args.stage_size // 2} -> {args.stage_size} px "
          "(growth of peak RSS over the pre-stage baseline, fresh process each):")
    res = {}
    for low in (False, True):
        r = run_child("--what", "memory", "--stage-size", str(args.stage_size), *common,
                      *(["--low-memory"] if low else []))
        res[low] = r
        print(f"  low_memory={'on ' if low else 'off'}: +{r['peak_rss_growth_mb']:.0f} MB "
              f"(peak RSS {r['peak_rss_mb']:.0f} MB), {r['steps']} steps in {r['seconds']:.1f} s")
    if res[False]["peak_rss_growth_mb"] > 0:
        print(f"  ratio on/off: {res[True]['peak_rss_growth_mb'] / res[False]['peak_rss_growth_mb']:.2f}")


if __name__ == "__main__":
    main()
