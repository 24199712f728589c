"""One LinFusion distillation step on the full SD1.5 layout (random weights), batch 1.

    .dev/venv/bin/python bench/distill_step.py [--px 512] [--cases fp32 fp32-checkpointing]
                                               [--device cpu] [--timeout 1800]

A step is what `linfusion.distill.Distiller.train_step` does: the teacher UNet forward (the
model's own attention), the student forward (LinFusion in all 16 attn1), backward into the
LinFusion layers only, one AdamW update of their 99.2 M parameters. Each case runs in a fresh
process: it builds ComfyUI's SD1.5 UNet with random weights and a Distiller, runs one warm-up
step (which also creates AdamW's state), then measures a second step. Reported per case:

  step         wall time of the measured step
  first step   wall time of the warm-up step
  step peak    resident-memory high-water mark during the step, above the resident size before it
               (freed heap memory is handed back first, with malloc_trim)
  total peak   the process's resident high-water mark: everything a run holds (UNet, LinFusion
               layers, gradients, optimizer state, activations)

Writes bench/out/distill_step.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from bench.memory import status_kib, trim_heap  # noqa: E402

CASES = {
    "fp32": {"precision": "fp32", "gradient_checkpointing": False},
    "fp32-checkpointing": {"precision": "fp32", "gradient_checkpointing": True},
    "bf16": {"precision": "bf16", "gradient_checkpointing": False},
    "bf16-checkpointing": {"precision": "bf16", "gradient_checkpointing": True},
}


def run_case(case: str, px: int, device: str) -> dict:
    import comfy_env

    comfy_env.setup(cpu=device == "cpu")
    import helpers  # tests/helpers.py: ComfyUI's SD1.5 UNet with the exact layout
    import torch

    from linfusion.distill import DistillConfig, Distiller

    dev = torch.device(device)
    model = helpers.base_model("sd15")
    helpers.fill_random(model, seed=0)
    unet = model.diffusion_model.to(dev)

    def forward(m, x, t, cond):
        return m(x, t, context=cond["context"], transformer_options={})

    d = Distiller(unet, DistillConfig(**CASES[case]), forward=forward, device=dev)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, px // 8, px // 8, generator=g)
    cond = {"context": torch.randn(1, 77, 768, generator=g)}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    d.train_step(lat, cond)
    sync()
    first = time.perf_counter() - t0
    out = {"case": case, "px": px, "device": device, "threads": torch.get_num_threads(), "first_step_s": first}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        hwm_so_far = status_kib("VmHWM")
        trim_heap()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark
        base = status_kib("VmRSS")
    t0 = time.perf_counter()
    terms = d.train_step(lat, cond)
    sync()
    out["step_s"] = time.perf_counter() - t0
    if dev.type == "cuda":
        out["step_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        out["total_peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["step_peak_bytes"] = (status_kib("VmHWM") - base) * 1024
        out["total_peak_bytes"] = max(hwm_so_far, status_kib("VmHWM")) * 1024
        out["resident_before_step_bytes"] = base * 1024
    out["loss"] = terms["total"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--cases", nargs="+", default=["fp32", "fp32-checkpointing"], choices=sorted(CASES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case, a.px, a.device)))
        return
    from bench.memory import fmt_bytes, run_child

    results = []
    for case in a.cases:
        r = run_child([sys.executable, __file__, "--case", case, "--px", str(a.px), "--device", a.device], a.timeout)
        r.setdefault("case", case)
        results.append(r)
        if "step_s" in r:
            print(f"{case:20s} {a.px} px batch 1 on {a.device} ({r['threads']} threads): step {r['step_s']:.1f} s "
                  f"(first {r['first_step_s']:.1f} s), step peak {fmt_bytes(r['step_peak_bytes'])}, "
                  f"total peak {fmt_bytes(r['total_peak_bytes'])}", flush=True)
        else:
            print(f"{case:20s} {r}", flush=True)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "distill_step.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
