"""Band parallelism (linfusion/parallel/): bytes each rank sends per UNet step, and CPU wall time.

    .dev/venv/bin/python bench/parallel.py bytes [--px 4096 16384] [--world 2 4 8]
    .dev/venv/bin/python bench/parallel.py time [--px 2048] [--channels 64] [--repeat 3]

bytes: the full-size SD1.5 and SDXL layouts run one forward on the meta device (shapes only,
no memory) with hooks recording every 3x3 conv, GroupNorm and self-attention call; the byte
counts then come from the same geometry functions the runtime uses (split_rows, conv_plan).
Per rank and step (batch 2: cond + uncond; activations fp16 as on a GPU): LinFusion summary
all-reduce payloads (fp32 B x H x dh x (dh+1) + a count per layer), conv halo rows sent to the
neighbours, GroupNorm statistics (fp64 sums and sums of squares per group), against the bytes of
the rank's band of every conv input (what re-sending the bands would cost) and of gathering
every self-attention layer's tokens (what softmax attention would need). An all-reduce moves
about 2 (w-1)/w times its payload per rank (ring); the table gives payloads. The transfer-time
projection assumes NVLink 4 (H100 SXM, ~450 GB/s per direction, ~10 us per collective) and
PCIe 4 x16 (~25 GB/s achieved, ~20 us per collective).

time: (wall and CPU seconds; on a shared machine the CPU time of the busiest rank is the
steadier number) one UNet forward of the SD1.5 layout with LinFusion applied (random weights, fp32, batch 2,
channels shrunk by --channels from 320 so a step takes seconds), 1 process x 1 thread vs 2
processes x 1 thread (gloo), in the same run; the ratio is what the band split buys on CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE.parent / "scripts", HERE.parent / "tests", HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

NVLINK = (450e9, 10e-6)  # bytes/s per direction, latency per message
PCIE = (25e9, 20e-6)


def record_layers(kind: str, px: int) -> dict:
    """Shapes of every conv / GroupNorm / self-attention call of one forward at px x px (meta)."""
    import comfy_env

    comfy_env.setup(cpu=True)
    import helpers
    import torch
    from torch import nn

    model = helpers.base_model(kind, meta=True)
    unet = model.diffusion_model
    calls = {"conv": [], "norm": [], "attn1": []}
    for name, m in unet.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda m, a: calls["conv"].append((m, tuple(a[0].shape))))
        elif isinstance(m, nn.GroupNorm):
            m.register_forward_pre_hook(lambda m, a: calls["norm"].append((m.num_groups, tuple(a[0].shape))))
        elif hasattr(m, "to_q"):
            self_attn = name.endswith("attn1")

            def shape_only(x, *a, _self=self_attn, _m=m, **k):
                if _self:
                    calls["attn1"].append((_m.heads, tuple(x.shape)))
                return x  # attention keeps the shape; on meta only shapes matter
            m.forward = shape_only
    lat = px // 8
    x = torch.zeros(2, 4, lat, lat, device="meta")
    kw = {"y": torch.zeros(2, 2816, device="meta")} if kind == "sdxl" else {}
    ctx = torch.zeros(2, 77, helpers.CONTEXT[kind], device="meta")
    with torch.no_grad():
        unet(x, torch.zeros(2, device="meta"), ctx, **kw)
    return calls


def count_bytes(calls: dict, lat: int, world: int, act_bytes: int = 2) -> dict:
    """Bytes the busiest rank sends in one forward, by kind (see the module docstring)."""
    import linfusion.parallel as par

    levels = {lat: par.split_rows(lat, world)}
    out = dict.fromkeys(("summary", "halo", "groupnorm", "band_conv_inputs", "softmax_gather"), 0)
    halo_by_rank = [0] * world
    for m, (b, c, h, w) in calls["conv"]:
        k, s, p, d, _ = par.conv_geometry(m)
        bands = levels[h]
        busiest = max(range(world), key=bands.rows)
        out["band_conv_inputs"] += b * c * bands.rows(busiest) * w * act_bytes
        if k == 1 and s == 1 and p == 0:
            continue
        plan = par.conv_plan(bands, k, s, p, d)
        levels.setdefault(plan.out.height, plan.out)
        for r in range(world):
            rows = (plan.halos[r + 1].top_rows if r + 1 < world else 0) + (plan.halos[r - 1].bottom_rows if r else 0)
            halo_by_rank[r] += b * c * rows * w * act_bytes
    out["halo"] = max(halo_by_rank)
    for g, (b, *_rest) in calls["norm"]:
        out["groupnorm"] += (2 * b * g + 1) * 8
    for heads, (b, n, c) in calls["attn1"]:
        dh = c // heads
        out["summary"] += (b * heads * dh * (dh + 1) + 1) * 4
        out["softmax_gather"] += b * math.ceil(n / world) * c * act_bytes
    out["collectives"] = len(calls["norm"]) + len(calls["attn1"])
    out["p2p_convs"] = sum(1 for m, _ in calls["conv"] if par.conv_geometry(m)[0] > 1)
    return out


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def transfer_ms(sent: dict, link: tuple[float, float]) -> float:
    bw, lat = link
    total = sent["summary"] + sent["halo"] + sent["groupnorm"]
    return 1e3 * (total / bw + lat * (sent["collectives"] + sent["p2p_convs"]))


def bytes_table(pxs: list[int], worlds: list[int]) -> None:
    print("| layout | px | ranks | summaries | halos | GroupNorm stats | total sent | band conv inputs | "
          "softmax gather | NVLink ms | PCIe ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in ("sd15", "sdxl"):
        for px in pxs:
            calls = record_layers(kind, px)
            for world in worlds:
                s = count_bytes(calls, px // 8, world)
                total = s["summary"] + s["halo"] + s["groupnorm"]
                print(f"| {kind} | {px} | {world} | {fmt_bytes(s['summary'])} | {fmt_bytes(s['halo'])} | "
                      f"{fmt_bytes(s['groupnorm'])} | {fmt_bytes(total)} | {fmt_bytes(s['band_conv_inputs'])} | "
                      f"{fmt_bytes(s['softmax_gather'])} | {transfer_ms(s, NVLINK):.2f} | {transfer_ms(s, PCIE):.2f} |",
                      flush=True)


def _unet(channels: int):
    import comfy_env

    comfy_env.setup(cpu=True)
    import helpers
    import torch

    import linfusion

    model = helpers.base_model("sd15", channels)
    helpers.fill_random(model, seed=0)
    unet = model.diffusion_model.eval().requires_grad_(False)
    mods = helpers.lf_modules(linfusion, "sd15", unet)
    weights = linfusion.LinFusionWeights(mods, helpers.random_state(linfusion, mods, dtype=torch.float32))
    plan = linfusion.plan_replacements(weights, unet)
    for path, layer in linfusion.build_replacements(weights, plan, {}).items():
        unet.set_submodule(path, layer)
    x = torch.randn(2, 4, 0, 0)
    return unet, x


def _inputs(lat: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, lat, lat, generator=g), torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, 768, generator=g))


def _time_band(rank: int, world: int, channels: int, lat: int, repeat: int) -> dict:
    import torch
    import torch.distributed as dist

    import linfusion.parallel as par

    torch.set_num_threads(1)
    unet, _ = _unet(channels)
    x, t, ctx = _inputs(lat)
    times, cpu = [], []
    with par.band_parallel(unet, timeout_s=1800) as bp, torch.no_grad():
        for _ in range(repeat + 1):  # the first call warms up
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            y = bp.forward(unet, x, t, ctx)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"times": times[1:], "cpu": cpu[1:], "out": y.numpy() if rank == 0 else None,
            "bytes": dict(bp.bytes_sent)}


def time_table(px: int, channels: int, repeat: int) -> None:
    import torch

    import linfusion.parallel as par

    torch.set_num_threads(1)
    lat = px // 8
    unet, _ = _unet(channels)
    x, t, ctx = _inputs(lat)
    single, single_cpu = [], []
    with torch.no_grad():
        for _ in range(repeat + 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            ref = unet(x, t, ctx)
            single.append(time.perf_counter() - start)
            single_cpu.append(time.process_time() - start_cpu)
    del unet
    res = par.launch(_time_band, 2, (channels, lat, repeat), threads=1, timeout_s=1800, join_timeout_s=3600)
    band = [max(r["times"][i] for r in res) for i in range(repeat)]  # a step ends when both ranks are done
    band_cpu = [max(r["cpu"][i] for r in res) for i in range(repeat)]
    err = float((torch.from_numpy(res[0]["out"]) - ref).abs().max())
    best1, best2 = min(single[1:]), min(band)
    print(f"SD1.5 layout, model_channels {channels}, LinFusion, {px} px (latent {lat}x{lat}), batch 2, fp32, CPU")
    cpu1, cpu2 = min(single_cpu[1:]), min(band_cpu)
    print(f"| setup | wall, best of {repeat} (s) | wall, all (s) | CPU s of the busiest process, best |")
    print("|---|---|---|---|")
    print(f"| 1 process x 1 thread | {best1:.2f} | {', '.join(f'{v:.2f}' for v in single[1:])} | {cpu1:.2f} |")
    print(f"| 2 processes x 1 thread (gloo) | {best2:.2f} | {', '.join(f'{v:.2f}' for v in band)} | {cpu2:.2f} |")
    print(f"wall speed-up x{best1 / best2:.2f}; CPU-time speed-up (busiest rank) x{cpu1 / cpu2:.2f}; "
          f"max abs difference of the outputs {err:.2e}; "
          f"rank 0 sent {fmt_bytes(sum(res[0]['bytes'].values()))} ({res[0]['bytes']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("bytes", "time"))
    ap.add_argument("--px", type=int, nargs="+", default=None)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if a.what == "bytes":
        bytes_table(a.px or [4096, 16384], a.world)
    else:
        time_table((a.px or [2048])[0], a.channels, a.repeat)


if __name__ == "__main__":
    main()
