"""Device memory of one UNet evaluation of a high-res stage, without a GPU: a shape-only run on
PyTorch's meta device under a tensor-lifetime tracker.

    .dev/venv/bin/python bench/devmem.py                      # the table: 3 families x 1024..16384 px x normal/low
    .dev/venv/bin/python bench/devmem.py --kinds sdxl --px 16384 --dtype bf16
    .dev/venv/bin/python bench/devmem.py --validate           # tracker vs real CPU runs (fresh processes)

What is counted
* The model is built on the meta device (no memory, any size) with the exact layout of the
  family (tests/helpers.py), every self-attention replaced by LinFusion (random-free: meta
  weights), in the compute dtype (fp16/bf16: 2 bytes, fp32: 4).
* `LiveBytes`, a TorchDispatchMode, sees every tensor an op creates. Tensors are grouped by
  storage (views share one); a storage counts from the op that creates it until the last
  tensor using it dies (weakref finalizers; PyTorch keeps a tensor's Python object alive
  while C++ still holds it, so the finalizer fires when the memory would be freed). The
  peak of the running sum is the activation peak; weights are added separately.
* Skip connections parked by low_memory are allocated through SkipParking's `allocate`
  hook, which marks them as host memory: they leave the device count and enter the host
  count. Bytes moved (device->host->device) come from SkipParking's counter.
* normal: the pack without low_memory: cond and uncond in one batch of 2. low_memory: one
  cond at a time (batch 1), feed-forward in 16 token chunks, banded resnets at the two
  highest levels, skip connections parked in host memory (nodes/lowmem.py, as the sampler
  runs it).
* Cross-attention (77 text tokens) is modelled as a fused kernel (flash / memory-efficient
  SDPA, what ComfyUI uses on NVIDIA GPUs): output and its fp32 log-sum-exp, no score matrix.
* Not counted: CUDA context (~0.3-0.5 GB), cuDNN/cuBLAS workspaces, allocator rounding and
  fragmentation, the sampler's own latents (a few MB), text encoders and VAE (ComfyUI
  offloads them while the UNet runs). Real GPU peaks sit above these numbers by that much.

Validation (--validate): the same step run for real on the CPU at 1024, 2048 and 4096 px,
fp32, with a smaller-channel layout of the same structure (model_channels 64 for SD1.5:
the full layout's 4096 px step takes ~11 minutes here), each in a fresh process; its peak
RSS growth over the call (bench/memory.py) against the tracker's activation peak for the
identical configuration (CPU chunk sizes of the attention core, CPU SDPA, no parking: on a
CPU host and device are one memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import weakref
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("sd15", "sd21", "sdxl")
SIZES = (1024, 2048, 4096, 8192, 16384)
PCIE_BYTES_PER_S = 25e9


def _setup():
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "scripts"))
    import comfy_env

    comfy_env.setup(cpu=True)
    import comfy.cli_args

    # the GPU path of ComfyUI's cross-attention is PyTorch SDPA; on CPU it is the same call
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(REPO))):
        raise SystemExit("ComfyUI could not load the pack")
    return sys.modules[str(REPO)]


class LiveBytes:
    """Live tensor bytes on one device type, grouped by storage; `peak` is the high-water mark.
    Storages marked with `mark_host` count as host memory instead (`host`, `host_peak`)."""

    def __init__(self, device_type: str = "meta"):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._see(out)
                return out

        self.mode = Mode()
        self.device_type = device_type
        self.live = self.peak = self.host = self.host_peak = 0
        self._storages: dict[int, list] = {}  # storage key -> [bytes, live tensors, is host]
        self._seen: set[int] = set()  # ids of live tracked tensors (a finalizer removes each)
        self.where: list[str] = []  # module path now running (watch()), and at the peak:
        self.peak_where = ""

    def _see(self, out) -> None:
        import torch

        if isinstance(out, torch.Tensor):
            self.track(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                self._see(o)

    def track(self, t, host: bool = False) -> None:
        if t.device.type != self.device_type or id(t) in self._seen:
            return
        self._seen.add(id(t))
        st = t.untyped_storage()
        key = st._cdata
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [st.nbytes(), 0, host]
            self._add(entry[0], host)
        entry[1] += 1
        weakref.finalize(t, self._release, key, id(t))

    def mark_host(self, t) -> None:
        """Move t's storage from the device count to the host count."""
        self.track(t)
        entry = self._storages[t.untyped_storage()._cdata]
        if not entry[2]:
            self._add(-entry[0], False)
            entry[2] = True
            self._add(entry[0], True)

    def _add(self, n: int, host: bool) -> None:
        if host:
            self.host += n
            self.host_peak = max(self.host_peak, self.host)
        else:
            self.live += n
            if self.live > self.peak:
                self.peak = self.live
                self.peak_where = self.where[-1] if self.where else ""

    def _release(self, key: int, tid: int) -> None:
        self._seen.discard(tid)
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._storages[key]
            self._add(-entry[0], entry[2])

    def watch(self, root) -> list:
        """Follow which submodule of `root` runs (forward hooks), so `peak_where` names the peak's place."""
        handles = []
        for name, m in root.named_modules():
            handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: self.where.append(n)))
            handles.append(m.register_forward_hook(lambda *_: self.where.pop() and None))
        return handles

    def reset_peak(self) -> None:
        self.peak, self.host_peak = self.live, self.host

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@contextmanager
def fused_cross_attention():
    """SDPA as a fused kernel would allocate: the output (and a fp32 log-sum-exp per query and
    head, which flash/memory-efficient kernels keep), never the query x key score matrix.
    The meta device otherwise takes PyTorch's math path, which materialises the scores."""
    import torch
    import torch.nn.functional as F

    own = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        if q.device.type != "meta":
            return own(q, k, v, *args, **kwargs)
        torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # log-sum-exp, freed at once
        return torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = own


