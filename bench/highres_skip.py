"""Time saved by skipping the negligible dilated passes (c2 < DILATED_MIN_WEIGHT), and what it
changes: a 4-stage x16 DemoFusion run on the small SDXL-layout model (tests/helpers.py), 50
steps (16/12/8/4 per stage from t 301/221/141/61, as the reference), latent upscaling (no VAE),
cfg 7.5, run with the threshold 0 (every dilated pass, the reference) and with the default,
alternating in one process (--repeats pairs), and the max abs difference of the results
against the largest change the skipped terms could make.

    .dev/venv/bin/python bench/highres_skip.py [--base 8] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

from highres_memory import _setup  # ComfyUI on CPU with the pack loaded (bench/ is the script's path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=int, default=8, help="base latent side (cells); the target is 16x")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up run (slow machines)")
    args = ap.parse_args()
    pack = _setup(args.threads)
    import helpers
    import torch

    H, hr = pack.nodes.highres, pack.linfusion.highres
    model = helpers.small_model("sdxl")
    pos, neg = helpers.conds("sdxl")
    base = torch.randn(1, 4, args.base, args.base, generator=torch.Generator().manual_seed(3)) * 5
    target = (args.base * 16 * 8,) * 2

    evals = []
    model.model.diffusion_model.register_forward_pre_hook(lambda *_: evals.append(1))

    def run(min_weight: float):
        s = H.HighResSettings(seed=7, steps=args.steps, cfg=hr.GUIDANCE, sampler_name="euler", scheduler="normal",
                              method="demofusion", upscale_method="latent", native_size=args.base * 8,
                              dilated_min_weight=min_weight)
        t0 = time.perf_counter()
        n0 = len(evals)
        with torch.inference_mode():
            out, rep = H.run_stages(model, pos, neg, {"samples": base}, None, target, s)
        counts[min_weight] = len(evals) - n0
        return out["samples"], time.perf_counter() - t0, rep

    ms = model.get_model_object("model_sampling")
    counts = {}
    if not args.no_warmup:
        run(0.0)  # warm-up (allocator, first-call costs)
    times = {0.0: [], hr.DILATED_MIN_WEIGHT: []}
    outs = {}
    for _ in range(args.repeats):
        for w in times:
            out, sec, rep = run(w)
            times[w].append(sec)
            outs[w] = out
    per_stage = []
    for st in rep.stages:
        sig = H.stage_sigmas(model, st, "euler", "normal")[:-1]
        c2 = [hr.cosine_weights(float(ms.timestep(s.reshape(1))))[1] for s in sig]
        per_stage.append((st, sum(0 < c < hr.DILATED_MIN_WEIGHT for c in c2), sum(c > 0 for c in c2),
                          max([c for c in c2 if c < hr.DILATED_MIN_WEIGHT] or [0])))
    full, skip = min(times[0.0]), min(times[hr.DILATED_MIN_WEIGHT])
    diff = float((outs[0.0] - outs[hr.DILATED_MIN_WEIGHT]).abs().max())
    scale = float(outs[0.0].abs().max())
    print(f"4-stage x16 demofusion, small SDXL layout, {args.base * 8} -> {target[0]} px, {args.steps} steps, "
          f"{args.threads} threads, best of {args.repeats}")
    print("| stage | size | steps | dilated passes (c2 > 0) | skipped (c2 < 0.02) | largest skipped c2 |")
    print("|---|---|---|---|---|---|")
    for st, n_skip, n_dil, cmax in per_stage:
        w, h = st.pixel_size
        print(f"| {st.index} | {w}x{h} | {st.steps} | {n_dil} | {n_skip} | {cmax:.4f} |")
    print(f"\nUNet evaluations (each a CFG batch): {counts[0.0]} with every dilated pass, "
          f"{counts[hr.DILATED_MIN_WEIGHT]} skipping c2 < {hr.DILATED_MIN_WEIGHT}")
    print(f"every dilated pass: {full:.2f} s; skipping c2 < {hr.DILATED_MIN_WEIGHT}: {skip:.2f} s "
          f"(x{full / skip:.3f}, {100 * (1 - skip / full):.1f}% saved)")
    print(f"max abs difference of the final latent: {diff:.4g} (latent max abs {scale:.3g}, "
          f"ratio {diff / scale:.2e})")


if __name__ == "__main__":
    main()
