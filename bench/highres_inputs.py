"""What the high-res nodes do with bad inputs (issue 16 items 6-9): each case runs the node's
`execute` in-process (as a value arriving through a link reaches it: unchecked by ComfyUI)
with the small SD1.5-layout model and a narrow VAE from tests/, and prints the outcome and
its wall time. Run it against this checkout, or against another revision's pack to get the
"before" column:

    .dev/venv/bin/python bench/highres_inputs.py
    git archive <rev> | tar -x -C /tmp/before && .dev/venv/bin/python bench/highres_inputs.py --pack /tmp/before

Cases that would allocate tens of GB with an unchecked pack (a 65536 px target) run only with
--huge.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = [
    # (label, node, overrides, huge)
    ("scale_by NaN", "adv", {"scale_by": math.nan}, False),
    ("scale_by 0", "adv", {"scale_by": 0.0}, False),
    ("scale_by -2", "adv", {"scale_by": -2.0}, False),
    ("gaussian_sigma 0", "adv", {"gaussian_sigma": 0.0}, False),
    ("gaussian_sigma NaN", "adv", {"gaussian_sigma": math.nan}, False),
    ("cosine_scale_1 -1", "adv", {"cosine_scale_1": -1.0}, False),
    ("vae_tile_size 4", "adv", {"vae_tile_size": 4, "upscale_method": "pixel"}, False),
    ("scheduler 'bogus'", "adv", {"scheduler": "bogus"}, False),
    ("sampler_name 'bogus'", "adv", {"sampler_name": "bogus"}, False),
    ("method 'bogus'", "adv", {"method": "bogus"}, False),
    ("upscale_method 'bogus'", "adv", {"upscale_method": "bogus"}, False),
    ("anchor_stats 'bogus'", "adv", {"anchor_stats": "bogus"}, False),
    ("strength_schedule 'bogus'", "adv", {"strength_schedule": "bogus"}, False),
    ("stages 'bogus'", "sr", {"stages": "bogus"}, False),
    ("latent batch 0", "adv", {"latent_image": "batch0"}, False),
    ("latent 0 channels", "adv", {"latent_image": "chan0"}, False),
    ("scale_by 1000", "adv", {"scale_by": 1000.0}, True),
    ("super-resolution to 65536x65536", "sr", {"width": 65536, "height": 65536}, True),
]


def _setup(pack_dir: Path):
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "scripts"))
    import comfy_env

    comfy_env.setup(cpu=True)
    import comfy.model_management  # noqa: F401
    import nodes
    import torch

    torch.set_num_threads(1)
    if not asyncio.run(nodes.load_custom_node(str(pack_dir))):
        raise SystemExit(f"ComfyUI could not load the pack from {pack_dir}")
    return nodes.NODE_CLASS_MAPPINGS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", type=Path, default=REPO, help="the pack folder to load (default: this checkout)")
    ap.add_argument("--huge", action="store_true", help="also run the cases that may allocate tens of GB")
    args = ap.parse_args()
    classes = _setup(args.pack.resolve())
    import helpers
    import torch

    model = helpers.small_model("sd15")
    vae = helpers.small_vae()
    pos, neg = helpers.conds("sd15")
    latents = {"batch0": torch.randn(0, 4, 4, 4), "chan0": torch.randn(1, 0, 4, 4)}
    print(f"pack: {args.pack}")
    print("| input | outcome | seconds |\n|---|---|---|")
    for label, node, over, huge in CASES:
        if huge and not args.huge:
            print(f"| {label} | (skipped: --huge) | |")
            continue
        kw = dict(model=model, positive=pos, negative=neg, latent_image={"samples": torch.randn(1, 4, 4, 4)},
                  vae=vae, scale_by=2.0, width=0, height=0, seed=1, steps=10, cfg=5.0, sampler_name="euler",
                  scheduler="normal", method="demofusion", upscale_strength=0.0, strength_schedule="linear",
                  upscale_method="latent", cosine_scale_1=3.0, cosine_scale_2=1.0, cosine_scale_3=1.0,
                  gaussian_sigma=1.0, anchor_stats="auto", low_memory=False, vae_tile_size=2048)
        kw.update(over)
        if isinstance(kw["latent_image"], str):
            kw["latent_image"] = {"samples": latents[kw["latent_image"]]}
        cls = classes["LinFusionHighResSamplerAdvanced"]
        if node == "sr":
            cls = classes["LinFusionSuperResolution"]
            kw.pop("latent_image")
            kw.setdefault("stages", "single")
            kw["image"] = torch.rand(1, 32, 32, 3)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = cls.execute(**kw).result
            lat = out[-1]["samples"]
            finite = bool(torch.isfinite(lat).all())
            outcome = (f"ran: latent {tuple(lat.shape)} ({lat.shape[-1] * 8}x{lat.shape[-2] * 8} px), "
                       f"{'finite' if finite else 'NaN/inf'}, std {float(lat.float().std()):.3g}")
        except Exception as e:  # noqa: BLE001  (the point is to show whatever happens)
            outcome = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"| {label} | {outcome.replace('|', '/')} | {time.perf_counter() - t0:.2f} |", flush=True)


if __name__ == "__main__":
    main()
