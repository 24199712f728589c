"""GPU validation for a maintainer with an NVIDIA GPU: one command, under 9 minutes, one table.

    .dev/venv/bin/python scripts/gpu_check.py            # or: bash scripts/gpu_check.sh
    COMFYUI_PATH=/path/to/ComfyUI .dev/venv/bin/python scripts/gpu_check.py   # a newer ComfyUI

What it runs (each part in its own process, with a time limit; a part that fails or runs out of
time is a row of the table, never the end of the run):
1. the pack's tests marked `cuda` (pytest -m cuda, ComfyUI in GPU mode);
2. the fp16 benchmarks at 1024, 2048 and 4096 px: one SD1.5 first-level self-attention layer,
   LinFusion against ComfyUI's attention backends (bench/layer.py), and one whole SD1.5 UNet
   step, plain against LinFusion (bench/step.py);
3. hybrid mode with a LoRA added after Apply LinFusion, on a small SD1.5-layout model loaded on
   the GPU by ComfyUI, with Dynamic VRAM on and off where the ComfyUI has it (ModelPatcherDynamic,
   ComfyUI 0.38+): the softmax path's output against the attention written out with the LoRA'd
   weights (max abs), and the model's weights bit-identical after unloading;
4. where the ComfyUI has Dynamic VRAM (0.38+), set up exactly as its main.py does it
   (`dynamic_vram_preinit`, `enable_dynamic_vram`): the loader sequences of tests/test_dynamic.py
   with the real ModelPatcherDynamic on the GPU (LinFusion run, plain run, LoRA added and removed,
   full unload, the non-dynamic delegate of hooked conditioning, a multi-GPU deep clone): every
   plain output bit-identical to a model that never saw LinFusion, every LinFusion output to a
   fresh Apply LinFusion, the plain weights bit-identical after unloading;
5. a 4096 px high-res stage of a full-size SDXL-layout UNet (random fp16 weights, LinFusion-XL
   layout): two steps of ComfyUI sampling at a 512 x 512 latent, time and peak memory.

Without CUDA it says so and exits with status 2, running nothing. Paste the table into
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
BUDGET_S = 9 * 60
# part -> its time limit (s); together well under the budget, with start-up costs
LIMITS = {"tests": 70, "layer": 110, "step": 100, "hybrid": 40, "dynamic": 60, "sdxl": 100}
NO_CUDA = ("gpu_check: needs an NVIDIA GPU with CUDA, and this Python's torch sees none "
           "(torch.cuda.is_available() is False): nothing was run")


def cuda_problem() -> str | None:
    """None when CUDA is usable, else why not."""
    try:
        import torch
    except ImportError as e:
        return f"gpu_check: torch does not import ({e}): run scripts/dev_setup.sh and use .dev/venv/bin/python"
    return None if torch.cuda.is_available() else NO_CUDA


def table(rows: list[dict]) -> str:
    """rows of {part, case, result, numbers} -> one aligned text table (markdown)."""
    cols = ["part", "case", "result", "numbers"]
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = lambda vals: "| " + " | ".join(str(v).ljust(width[c]) for c, v in zip(cols, vals)) + " |"  # noqa: E731
    return "\n".join([line(cols), line(["-" * width[c] for c in cols]),
                      *(line([r.get(c, "") for c in cols]) for r in rows)])


def run(cmd: list[str], limit: float, env: dict | None = None) -> tuple[int | None, str, float]:
    """(exit code or None when stopped at `limit`, output, seconds)."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=str(REPO),
                           env={**os.environ, **(env or {})})
        return p.returncode, p.stdout + p.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out, time.monotonic() - t0


def child_json(out: str) -> dict | None:
    """The last line of a child's output that is a JSON object."""
    for ln in reversed(out.splitlines()):
        if ln.startswith("{"):
            try:
                return json.loads(ln)
            except ValueError:
                pass
    return None


def fail_row(part: str, case: str, code, out: str, seconds: float) -> dict:
    why = f"stopped after {seconds:.0f} s" if code is None else f"exit {code}"
    tail = " / ".join(out.strip().splitlines()[-2:])[-160:]
    return {"part": part, "case": case, "result": "FAIL", "numbers": f"{why}: {tail}"}


# -- the parts ------------------------------------------------------------------------------------
def part_tests() -> list[dict]:
    code, out, s = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:randomly"],
                       LIMITS["tests"], env={"LINFUSION_TEST_GPU": "1"})
    summary = next((ln for ln in reversed(out.splitlines()) if " passed" in ln or " failed" in ln
                    or " skipped" in ln or "no tests ran" in ln), "")
    ok = code == 0 and "skipped" not in summary
    return [{"part": "tests -m cuda", "case": "pytest", "result": "ok" if ok else "FAIL",
             "numbers": f"{summary.strip('= ')} ({s:.0f} s)" if code is not None else f"stopped after {s:.0f} s"}]


