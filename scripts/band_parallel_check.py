"""Check exact band parallelism on real hardware, launched by torchrun on one or several machines.

Every rank builds the same UNet (SD1.5/SD2.1/SDXL layout, random weights, LinFusion in every
attn1), runs one forward on its band of the latent, and rank 0 compares the gathered output
with a single-process forward (--check) and prints the bytes each rank sent. It verifies a
multi-machine setup (network, backend, timeouts) before real work; scripts/band_parallel_stage.py
runs a high-res stage's Euler steps the same way (the LinFusion Multi-GPU node: one machine).

One machine, 2 GPUs:
    torchrun --nproc-per-node 2 scripts/band_parallel_check.py --layout sdxl --px 2048 --check
Two machines with 1 GPU each (run on both; MASTER is the first machine's address):
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d \\
        --rdzv-endpoint MASTER:29500 scripts/band_parallel_check.py --layout sd15 --px 4096
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 1 --rdzv-backend c10d \\
        --rdzv-endpoint MASTER:29500 scripts/band_parallel_check.py --layout sd15 --px 4096
CPU only (gloo): add --device cpu; --channels 64 shrinks the model for a quick run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests", REPO / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def random_linfusion_model(layout: str, channels: int | None, device: str, timeout: float):
    """Set up ComfyUI (comfy_env), join the torchrun process group (NCCL on GPUs, gloo on CPU) and
    build the layout's model with random weights and LinFusion in every attn1 (the same on every
    rank: fixed seeds). Returns (model, this rank's device, compute dtype); the caller moves the
    model there and destroys the group when done (here on a failure while building)."""
    import comfy_env

    comfy_env.setup(cpu=device == "cpu")
    import helpers
    import torch
    import torch.distributed as dist

    import linfusion

    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    try:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        model = helpers.base_model(layout, channels)
        helpers.fill_random(model, seed=0)
        unet = model.diffusion_model
        mods = helpers.lf_modules(linfusion, layout, unet)
        weights = linfusion.LinFusionWeights(mods, helpers.random_state(linfusion, mods, dtype=torch.float32))
        plan = linfusion.plan_replacements(weights, unet)
        for path, layer in linfusion.build_replacements(weights, plan, {}).items():
            unet.set_submodule(path, layer)
        return model, dev, dtype
    except BaseException:
        dist.destroy_process_group()
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=("sd15", "sd21", "sdxl"), default="sd15")
    ap.add_argument("--px", type=int, default=1024, help="image side in pixels (latent = px / 8, a multiple of 64)")
    ap.add_argument("--channels", type=int, default=None, help="model_channels (default: the full model)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may take")
    ap.add_argument("--check", action="store_true", help="rank 0 also runs the single-process forward and compares")
    a = ap.parse_args()

    import torch
    import torch.distributed as dist

    model, dev, dtype = random_linfusion_model(a.layout, a.channels, a.device, a.timeout)
    try:
        import helpers

        import linfusion.parallel as par

        rank = dist.get_rank()
        unet = model.diffusion_model.to(dev, dtype).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        lat = a.px // 8
        x = torch.randn(2, 4, lat, lat, generator=g).to(dev, dtype)
        t = torch.tensor([500.0, 500.0], device=dev)
        ctx = torch.randn(2, 77, helpers.CONTEXT[a.layout], generator=g).to(dev, dtype)
        kw = {"y": torch.randn(2, 2816, generator=g).to(dev, dtype)} if a.layout == "sdxl" else {}
        with par.band_parallel(unet, timeout_s=a.timeout) as bp, torch.no_grad():
            start = time.perf_counter()
            y = bp.forward(unet, x, t, ctx, **kw)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - start
        print(f"rank {rank}: band forward {took:.2f} s, sent {dict(bp.bytes_sent)}", flush=True)
        if a.check and rank == 0:
            with torch.no_grad():
                ref = unet(x, t, ctx, **kw)
            err = (y.float() - ref.float()).abs().max().item()
            print(f"max abs difference to the single-process forward: {err:.3e} ({dtype})", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
