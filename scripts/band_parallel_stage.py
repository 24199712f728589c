"""One high-res stage band-parallel across processes and machines, launched by torchrun.

Every rank builds the same UNet (SD1.5/SD2.1/SDXL layout through ComfyUI's own classes, random
weights, LinFusion in every attn1) and runs the stage's Euler steps (img2img from a given
latent at --denoise, CFG batch of cond + uncond) with every UNet evaluation split into
horizontal bands by linfusion/parallel.py, the code the LinFusion Multi-GPU node runs. Each
evaluation's output is gathered on every rank, so all ranks take the same Euler step and stay
in step without further messages. With --check, rank 0 then samples the stage alone and prints
the largest difference of the final latents.

Two machines with 2 GPUs each (run on both; the first machine's address is 10.0.0.1, port
29500 open between them; NCCL needs the same torch and CUDA on both):
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr 10.0.0.1 --master-port 29500 \\
        scripts/band_parallel_stage.py --layout sdxl --px 4096 --steps 3 --denoise 0.3
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 2 --master-addr 10.0.0.1 --master-port 29500 \\
        scripts/band_parallel_stage.py --layout sdxl --px 4096 --steps 3 --denoise 0.3
One machine, every GPU:  torchrun --standalone --nproc-per-node gpu scripts/band_parallel_stage.py --check
CPU only (gloo), a quick local check:
    torchrun --standalone --nproc-per-node 2 scripts/band_parallel_stage.py --device cpu --channels 32 --px 256 --check
Ranks are ordered by node, then local rank: rank 0 (node 0) owns the top band.
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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=("sd15", "sd21", "sdxl"), default="sd15")
    ap.add_argument("--px", type=int, default=1024, help="image side in pixels (latent = px / 8; a multiple of 64)")
    ap.add_argument("--channels", type=int, default=None, help="model_channels (default: the full model, 320)")
    ap.add_argument("--steps", type=int, default=3, help="Euler steps of the stage")
    ap.add_argument("--denoise", type=float, default=0.4, help="the stage's strength (as KSampler's denoise)")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may take")
    ap.add_argument("--check", action="store_true", help="rank 0 also samples the stage alone and compares")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    import comfy_env

    comfy_env.setup(cpu=a.device == "cpu")
    import comfy.samplers
    import helpers
    import torch
    import torch.distributed as dist

    import linfusion
    import linfusion.parallel as par

    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if a.device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=a.timeout))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        model = helpers.base_model(a.layout, a.channels)
        helpers.fill_random(model, seed=0)
        unet = model.diffusion_model
        mods = helpers.lf_modules(linfusion, a.layout, unet)
        weights = linfusion.LinFusionWeights(mods, helpers.random_state(linfusion, mods, dtype=torch.float32))
        plan = linfusion.plan_replacements(weights, unet)
        for path, layer in linfusion.build_replacements(weights, plan, {}).items():
            unet.set_submodule(path, layer)
        model = model.to(dev, dtype).eval().requires_grad_(False)
        lat = a.px // 8
        bands = par.split_rows(lat, world)  # refuses a latent that does not split before any work
        g = torch.Generator().manual_seed(a.seed)
        start = torch.randn(1, 4, lat, lat, generator=g)  # "the previous stage, upscaled"
        noise = torch.randn(1, 4, lat, lat, generator=g)
        ctx = torch.randn(2, 77, helpers.CONTEXT[a.layout], generator=g).to(dev, dtype)  # cond, uncond
        kw = {"y": torch.randn(2, 2816, generator=g).to(dev, dtype)} if a.layout == "sdxl" else {}
        ms = model.model_sampling
        full = int(a.steps / a.denoise)
        sigmas = comfy.samplers.calculate_sigmas(ms, "normal", full)[-(a.steps + 1):].to(dev)

        def denoise(x, sigma, forward):
            """CFG-combined x0 prediction of the whole latent; forward(fn, x2) runs the UNet call."""
            x2 = torch.cat([x, x]).to(dtype)
            out = forward(lambda xb: model.apply_model(xb, sigma.expand(2), c_crossattn=ctx, **kw), x2).float()
            cond, uncond = out.chunk(2)
            return uncond + a.cfg * (cond - uncond)

        def stage(forward):
            x = ms.noise_scaling(sigmas[0], noise.to(dev), start.to(dev))
            for i in range(a.steps):
                d = (x - denoise(x, sigmas[i], forward)) / sigmas[i]
                x = x + d * (sigmas[i + 1] - sigmas[i])
            return x

        if rank == 0:
            print(f"{a.layout} {a.px} px (latent {lat}), {world} ranks on {dist.get_backend()}, bands {bands.edges}, "
                  f"{a.steps} Euler steps from sigma {float(sigmas[0]):.3f}", flush=True)
        with par.band_parallel(unet, timeout_s=a.timeout) as bp, torch.no_grad():
            t0 = time.perf_counter()
            banded = stage(bp.forward)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - t0
        sent = {k: f"{v / 2**20:.2f} MiB" for k, v in sorted(bp.bytes_sent.items())}
        print(f"rank {rank}: rows {bands.edges[rank]}-{bands.edges[rank + 1]}, stage {took:.2f} s "
              f"({took / a.steps:.2f} s per step), sent {sent}", flush=True)
        dist.barrier()
        if a.check and rank == 0:
            with torch.no_grad():
                t0 = time.perf_counter()
                single = stage(lambda fn, x: fn(x))
                took1 = time.perf_counter() - t0
            err = (banded - single).abs().max().item()
            print(f"single process: stage {took1:.2f} s; max abs difference of the final latents: {err:.3e} "
                  f"(|latent| up to {single.abs().max().item():.2f}, {dtype})", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