def part_layer() -> list[dict]:
    cmd = [sys.executable, "bench/layer.py", "--device", "cuda", "--px", "1024", "2048", "4096",
           "--shapes", "320", "--timeout", "30"]
    code, out, s = run(cmd, LIMITS["layer"])
    data = json.loads((REPO / "bench/out/layer.json").read_text()) if code == 0 else None
    if data is None:
        return [fail_row("layer fp16", "SD1.5 d=320", code, out, s)]
    rows = []
    for r in data["rows"]:
        lin = r["linfusion"]
        others = [f"{b} x{r[b]['seconds'] / lin['seconds']:.1f}" for b in r
                  if isinstance(r[b], dict) and "seconds" in r[b] and b != "linfusion"]
        nums = f"LinFusion {lin['seconds'] * 1e3:.1f} ms, {lin['peak_bytes'] / 2**20:.0f} MiB; speed-up vs "
        rows.append({"part": "layer fp16", "case": f"SD1.5 d=320 {r['px']} px ({r['tokens']} tokens)",
                     "result": "ok", "numbers": nums + ", ".join(others)})
    return rows


def part_step() -> list[dict]:
    cmd = [sys.executable, "bench/step.py", "--device", "cuda", "--px", "1024", "2048", "4096",
           "--plain-px", "1024", "2048", "--timeout", "40", "--once-from", "4096"]
    code, out, s = run(cmd, LIMITS["step"])
    path = REPO / "bench/out/step.json"
    if code != 0 or not path.is_file():
        return [fail_row("UNet step fp16", "SD1.5 batch 2", code, out, s)]
    res = json.loads(path.read_text())["results"]  # mode -> px (a string in JSON) -> numbers
    rows = []
    for px in sorted(res["linfusion"], key=int):
        lin, plain = res["linfusion"][px], res["plain"].get(px, {})
        nums = (f"LinFusion {lin['seconds']:.3f} s, {lin['peak_bytes'] / 2**30:.2f} GiB" if "seconds" in lin
                else str(lin))
        if "seconds" in plain and "seconds" in lin:
            nums += f"; plain {plain['seconds']:.3f} s: speed-up x{plain['seconds'] / lin['seconds']:.2f}"
        ok = "seconds" in lin
        rows.append({"part": "UNet step fp16", "case": f"SD1.5 batch 2, {px} px", "result": "ok" if ok else "FAIL",
                     "numbers": nums})
    return rows or [fail_row("UNet step fp16", "SD1.5 batch 2", code, out, s)]


def dynamic_vram_settings() -> list[str]:
    """'on' and 'off' where the ComfyUI has Dynamic VRAM, else just 'n/a'."""
    import comfy_env

    text = (comfy_env.comfyui_path() / "comfy" / "cli_args.py").read_text(errors="replace")
    return ["on", "off"] if "--disable-dynamic-vram" in text else ["n/a"]


def part_hybrid() -> list[dict]:
    rows = []
    for setting in dynamic_vram_settings():
        code, out, s = run([sys.executable, __file__, "--child", "hybrid", setting], LIMITS["hybrid"])
        res = child_json(out)
        if code != 0 or res is None:
            rows.append(fail_row("hybrid + LoRA", f"dynamic VRAM {setting}", code, out, s))
            continue
        ok = res["max_abs"] < 1e-3 and res["restored"] and (setting != "on" or res["dynamic"])
        rows.append({"part": "hybrid + LoRA", "case": f"dynamic VRAM {setting} ({res['patcher']})",
                     "result": "ok" if ok else "FAIL",
                     "numbers": f"softmax path vs LoRA'd reference max abs {res['max_abs']:.2e} (fp32 model); "
                                f"restore bit-identical: {res['restored']}"})
    return rows


