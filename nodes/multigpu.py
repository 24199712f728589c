"""LinFusion Multi-GPU: sample one image band-parallel across several devices (exact).

The ComfyUI process is rank 0; one spawned worker process per extra device holds a copy of
the UNet (LinFusion layers and patched weights included) and runs its band of every UNet
call in step with rank 0 (linfusion/parallel.py). The group is started by the first UNet call
and closed (workers stopped, process group destroyed) when:
- the model is unloaded (ComfyUI's ON_DETACH callback with unpatch_all: /free with
  unload_models, or ComfyUI making room on the device), or every ModelPatcher carrying the
  node's wrapper is garbage collected (weakref.finalize; clones are tracked through ON_CLONE);
- another device list or timeout is asked for, a worker fails, or the server exits (atexit;
  a worker also leaves by itself when its parent process is gone, e.g. after SIGTERM).
The next UNet call starts a new group.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import shutil
import sys
import tempfile
import time
import weakref
from collections import Counter
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from comfy.patcher_extension import CallbacksMP, WrappersMP
from comfy_api.latest import io

from ..linfusion import LinFusionAttention
from ..linfusion.parallel import (
    BandParallelError,
    band_parallel,
    check_conv_fit,
    conv_settings,
    replaced_forwards,
    split_control,
    split_rows,
)
from .schema import CATEGORY, DISPLAY_NAMES, schema

log = logging.getLogger("ComfyUI-LinFusion")
PACK_ROOT = Path(__file__).resolve().parents[1]
WRAPPER_KEY = "linfusion_multigpu"


def parse_devices(text: str) -> list[torch.device]:
    """'all' (every CUDA device) or a comma-separated list like 'cuda:0,cuda:1' ('cpu,cpu' for tests)."""
    text = text.strip().lower()
    if text == "all":
        n = torch.cuda.device_count()
        return [torch.device("cuda", i) for i in range(n)] or [torch.device("cpu")]
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            out.append(torch.device(part))
        except RuntimeError as e:
            raise ValueError(f"LinFusion Multi-GPU: devices entry {part!r} is not a device ({e}); "
                             "write e.g. 'all' or 'cuda:0,cuda:1'") from None
    if not out:
        raise ValueError(f"LinFusion Multi-GPU: devices {text!r} names no device; write e.g. 'all' or 'cuda:0,cuda:1'")
    kinds = {d.type for d in out}
    if len(kinds) > 1:
        raise ValueError(f"LinFusion Multi-GPU: devices {text!r} mix {sorted(kinds)}; use one kind")
    if "cuda" in kinds and len({d.index for d in out}) != len(out):
        raise ValueError(f"LinFusion Multi-GPU: devices {text!r} repeat a GPU; list each once")
    return out


def _serve_target():
    """linfusion.parallel.serve under its top-level name, so a spawned worker can import it. The
    pack root goes last on sys.path: first, its `nodes` package would shadow ComfyUI's `nodes`."""
    if str(PACK_ROOT) not in sys.path:
        sys.path.append(str(PACK_ROOT))
    import linfusion.parallel

    if Path(linfusion.__file__).resolve().parent != PACK_ROOT / "linfusion":
        raise RuntimeError(f"LinFusion Multi-GPU: `import linfusion` finds {linfusion.__file__}, not this pack's "
                           f"{PACK_ROOT / 'linfusion'}: uninstall that other `linfusion` package")
    return linfusion.parallel.serve


@contextlib.contextmanager
def _main_module_hidden():
    """While worker processes are spawned: a spawned child runs the parent's __main__ again
    (multiprocessing's spawn preparation), which in a server is ComfyUI's main.py. Without a
    file or spec on __main__, the child imports only what its target needs."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__


def _cpu(control: dict) -> dict:
    """A worker's residuals, copied to CPU memory for the queue (contiguous: only its rows travel)."""
    return {k: [None if t is None else t.detach().to("cpu", copy=True).contiguous() for t in v]
            for k, v in control.items()}