def build_unet(pack, kind: str, channels: int | None, dtype, meta: bool):
    """The family's UNet (full layout, or `channels` wide) with LinFusion in every attn1, in `dtype`.
    On meta it has shapes only; otherwise random weights (as bench/step.py)."""
    import helpers
    import torch

    lf = pack.linfusion
    model = helpers.base_model(kind, channels, meta=meta)
    unet = model.diffusion_model
    if not meta:
        helpers.fill_random(unet, 0)
    for spec in helpers.lf_modules(lf, kind, unet):
        path = lf.diffusers_to_ldm(spec.name)
        ops = lf.patching.operations_like(unet, path)
        with torch.device("meta" if meta else "cpu"):
            layer = lf.LinFusionAttention(spec.dim, spec.heads, spec.mid_dim, operations=ops, dtype=dtype)
        if not meta:
            helpers.fill_random(layer, 1)
        parent, name = path.rsplit(".", 1)
        setattr(unet.get_submodule(parent), name, layer.eval().requires_grad_(False))
    return unet.to(dtype).eval().requires_grad_(False)


def step_inputs(kind: str, batch: int, w_px: int, h_px: int, dtype, device):
    import helpers
    import torch

    x = torch.zeros(batch, 4, h_px // 8, w_px // 8, dtype=dtype, device=device)
    t = torch.full((batch,), 500.0, device=device)
    ctx = torch.zeros(batch, 77, helpers.CONTEXT[kind], dtype=dtype, device=device)
    y = torch.zeros(batch, 2816, dtype=dtype, device=device) if kind == "sdxl" else None
    return x, t, ctx, y


@contextmanager
def low_memory_context(pack, unet, tracker: LiveBytes | None, park: bool):
    """What HighResStageSampler holds around sampling with low_memory (minus cond splitting, which
    is the batch of 1): FF chunks, banded resnets, skip parking. Yields transformer_options for
    the UNet call and the SkipParking (or None)."""
    import torch

    LM = pack.nodes.lowmem
    model_options: dict = {}
    with ExitStack() as stack:
        park_dev = torch.device("meta") if park else None
        parking = stack.enter_context(LM.low_memory_unet(unet, model_options, LM.LowMemory(), park_device=park_dev))
        if parking is not None and tracker is not None:
            def allocate(shape, dtype, like):
                host = torch.empty(shape, dtype=dtype, device="meta")
                tracker.mark_host(host)
                return host

            parking.allocate = allocate
        yield model_options.get("transformer_options", {}), parking


def tracked_step(pack, kind: str, w_px: int, h_px: int, mode: str, dtype, channels: int | None = None,
                 cpu_like: bool = False) -> dict:
    """One UNet evaluation on meta under the tracker. cpu_like: the CPU's attention-core chunk
    size and no parking (the validation's configuration)."""
    import torch

    core = pack.linfusion.attention
    saved = dict(core.CHUNK_ELEMENTS)
    if cpu_like:
        core.CHUNK_ELEMENTS["meta"] = core.CHUNK_ELEMENTS["cpu"]
    try:
        unet = build_unet(pack, kind, channels, dtype, meta=True)
        weights = sum(p.numel() * p.element_size() for p in unet.parameters())
        low = mode == "low"
        tracker = LiveBytes("meta")
        hooks = tracker.watch(unet)
        with tracker, torch.no_grad(), fused_cross_attention():
            x, t, ctx, y = step_inputs(kind, 1 if low else 2, w_px, h_px, dtype, "meta")
            before = tracker.live
            tracker.reset_peak()
            with ExitStack() as stack:
                opts, parking = ({}, None)
                if low:
                    opts, parking = stack.enter_context(low_memory_context(pack, unet, tracker, park=not cpu_like))
                out = unet(x, t, ctx, y, transformer_options=opts)
                del out
            moved = parking.bytes_moved if parking is not None else 0
        for h in hooks:
            h.remove()
    finally:
        core.CHUNK_ELEMENTS.clear()
        core.CHUNK_ELEMENTS.update(saved)
    import helpers

    mem = pack.linfusion.memory
    shape = (1 if low else 2, 4, h_px // 8, w_px // 8)
    size = torch.tensor([], dtype=dtype).element_size()
    if low:
        full_res_attention = helpers.LAYOUTS[kind][1]["transformer_depth"][0] > 0
        estimate = mem.low_memory_inference_bytes(shape, size, full_res_attention)
    else:
        estimate = mem.inference_bytes(shape, size, helpers.LAYOUTS[kind][0].memory_usage_factor)
    return {"kind": kind, "w": w_px, "h": h_px, "mode": mode, "weights": weights, "inputs": before,
            "estimate": estimate,
            "activation_peak": tracker.peak - before, "device_peak": weights + tracker.peak,
            "host_peak": tracker.host_peak, "bytes_moved": moved, "peak_where": tracker.peak_where}


def real_step(pack, kind: str, px: int, mode: str, channels: int) -> dict:
    """The same step for real on the CPU (fp32): peak RSS growth of the call."""
    import torch

    from bench.memory import measure_once

    torch.manual_seed(0)
    unet = build_unet(pack, kind, channels, torch.float32, meta=False)
    low = mode == "low"
    x, t, ctx, y = step_inputs(kind, 1 if low else 2, px, px, torch.float32, "cpu")
    x.normal_()
    ctx.normal_()
    with torch.no_grad(), ExitStack() as stack:
        opts = {}
        if low:
            opts, _ = stack.enter_context(low_memory_context(pack, unet, None, park=False))
        unet(x[..., :16, :16], t, ctx, y, transformer_options=opts)  # warm-up: lazy inits
        seconds, peak = measure_once(lambda: unet(x, t, ctx, y, transformer_options=opts), torch.device("cpu"))
    return {"seconds": seconds, "rss_growth": peak}


def time_overhead(pack, kind: str, sizes, channels: int, rounds: int = 2) -> list[dict]:
    """CPU wall time of one sampler step (cond + uncond): normal = one batch-2 UNet call; low_memory =
    two batch-1 calls under the low-memory context (no parking: on a CPU host is the device).
    Alternating rounds in one process, best of each; ratio low / normal."""
    import time

    import torch

    torch.manual_seed(0)
    unet = build_unet(pack, kind, channels, torch.float32, meta=False)
    rows = []
    print("| layout | image | normal s | low_memory s | ratio |")
    print("|---|---|---|---|---|")
    for px in sizes:
        x, t, ctx, y = step_inputs(kind, 2, px, px, torch.float32, "cpu")
        x.normal_()
        ctx.normal_()
        best = {"normal": float("inf"), "low": float("inf")}
        with torch.no_grad():
            for _ in range(rounds):
                t0 = time.perf_counter()
                unet(x, t, ctx, y)
                best["normal"] = min(best["normal"], time.perf_counter() - t0)
                with low_memory_context(pack, unet, None, park=False) as (opts, _):
                    t0 = time.perf_counter()
                    for i in range(2):
                        unet(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], None if y is None else y[i:i + 1],
                             transformer_options=opts)
                    best["low"] = min(best["low"], time.perf_counter() - t0)
        ratio = best["low"] / best["normal"]
        rows.append({"px": px, **best, "ratio": ratio})
        print(f"| {kind} ch{channels} | {px} px | {best['normal']:.1f} | {best['low']:.1f} | {ratio:.2f} |",
              flush=True)
    return rows


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def table(pack, kinds, sizes, dtype, extra) -> list[dict]:
    import time

    rows = []
    print("| family | image | mode | weights GiB | activations GiB | device peak GiB | host parked GiB | "
          "moved GiB/eval | PCIe time (25 GB/s) | estimate / activations | tracker s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [(k, s, s) for k in kinds for s in sizes] + list(extra)
    for kind, w, h in cases:
        for mode in ("normal", "low"):
            t0 = time.perf_counter()
            r = tracked_step(pack, kind, w, h, mode, dtype)
            r["tracker_seconds"] = time.perf_counter() - t0
            rows.append(r)
            pcie = r["bytes_moved"] / PCIE_BYTES_PER_S
            print(f"| {kind} | {w}x{h} | {'low_memory' if mode == 'low' else 'normal'} | {gib(r['weights'])} | "
                  f"{gib(r['activation_peak'])} | **{gib(r['device_peak'])}** | {gib(r['host_peak'])} | "
                  f"{gib(r['bytes_moved'])} | {pcie:.2f} s | {r['estimate'] / r['activation_peak']:.2f} | "
                  f"{r['tracker_seconds']:.1f} |", flush=True)
    return rows


def validate(pack, kind: str, sizes, channels: int, modes) -> list[dict]:
    import torch

    rows = []
    print("| layout | image | mode | real peak RSS growth MiB | tracker MiB | tracker / real | real step s |")
    print("|---|---|---|---|---|---|---|")
    for px in sizes:
        for mode in modes:
            # every allocation above 128 KiB from mmap, returned to the system when freed: RSS then
            # follows live bytes instead of glibc's heap high-water (its dynamic threshold keeps
            # blocks up to 32 MiB in the heap, where banded ops leave them fragmented)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
            out = subprocess.run([sys.executable, __file__, "--real", kind, str(px), mode, str(channels)],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"| {kind} ch{channels} | {px} | {mode} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            real = json.loads(out.stdout.strip().splitlines()[-1])
            tr = tracked_step(pack, kind, px, px, mode, torch.float32, channels, cpu_like=True)
            ratio = tr["activation_peak"] / max(1, real["rss_growth"])
            rows.append({"px": px, "mode": mode, **real, "tracker": tr["activation_peak"], "ratio": ratio})
            print(f"| {kind} ch{channels} | {px} px | {mode} | {real['rss_growth'] / 2**20:.0f} | "
                  f"{tr['activation_peak'] / 2**20:.0f} | {ratio:.3f} | {real['seconds']:.1f} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--px", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--no-extra", action="store_true", help="leave out the SD1.5 16384x8192 row (the paper's)")
    ap.add_argument("--validate", action="store_true", help="tracker vs real CPU runs instead of the table")
    ap.add_argument("--channels", type=int, default=64, help="model_channels of the validation layout")
    ap.add_argument("--modes", nargs="+", default=["normal", "low"])
    ap.add_argument("--time", action="store_true", help="CPU time of low_memory vs normal (one step, in-process)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--real", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    pack = _setup()
    import torch

    if a.real:
        kind, px, mode, ch = a.real
        torch.set_num_threads(2)
        print(json.dumps(real_step(pack, kind, int(px), mode, int(ch))))
        return
    if a.time:
        torch.set_num_threads(2)
        rows = time_overhead(pack, a.kinds[0], a.px, a.channels)
    elif a.validate:
        rows = validate(pack, a.kinds[0], a.px, a.channels, a.modes)
    else:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
        extra = [] if a.no_extra else [("sd15", 16384, 8192)]
        rows = table(pack, a.kinds, a.px, dtype, extra)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