def part_dynamic() -> list[dict]:
    if dynamic_vram_settings() == ["n/a"]:
        return [{"part": "dynamic VRAM loaders", "case": "-", "result": "ok",
                 "numbers": "this ComfyUI has no Dynamic VRAM (before 0.38): nothing to check"}]
    code, out, s = run([sys.executable, __file__, "--child", "dynamic", "on"], LIMITS["dynamic"])
    res = child_json(out)
    if code != 0 or res is None:
        return [fail_row("dynamic VRAM loaders", "main.py set-up", code, out, s)]
    if res.get("skipped"):
        return [{"part": "dynamic VRAM loaders", "case": "main.py set-up", "result": "FAIL",
                 "numbers": f"Dynamic VRAM not enabled: {res['skipped']}"}]
    bad = [f"{name} (max abs {err:.1e})" for name, err in res["checks"] if err != 0]
    return [{"part": "dynamic VRAM loaders", "case": f"{res['patcher']}, aimdo_enabled {res['aimdo_enabled']}",
             "result": "ok" if not bad and res["restored"] else "FAIL",
             "numbers": f"{len(res['checks']) - len(bad)}/{len(res['checks'])} outputs bit-identical; plain weights "
                        f"restored: {res['restored']}" + (f"; differ: {', '.join(bad)}" if bad else "")}]


def part_sdxl() -> list[dict]:
    code, out, s = run([sys.executable, __file__, "--child", "sdxl", "-"], LIMITS["sdxl"])
    res = child_json(out)
    if code != 0 or res is None:
        return [fail_row("high-res stage", "SDXL layout 4096 px", code, out, s)]
    return [{"part": "high-res stage", "case": "SDXL layout, 4096 px (latent 512x512), 2 steps, cfg batch 2",
             "result": "ok" if res["finite"] else "FAIL",
             "numbers": f"{res['seconds_per_step']:.2f} s/step, peak {res['peak_gib']:.1f} GiB, "
                        f"model built in {res['build_s']:.0f} s"}]


# -- children (one fresh process each, ComfyUI in GPU mode) ----------------------------------------
def dynamic_vram_preinit() -> str | None:
    """What ComfyUI 0.38's main.py does before torch is imported when `enables_dynamic_vram()`:
    `comfy_aimdo.control.init(simple_vram_headroom=<--reserve-vram in bytes or None>,
    nvml_pressure=not --disable-nvml-pressure)`, falling back to the older comfy-aimdo protocols.
    Returns why Dynamic VRAM stays off, or None."""
    import comfy_env

    path = str(comfy_env.comfyui_path())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    args = comfy.cli_args.args
    if not hasattr(comfy.cli_args, "enables_dynamic_vram"):
        return "this ComfyUI has no Dynamic VRAM"
    if not comfy.cli_args.enables_dynamic_vram():
        return "this ComfyUI's arguments turn Dynamic VRAM off"
    import comfy_aimdo.control

    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
    try:
        comfy_aimdo.control.init(simple_vram_headroom=headroom,
                                 nvml_pressure=not getattr(args, "disable_nvml_pressure", False))
    except TypeError:
        try:
            comfy_aimdo.control.init(simple_vram_headroom=headroom)
        except TypeError:
            comfy_aimdo.control.init()
    return None