class BandGroup:
    """Rank 0's side of a persistent group: the worker processes and the process group."""

    def __init__(self, devices: list[torch.device], timeout_s: float) -> None:
        self.devices, self.timeout_s = devices, timeout_s
        self.world = len(devices)
        self.backend = "nccl" if devices[0].type == "cuda" else "gloo"
        ctx = torch.multiprocessing.get_context("spawn")
        self.replies = ctx.Queue()
        self.requests = [ctx.Queue() for _ in devices[1:]]
        self.store_dir = Path(tempfile.mkdtemp(prefix="linfusion-band-"))
        store = self.store_dir / "store"
        target = _serve_target()
        self.procs = [ctx.Process(target=target, daemon=True, name=f"linfusion-band-rank{r}",
                                  args=(r, self.world, f"file://{store}", self.backend, timeout_s, str(devices[r]),
                                        str(Path(__file__).with_name("multigpu_worker.py")), self.requests[r - 1],
                                        self.replies))
                      for r in range(1, self.world)]
        with _main_module_hidden():
            for p in self.procs:
                p.start()
        self.loaded: tuple | None = None
        self.busy = False  # inside a UNet call: a release then waits for its end
        self.close_reason: str | None = None
        self.pids = [p.pid for p in self.procs]
        # each worker reports before joining the group: one that dies while starting fails here
        # at once, instead of after the group's timeout
        self._await("its start (its traceback is in the log above)")
        try:
            dist.init_process_group(self.backend, init_method=f"file://{store}", rank=0, world_size=self.world,
                                    timeout=timedelta(seconds=timeout_s))
        except BaseException:
            self.close("the process group did not form")
            raise
        log.info("LinFusion Multi-GPU: %d ranks on %s (%s); worker pids %s", self.world, ", ".join(map(str, devices)),
                 self.backend, ", ".join(map(str, self.pids)))

    def _await(self, what: str) -> None:
        """One reply per worker, or a clear error naming the rank that died or failed."""
        pending = set(range(1, self.world))
        deadline = time.monotonic() + self.timeout_s
        while pending:
            try:
                status, rank, text = self.replies.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r in pending if not self.procs[r - 1].is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close("a worker failed")
                    why = f"died (exit code {self.procs[dead[0] - 1].exitcode})" if dead else "timed out"
                    raise RuntimeError(f"LinFusion Multi-GPU: worker rank {(dead or sorted(pending))[0]} {why} during "
                                       f"{what}; the group is closed, run the prompt again") from None
                continue
            if status != "ok":
                self.close("a worker failed")
                raise RuntimeError(f"LinFusion Multi-GPU: worker rank {rank} failed during {what}:\n{text}")
            pending.discard(rank)

    def load(self, unet: torch.nn.Module, config: dict) -> None:
        """Send the UNet (config, LinFusion layers, current weights) to every worker, if it changed."""
        params = list(unet.parameters())
        key = (id(unet), float(torch.stack([p.detach().reshape(-1)[0].double().cpu() for p in params]).sum()))
        if self.loaded == key:
            return
        layers = [(n, m.dim, m.heads, m.mid_dim, m.softmax_max_tokens if m.softmax_attn is not None else 0)
                  for n, m in unet.named_modules() if isinstance(m, LinFusionAttention)]
        state = {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()}
        payload = {"pack_root": str(PACK_ROOT), "unet_config": config, "layers": layers, "state": state}
        for q in self.requests:
            q.put(("load", payload))
        self._await("loading the UNet")
        self.loaded = key

    def forward(self, executor, config: dict, x, timesteps, context, y, control, transformer_options, **kwargs):
        """One UNet call split into bands; the full output on rank 0."""
        patches = {k: sorted(v) for k, v in transformer_options.items() if k in ("patches", "patches_replace") and v}
        if patches:
            raise BandParallelError(f"LinFusion Multi-GPU: the model carries patches ({patches}) "
                                    "that the worker devices would not apply; remove the nodes adding them, or the "
                                    "Multi-GPU node")
        unet = executor.class_obj
        replaced = replaced_forwards(unet)
        if replaced:
            raise BandParallelError(
                f"LinFusion Multi-GPU: {len(replaced)} UNet modules have a replaced forward (e.g. {replaced[0]!r}: "
                "another node's patch, or a low-memory banded resnet) that the worker devices would not run; "
                "remove that node or the Multi-GPU node")
        bands = split_rows(x.shape[-2], self.world)
        # ControlNet / T2I-Adapter residuals: each rank gets the rows of its band at every level
        controls = [split_control(control, bands, r) for r in range(self.world)]
        self.load(unet, config)
        extra = {} if y is None else {"y": y.cpu()}
        convs = conv_settings(unet)  # DemoFusion's dilated branch changes them on rank 0's UNet
        for r, q in enumerate(self.requests, 1):
            kw = extra if controls[r] is None else {**extra, "control": _cpu(controls[r])}
            q.put(("forward", x.cpu(), (timesteps.cpu(), context.cpu()), kw, convs))
        self.busy = True
        try:
            with band_parallel(unet, timeout_s=self.timeout_s) as bp:
                out = bp.forward(lambda xb: executor(xb, timesteps, context, y, controls[0], transformer_options,
                                                     **kwargs), x)
        except BaseException as e:
            failure = self._failure(e)
            if failure is e:
                raise
            raise failure from e
        finally:
            self.busy = False
        self._await("a UNet call")
        if self.close_reason is not None:
            self.close(self.close_reason)
        return out

    def _failure(self, error: BaseException) -> BaseException:
        """Rank 0's band forward raised: close the group (it is out of step) and name the worker
        that died or failed, when one did (a dead peer shows on rank 0 as a failed collective)."""
        deadline = time.monotonic() + min(5.0, self.timeout_s)
        reports = []
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                status, rank, text = self.replies.get(timeout=0.2)
                if status != "ok":
                    reports.append(f"worker rank {rank} failed:\n{text}")
            dead = [(r, p.exitcode) for r, p in enumerate(self.procs, 1) if p.exitcode is not None]
            if dead or reports or not isinstance(error, BandParallelError):
                break
        self.close("a UNet call failed")
        reports = [f"worker rank {r} died (exit code {c})" for r, c in dead] + reports
        if not reports:
            return error
        return RuntimeError(f"LinFusion Multi-GPU: {'; '.join(reports)} during a UNet call (rank 0: {error}); "
                            "the group is closed and the next run starts a new one")

    def close(self, reason: str = "closed") -> None:
        """Stop the workers (politely, then SIGKILL after 5 s) and destroy the process group."""
        for q in self.requests:
            with contextlib.suppress(Exception):
                q.put(("stop",))
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        for q in [*self.requests, self.replies]:
            q.cancel_join_thread()  # never block on a message no one will read
            q.close()
        shutil.rmtree(self.store_dir, ignore_errors=True)
        global _GROUP
        if _GROUP is self:
            _GROUP = None
            log.info("LinFusion Multi-GPU: group closed (%s); workers %s exited", reason,
                     ", ".join(map(str, self.pids)))


