"""LinFusion Multi-GPU: sample one image band-parallel across several devices (exact).

The ComfyUI process is rank 0; one spawned worker process per extra device holds a copy of
the UNet (LinFusion layers included, and the weights with every patch of the sampling
ModelPatcher applied, e.g. a LoRA, however ComfyUI loaded them) and runs its band of every UNet
call in step with rank 0 (linfusion/parallel/). A model without LinFusion runs exactly too:
its softmax self-attention gathers every band's tokens (no speed-up there). The group meets at a
TCP store on the loopback interface (no file anywhere). It is started by the first UNet call
and closed (workers stopped, process group destroyed) when:
- the model is unloaded (ComfyUI's ON_DETACH callback with unpatch_all: /free with
  unload_models, or ComfyUI making room on the device), or every ModelPatcher carrying the
  node's wrapper is garbage collected (weakref.finalize; clones are tracked through ON_CLONE);
- another device list or timeout is asked for, a worker fails, the prompt is cancelled (rank 0
  stops waiting on the workers within CANCEL_POLL_S), or the server exits (atexit; a worker
  also leaves by itself when its parent process is gone, e.g. after SIGTERM).
The next UNet call starts a new group.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import comfy.model_management
import torch
import torch.distributed as dist
from comfy.patcher_extension import CallbacksMP, WrappersMP
from comfy_api.latest import io

from ..linfusion import LinFusionAttention
from ..linfusion.parallel import (
    BandParallelError,
    Workers,
    band_parallel,
    check_conv_fit,
    conv_settings,
    forward_message,
    host_store,
    join_group,
    replaced_forwards,
    split_control,
    split_rows,
)
from .multigpu_weights import effective_weights, weights_key
from .schema import CATEGORY, DISPLAY_NAMES, schema

log = logging.getLogger("ComfyUI-LinFusion")
PACK_ROOT = Path(__file__).resolve().parents[1]
WRAPPER_KEY = "linfusion_multigpu"


# CPU ranks are a testing mode (one machine's cores shared by processes that each hold a copy of
# the UNet): a CPU may be listed again, up to this many ranks in all.
MAX_CPU_RANKS = 4
MAX_DEVICES_CHARS = 1000
TIMEOUT_RANGE_S = (5, 3600)


def _echo(text: str, limit: int = 60) -> str:
    """`text` for an error message: quoted, cut to `limit` characters with its length named."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def parse_devices(text) -> list[torch.device]:
    """'all' (every CUDA device) or a comma-separated list like 'cuda:0,cuda:1' ('cpu,cpu' for tests).

    Each CUDA device at most once and only devices this machine has; cpu (a testing mode) up to
    MAX_CPU_RANKS times. Any other input: ValueError with a one-line message."""
    fix = "write e.g. 'all' or 'cuda:0,cuda:1'"
    if not isinstance(text, str):
        raise ValueError(f"LinFusion Multi-GPU: devices is a {type(text).__name__}, not text; {fix}")
    if len(text) > MAX_DEVICES_CHARS:
        raise ValueError(f"LinFusion Multi-GPU: devices {_echo(text)} is longer than {MAX_DEVICES_CHARS} characters; "
                         f"{fix}")
    text = text.strip().lower()
    n_cuda = torch.cuda.device_count()
    if text == "all":
        return [torch.device("cuda", i) for i in range(n_cuda)] or [torch.device("cpu")]
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            dev = torch.device(part)
        except RuntimeError:
            raise ValueError(f"LinFusion Multi-GPU: devices entry {_echo(part)} is not a device; {fix}") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"LinFusion Multi-GPU: devices entry {_echo(part)} is a {dev.type} device; only CUDA "
                             f"GPUs (and cpu, for tests) can run band-parallel; {fix}")
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device() if n_cuda else 0)
            if dev.index >= n_cuda:
                have = f"cuda:0 to cuda:{n_cuda - 1}" if n_cuda else "no CUDA device"
                raise ValueError(f"LinFusion Multi-GPU: devices entry {_echo(part)} does not exist: this machine has "
                                 f"{have}; list only those, or write 'all'")
        out.append(dev)
    if not out:
        raise ValueError(f"LinFusion Multi-GPU: devices {_echo(text)} names no device; {fix}")
    kinds = {d.type for d in out}
    if len(kinds) > 1:
        raise ValueError(f"LinFusion Multi-GPU: devices {_echo(text)} mix {sorted(kinds)}; use one kind")
    if "cuda" in kinds and len(set(out)) != len(out):
        raise ValueError(f"LinFusion Multi-GPU: devices {_echo(text)} repeat a GPU; list each once (one worker "
                         "per GPU)")
    if "cpu" in kinds and len(out) > MAX_CPU_RANKS:
        raise ValueError(f"LinFusion Multi-GPU: devices lists cpu {len(out)} times; CPU ranks are a testing mode "
                         f"(each a process holding a copy of the UNet): list it at most {MAX_CPU_RANKS} times")
    return out