def enable_dynamic_vram() -> str | None:
    """What 0.38's main.py does once comfy.model_management is imported: on a supported GPU
    (NVIDIA here) with torch >= 2.8, `comfy_aimdo.control.init_devices` with --vram-headroom per
    device, then `comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic` (the class core
    loaders build) and `comfy.memory_management.aimdo_enabled = True`. Returns why not, or None."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy_aimdo.control
    from comfy.cli_args import args

    if not mm.is_nvidia():
        return "not an NVIDIA GPU"
    if mm.torch_version_numeric < (2, 8):
        return f"torch {mm.torch_version} < 2.8"
    devices = mm.get_all_torch_devices()
    try:
        ok = comfy_aimdo.control.init_devices((d.index, int(getattr(args, "vram_headroom", 0) * 1024 ** 3))
                                              for d in devices)
    except TypeError:
        ok = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not ok:
        return "comfy-aimdo did not initialise (comfy_aimdo.control.init_devices returned False)"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return None


def _comfy(dynamic: str):
    import comfy_env

    comfy_env.setup(cpu=False)
    import comfy.cli_args

    if dynamic == "off" and hasattr(comfy.cli_args.args, "disable_dynamic_vram"):
        comfy.cli_args.args.disable_dynamic_vram = True
    sys.path.insert(0, str(REPO / "tests"))
    import asyncio

    import nodes

    if not asyncio.run(nodes.load_custom_node(str(REPO))):
        raise RuntimeError("ComfyUI failed to load the pack")
    return sys.modules[str(REPO)], nodes.NODE_CLASS_MAPPINGS


def _weights_folder(pack, model, kind: str, tmp: Path) -> None:
    """Random official-format LinFusion weights for `model` in a linfusion folder 'auto' finds."""
    import folder_paths
    import helpers

    lf = pack.linfusion
    mods = helpers.lf_modules(lf, kind, model.get_model_object("diffusion_model"))
    fam = lf.FAMILIES[helpers.LF_FAMILY[kind]]
    helpers.write_official(tmp / fam.folder_name, lf, mods, helpers.random_state(lf, mods))
    folder_paths.folder_names_and_paths["linfusion"] = ([str(tmp)], folder_paths.folder_names_and_paths["linfusion"][1])


def child_hybrid(dynamic: str, pre: str | None = None) -> dict:
    pack, node_classes = _comfy(dynamic)
    import comfy.model_management
    import comfy.model_patcher
    import helpers
    import hybrid_cases as hc
    import torch

    if dynamic == "on" and pre is None:
        pre = enable_dynamic_vram()
    dev = comfy.model_management.get_torch_device()
    base = helpers.small_model("sd15")
    # the class core loaders build: ModelPatcherDynamic once main.py's set-up enabled it
    model = comfy.model_patcher.CoreModelPatcher(base.model, load_device=dev, offload_device=torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        _weights_folder(pack, model, "sd15", Path(tmp))
        pristine = hc.pristine_attn_weights(model)
        lora = hc.lora_for(model)
        loraed = hc.with_lora(pristine, lora)
        hybrid = helpers.apply(node_classes, model, "auto", 4096).clone()
        hybrid.add_patches(lora, 1.0)

        def probe():
            layer = hybrid.model.diffusion_model.get_submodule(hc.PATH)
            x = torch.randn(2, 256, layer.dim, generator=torch.Generator().manual_seed(5))
            ref = hc.reference_attention(x.double(), {k: v.double() for k, v in loraed.items()},
                                         layer.softmax_attn.heads)
            p = next(layer.softmax_attn.parameters())
            with torch.no_grad():
                out = layer(x.to(p.device, p.dtype)).double().cpu()
            return (out - ref).abs().max().item()

        err = hc.during_sampling(hybrid, probe)
        dynamic_used = bool(getattr(hybrid, "is_dynamic", lambda: False)())
        comfy.model_management.unload_all_models()
        after = hc.pristine_attn_weights(model)
        restored = all(torch.equal(after[t], pristine[t]) for t in hc.TENSORS)
    return {"max_abs": err, "restored": restored, "dynamic": dynamic_used, "patcher": type(hybrid).__name__,
            "not_dynamic_because": pre}


def child_dynamic(pre: str | None) -> dict:
    """tests/test_dynamic.py's sequences on the real ModelPatcherDynamic, on the GPU."""
    pack, node_classes = _comfy("on")
    if pre is None:
        pre = enable_dynamic_vram()
    if pre is not None:
        return {"skipped": pre}
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    import helpers
    import test_dynamic as td
    import torch

    dev = comfy.model_management.get_torch_device()

    def loader(seed: int = 0, disable_dynamic: bool = False):
        """A small SD1.5-layout model as a core loader returns it (CoreModelPatcher, the factory
        in cached_patcher_init for the delegate and the deep clone)."""
        model = helpers.base_model("sd15", helpers.LAYOUTS["sd15"][2])
        helpers.fill_random(model, seed)
        cls = comfy.model_patcher.ModelPatcher if disable_dynamic else comfy.model_patcher.CoreModelPatcher
        p = cls(model, load_device=dev, offload_device=torch.device("cpu"))
        p.cached_patcher_init = (loader, (seed,))
        return p

    def fresh(kind: str, lora_on: bool = False, dynamic: bool = True) -> torch.Tensor:
        m = loader(disable_dynamic=not dynamic)
        m = helpers.apply(node_classes, m, "auto") if kind == "lf" else m
        out = td.sample(td.with_lora(m, td.lora(m)) if lora_on else m)
        comfy.model_management.unload_all_models()
        return out

    with tempfile.TemporaryDirectory() as tmp:
        _weights_folder(pack, loader(), "sd15", Path(tmp))
        refs = {(k, lo): fresh(k, lo) for k in ("plain", "lf") for lo in (False, True)}
        classic = fresh("lf", True, dynamic=False)
        base = loader()
        pristine = td.unet_state(base)
        patched = helpers.apply(node_classes, base, "auto")
        lf_lora = td.with_lora(patched, td.lora(base))
        checks = []

        def check(name, model, ref):
            checks.append((name, (td.sample(model) - ref).abs().max().item()))

        for name, model, key in [("LinFusion", patched, ("lf", False)),
                                 ("plain after LinFusion", base, ("plain", False)),
                                 ("LinFusion + LoRA", lf_lora, ("lf", True)),
                                 ("plain + LoRA", td.with_lora(base, td.lora(base)), ("plain", True)),
                                 ("LinFusion, LoRA removed", patched, ("lf", False))]:
            check(name, model, refs[key])
        comfy.model_management.unload_all_models()
        restored = all(torch.equal(pristine[k], v) for k, v in td.unet_state(base).items())
        check("plain after unload", base, refs[("plain", False)])
        check("hooked-conds delegate (LinFusion + LoRA)", lf_lora.get_non_dynamic_delegate(), classic)
        check("LinFusion + LoRA after the delegate", lf_lora, refs[("lf", True)])
        check("multi-GPU deep clone (LinFusion + LoRA)", lf_lora.deepclone_multigpu(), refs[("lf", True)])
        check("plain at the end", base, refs[("plain", False)])
        comfy.model_management.unload_all_models()
    return {"checks": checks, "restored": restored, "patcher": type(patched).__name__,
            "aimdo_enabled": bool(comfy.memory_management.aimdo_enabled)}