_GROUP: BandGroup | None = None


def group_for(devices: list[torch.device], timeout_s: float) -> BandGroup:
    global _GROUP
    if _GROUP is not None and (_GROUP.devices != devices or _GROUP.timeout_s != timeout_s):
        _GROUP.close("another device list or timeout was asked for")
    if _GROUP is None:
        _GROUP = BandGroup(devices, timeout_s)
    return _GROUP


@atexit.register
def _close_at_exit() -> None:
    if _GROUP is not None:
        _GROUP.close("the server exits")


def release(reason: str) -> None:
    """Close the group now, or at the end of the UNet call in progress."""
    group = _GROUP
    if group is None:
        return
    if group.busy:
        group.close_reason = reason
    else:
        group.close(reason)


# ModelPatchers carrying the wrapper that are still alive (the node's clones and their clones).
_owners = 0


def _own(patcher) -> None:
    global _owners
    _owners += 1
    weakref.finalize(patcher, _disowned)


def _disowned() -> None:
    global _owners
    _owners -= 1
    if _owners <= 0:
        release("no model uses it any more")


def _on_clone(original, clone) -> None:
    _own(clone)


def _on_detach(patcher, unpatch_all: bool) -> None:
    # unpatch_all=False: ComfyUI swaps to another clone of the same model, which stays loaded
    if unpatch_all:
        release("its model was unloaded")