def check_timeout(value) -> float:
    """timeout_s as seconds, also when linked from another node (ComfyUI checks a widget's range
    only for typed-in values): a number in TIMEOUT_RANGE_S, else ValueError."""
    lo, hi = TIMEOUT_RANGE_S
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and lo <= value <= hi
    if not ok:
        shown = _echo(str(value), 30)
        raise ValueError(f"LinFusion Multi-GPU: timeout_s {shown} is not a number of seconds from {lo} to {hi}; "
                         "give e.g. 300")
    return float(value)


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


CANCEL_POLL_S = 0.2  # how often rank 0 looks at ComfyUI's interrupt flag while it waits on the workers

class BandGroup:
    """Rank 0's side of a persistent group: the worker processes (linfusion.parallel.Workers) and
    the process group, met at a TCP store that rank 0 serves on the loopback interface (no file in
    the temporary folder, so no exit of the server can leave one behind)."""

    def __init__(self, devices: list[torch.device], timeout_s: float) -> None:
        self.devices, self.timeout_s = devices, timeout_s
        self.world = len(devices)
        self.backend = "nccl" if devices[0].type == "cuda" else "gloo"
        self.cancelled = False
        self.loaded: tuple | None = None
        self.busy = False  # inside a UNet call: a release then waits for its end
        self.close_reason: str | None = None
        self.store = host_store(self.world, timeout_s)
        builder = str(Path(__file__).with_name("multigpu_worker.py"))
        self.workers = Workers(_serve_target(), range(1, self.world), inbox=True,
                               args=lambda r: (r, self.world, self.store.port, self.backend, timeout_s,
                                               str(devices[r]), builder))
        with _main_module_hidden():
            self.workers.start()
        # each worker reports before joining the group: one that dies while starting fails here
        # at once, instead of after the group's timeout
        self._await("its start (its traceback is in the log above)")
        try:
            with self._stopped_on_cancel():
                join_group(self.backend, 0, self.world, self.store, timeout_s)
        except BaseException:
            self._raise_if_cancelled()
            self.close("the process group did not form")
            raise
        log.info("LinFusion Multi-GPU: %d ranks on %s (%s); worker pids %s", self.world, ", ".join(map(str, devices)),
                 self.backend, ", ".join(map(str, self.pids)))

    @property
    def pids(self) -> list[int]:
        return self.workers.pids

    def _raise_if_cancelled(self) -> None:
        """Cancel (ComfyUI's interrupt) was pressed while rank 0 waited on the workers: close the group
        and end the prompt as ComfyUI's own interrupt does."""
        if self.cancelled or comfy.model_management.processing_interrupted():
            self.close("the prompt was cancelled")
            comfy.model_management.throw_exception_if_processing_interrupted()  # raises, and clears the flag
            raise comfy.model_management.InterruptProcessingException()

    @contextlib.contextmanager
    def _stopped_on_cancel(self) -> Iterator[None]:
        """While rank 0 may wait inside a collective (whose own timeout can be an hour): Cancel kills
        the workers within CANCEL_POLL_S, so that the wait fails at once (a dead peer closes its
        connections) instead of at the timeout, also when a worker stopped answering."""
        done = threading.Event()

        def watch() -> None:
            while not done.wait(CANCEL_POLL_S):
                if comfy.model_management.processing_interrupted():
                    self.cancelled = True
                    self.workers.kill()
                    return

        watcher = threading.Thread(target=watch, name="linfusion-band-cancel", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()

    def _await(self, what: str) -> None:
        """One reply per worker, or a clear error naming the rank that died or failed (Cancel: the
        prompt ends as interrupted)."""
        seen = self.workers.gather(self.workers.ranks, self.timeout_s, idle=self._raise_if_cancelled,
                                   until_error=True)
        errors = seen.errors()
        if errors:
            self.close("a worker failed")
            rank, text = next(iter(errors.items()))
            raise RuntimeError(f"LinFusion Multi-GPU: worker rank {rank} failed during {what}:\n{text}")
        if seen.dead or seen.silent:
            self.close("a worker failed")
            rank, code = next(iter(sorted(seen.dead.items())), (seen.silent[0], None))
            why = "timed out" if code is None else f"died (exit code {code})"
            raise RuntimeError(f"LinFusion Multi-GPU: worker rank {rank} {why} during {what}; "
                               "the group is closed, run the prompt again") from None

    def load(self, unet: torch.nn.Module, config: dict, patcher) -> None:
        """Send the UNet (config, LinFusion layers, the weights ComfyUI computes with) to every
        worker, if any of them changed since the last load."""
        key = weights_key(unet, patcher)
        if self.loaded == key:
            return
        layers = [(n, m.dim, m.heads, m.mid_dim, m.softmax_max_tokens if m.softmax_attn is not None else 0)
                  for n, m in unet.named_modules() if isinstance(m, LinFusionAttention)]
        payload = {"pack_root": str(PACK_ROOT), "unet_config": config, "layers": layers,
                   "state": effective_weights(unet, patcher)}
        self.workers.send({r: ("load", payload) for r in self.workers.ranks})
        self._await("loading the UNet")
        self.loaded = key

    def forward(self, executor, config: dict, patcher, x, timesteps, context, y, control, transformer_options,
                **kwargs):
        """One UNet call split into bands; the full output on rank 0. `patcher`: the ModelPatcher
        sampling (its weight patches, e.g. LoRA, are applied to the weights the workers get)."""
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
        self.load(unet, config, patcher)
        extra = {} if y is None else {"y": y}
        convs = conv_settings(unet)  # DemoFusion's dilated branch changes them on rank 0's UNet
        band_kwargs = [extra if c is None else {**extra, "control": c} for c in controls]
        self.workers.send({r: forward_message(x, (timesteps, context), band_kwargs[r], convs)
                           for r in self.workers.ranks})
        self.busy = True
        try:
            with self._stopped_on_cancel(), band_parallel(unet, timeout_s=self.timeout_s) as bp:
                out = bp.forward(lambda xb: executor(xb, timesteps, context, y, controls[0], transformer_options,
                                                     **kwargs), x)
        except BaseException as e:
            if self.cancelled:
                self._raise_if_cancelled()
            failure = self._failure(e)
            if failure is e:
                raise
            raise failure from e
        finally:
            self.busy = False
        self._raise_if_cancelled()
        self._await("a UNet call")
        if self.close_reason is not None:
            self.close(self.close_reason)
        return out

    def _failure(self, error: BaseException) -> BaseException:
        """Rank 0's band forward raised: close the group (it is out of step) and name the worker
        that died or failed, when one did (a dead peer shows on rank 0 as a failed collective)."""
        # a failed collective: wait a little for the worker's own report; anything else: a glance
        wait_s = min(5.0, self.timeout_s) if isinstance(error, BandParallelError) else CANCEL_POLL_S
        seen = self.workers.gather(self.workers.ranks, wait_s, until_error=True)
        self.close("a UNet call failed")
        reports = [f"worker rank {r} died (exit code {c})" for r, c in sorted(seen.dead.items())]
        reports += [f"worker rank {r} failed:\n{text}" for r, text in seen.errors().items()]
        if not reports:
            return error
        return RuntimeError(f"LinFusion Multi-GPU: {'; '.join(reports)} during a UNet call (rank 0: {error}); "
                            "the group is closed and the next run starts a new one")

    def close(self, reason: str = "closed") -> None:
        """Stop the workers (politely, then SIGKILL) and destroy the process group."""
        self.workers.stop()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        self.store = None  # rank 0's TCP store server stops with its last reference
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


def multigpu_wrapper(devices: list[torch.device], timeout_s: float, config: dict, base_model):
    """DIFFUSION_MODEL wrapper: UNet calls whose latent splits into bands run band-parallel.
    `base_model`: the BaseModel every clone of the node's model shares; its current_patcher (set
    by ComfyUI for the sampling run) holds the weight patches of the clone sampling, e.g. a LoRA
    loaded after this node."""
    base = weakref.ref(base_model)
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
        model = base()
        patcher = getattr(model, "current_patcher", None) if model is not None else None
        return group_for(devices, timeout_s).forward(executor, config, patcher, x, timesteps, context, y, control,
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
        timeout = check_timeout(timeout_s)
        if len(devs) < 2:
            log.info("LinFusion Multi-GPU: one device (%s): the model runs unchanged", devs[0])
            return io.NodeOutput(model)
        m = model.clone()
        config = dict(m.model.model_config.unet_config)
        wrapper = multigpu_wrapper(devs, timeout, config, m.model)
        m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
        m.add_callback_with_key(CallbacksMP.ON_DETACH, WRAPPER_KEY, _on_detach)
        m.add_callback_with_key(CallbacksMP.ON_CLONE, WRAPPER_KEY, _on_clone)
        _own(m)
        log.info("LinFusion Multi-GPU: sampling will run on %s", ", ".join(map(str, devs)))
        return io.NodeOutput(m)