def child_sdxl() -> dict:
    pack, node_classes = _comfy("default")
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import helpers
    import torch

    t0 = time.monotonic()
    dev = comfy.model_management.get_torch_device()
    # full-size SDXL layout in fp16, built on the GPU and filled there (seconds, not minutes)
    cls, cfg, _, model_type = helpers.LAYOUTS["sdxl"]
    config = cls({**cfg, "model_channels": 320, "dtype": torch.float16})
    config.set_inference_dtype(torch.float16, None)
    base_model = comfy.model_base.SDXL(config, model_type=model_type, device=dev)
    with torch.no_grad():
        for name, p in base_model.named_parameters():
            if p.ndim <= 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, p[0].numel() ** -0.5)
    model = comfy.model_patcher.ModelPatcher(base_model, load_device=dev, offload_device=torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        _weights_folder(pack, model, "sdxl", Path(tmp))
        patched = node_classes["ApplyLinFusion"].execute(model, "auto", 0)
        patched = patched.result[0] if hasattr(patched, "result") else patched[0]
    build_s = time.monotonic() - t0
    latent = torch.zeros(1, 4, 512, 512)
    noise = comfy.sample.prepare_noise(latent, 1)
    pos, neg = helpers.conds("sdxl", width=4096, height=4096)
    torch.cuda.reset_peak_memory_stats()
    times = []

    def cb(step, *_):
        times.append(time.monotonic())

    t1 = time.monotonic()
    # a high-res stage: img2img from a latent at strength ~0.3 (the last 2 of 6 steps)
    out = comfy.sample.sample(patched, noise, 6, 5.0, "euler", "normal", pos, neg, latent, start_step=4,
                              last_step=6, force_full_denoise=True, seed=1, callback=cb, disable_pbar=True)
    per_step = (times[-1] - t1) / max(1, len(times))
    return {"seconds_per_step": per_step, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "finite": bool(torch.isfinite(out).all()), "build_s": build_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(LIMITS), help="run only these parts")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    pre = None
    if a.child and a.child[1] == "on":  # main.py initialises comfy-aimdo before torch is imported
        pre = dynamic_vram_preinit()
    problem = cuda_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if a.child:
        what, setting = a.child
        children = {"hybrid": lambda: child_hybrid(setting, pre), "dynamic": lambda: child_dynamic(pre),
                    "sdxl": child_sdxl}
        print(json.dumps(children[what]()), flush=True)
        return 0
    import torch

    parts = {"tests": part_tests, "layer": part_layer, "step": part_step, "hybrid": part_hybrid,
             "dynamic": part_dynamic, "sdxl": part_sdxl}
    t0 = time.monotonic()
    rows = []
    for name in a.only or list(parts):
        print(f"[gpu_check] {name} (limit {LIMITS[name]} s) ...", flush=True)
        try:
            rows += parts[name]()
        except Exception as e:  # a broken part is a row, the others still run
            rows.append({"part": name, "case": "-", "result": "FAIL", "numbers": f"{type(e).__name__}: {e}"})
    total = time.monotonic() - t0
    print(f"\nGPU check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"ComfyUI {_comfy_version()}, {total:.0f} s (budget {BUDGET_S} s)\n")
    print(table(rows))
    return 0 if all(r["result"] == "ok" for r in rows) else 1


def _comfy_version() -> str:
    import comfy_env

    f = comfy_env.comfyui_path() / "comfyui_version.py"
    try:
        return f.read_text().split("=")[-1].strip().strip("\"'")
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