def is_band_parallel(base_model) -> bool:
    """Whether a loaded BaseModel samples through this node's wrapper (its current ModelPatcher has it)."""
    patcher = getattr(base_model, "current_patcher", None)
    return patcher is not None and WRAPPER_KEY in patcher.wrappers.get(WrappersMP.DIFFUSION_MODEL, {})


# What the wrapper did since the process started: "band" calls ran band-parallel, "one_device"
# calls fell back (a latent or a dilated conv that does not split into the bands).
CALLS: Counter[str] = Counter()
_warned: set[str] = set()


def multigpu_wrapper(devices: list[torch.device], timeout_s: float, config: dict):
    """DIFFUSION_MODEL wrapper: UNet calls whose latent splits into bands run band-parallel."""
    levels = len(config.get("channel_mult", (1, 2, 4, 4))) - 1

    def wrapper(executor, x, timesteps, context, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        try:
            check_conv_fit(executor.class_obj, split_rows(x.shape[-2], len(devices)), levels)
        except BandParallelError as e:
            CALLS["one_device"] += 1
            dilated = max(c[0][0] for c in conv_settings(executor.class_obj))
            why = str(e) + (f" (the convs are dilated x{dilated}: DemoFusion's dilated branch)" if dilated > 1 else "")
            if why not in _warned:
                _warned.add(why)
                log.warning("LinFusion Multi-GPU: calls at latent %dx%d run on one device: %s", x.shape[-2],
                            x.shape[-1], why)
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        CALLS["band"] += 1
        return group_for(devices, timeout_s).forward(executor, config, x, timesteps, context, y, control,
                                                    transformer_options, **kwargs)
    return wrapper


class LinFusionMultiGPU(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LinFusionMultiGPU",
            display_name=DISPLAY_NAMES["LinFusionMultiGPU"],
            category=CATEGORY,
            is_experimental=True,  # the UI's BETA badge (node, search, library)
            search_aliases=["multi gpu", "several gpus", "distributed", "patch parallel"],
            description=(
                "Runs every UNet call of this model split into horizontal bands, one per device, with exactly the "
                "single-device result: LinFusion layers exchange only their small key/value summaries, convolutions "
                "their edge rows, GroupNorm its statistics. Apply LinFusion first. With one device it does nothing."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A model with LinFusion applied (Apply LinFusion)."),
                io.String.Input("devices", default="all", tooltip=(
                    "'all' for every GPU of this machine, or a list like 'cuda:0,cuda:1'. The first device is the one "
                    "ComfyUI runs the model on; each other one gets a worker process holding a copy of the UNet.")),
                io.Int.Input("timeout_s", default=300, min=5, max=3600, tooltip=(
                    "Seconds any exchange between devices may take before the run fails with an error naming the "
                    "device (a worker that died never hangs the server).")),
            ],
            outputs=[io.Model.Output(tooltip="The model, sampling band-parallel (a patched clone).")],
        )

    @classmethod
    def execute(cls, model, devices: str, timeout_s: int) -> io.NodeOutput:
        devs = parse_devices(devices)
        if len(devs) < 2:
            log.info("LinFusion Multi-GPU: one device (%s): the model runs unchanged", devs[0])
            return io.NodeOutput(model)
        m = model.clone()
        config = dict(m.model.model_config.unet_config)
        wrapper = multigpu_wrapper(devs, float(timeout_s), config)
        m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
        m.add_callback_with_key(CallbacksMP.ON_DETACH, WRAPPER_KEY, _on_detach)
        m.add_callback_with_key(CallbacksMP.ON_CLONE, WRAPPER_KEY, _on_clone)
        _own(m)
        log.info("LinFusion Multi-GPU: sampling will run on %s", ", ".join(map(str, devs)))
        return io.NodeOutput(m)
