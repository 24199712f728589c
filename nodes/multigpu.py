"""LinFusion Multi-GPU: sample one image band-parallel across several devices (exact).

The ComfyUI process is rank 0; one spawned worker process per extra device holds a copy of
the UNet (LinFusion layers and patched weights included) and runs its band of every UNet
call in step with rank 0 (linfusion/parallel.py). The group lives until the server exits
or another device list is asked for.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..linfusion import LinFusionAttention
from ..linfusion.parallel import BandParallelError, band_parallel, split_rows
from .schema import CATEGORY, schema

log = logging.getLogger(__name__)
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
    """linfusion.parallel.serve under its top-level name, so a spawned worker can import it."""
    if str(PACK_ROOT) not in sys.path:
        sys.path.insert(0, str(PACK_ROOT))
    import linfusion.parallel

    return linfusion.parallel.serve


class BandGroup:
    """Rank 0's side of a persistent group: the worker processes and the process group."""

    def __init__(self, devices: list[torch.device], timeout_s: float) -> None:
        self.devices, self.timeout_s = devices, timeout_s
        self.world = len(devices)
        self.backend = "nccl" if devices[0].type == "cuda" else "gloo"
        ctx = torch.multiprocessing.get_context("spawn")
        self.replies = ctx.Queue()
        self.requests = [ctx.Queue() for _ in devices[1:]]
        store = Path(tempfile.mkdtemp(prefix="linfusion-band-")) / "store"
        target = _serve_target()
        self.procs = [ctx.Process(target=target, daemon=True, name=f"linfusion-band-rank{r}",
                                  args=(r, self.world, f"file://{store}", self.backend, timeout_s, str(devices[r]),
                                        str(Path(__file__).with_name("multigpu_worker.py")), self.requests[r - 1],
                                        self.replies))
                      for r in range(1, self.world)]
        for p in self.procs:
            p.start()
        dist.init_process_group(self.backend, init_method=f"file://{store}", rank=0, world_size=self.world,
                                timeout=timedelta(seconds=timeout_s))
        self.loaded: tuple | None = None
        log.info("LinFusion Multi-GPU: %d ranks on %s (%s)", self.world, ", ".join(map(str, devices)), self.backend)

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
                    self.close()
                    why = f"died (exit code {self.procs[dead[0] - 1].exitcode})" if dead else "timed out"
                    raise RuntimeError(f"LinFusion Multi-GPU: worker rank {(dead or sorted(pending))[0]} {why} during "
                                       f"{what}; the group is closed, run the prompt again") from None
                continue
            if status != "ok":
                self.close()
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
        if control is not None:
            raise BandParallelError("LinFusion Multi-GPU: ControlNet residuals are not split into bands yet; "
                                    "remove the ControlNet or the Multi-GPU node")
        patches = {k: v for k, v in transformer_options.items() if k in ("patches", "patches_replace") and v}
        if patches:
            raise BandParallelError(f"LinFusion Multi-GPU: the model carries attention patches ({sorted(patches)}) "
                                    "that the worker devices would not apply; remove the nodes adding them, or the "
                                    "Multi-GPU node")
        unet = executor.class_obj
        self.load(unet, config)
        extra = {} if y is None else {"y": y.cpu()}
        for q in self.requests:
            q.put(("forward", x.cpu(), (timesteps.cpu(), context.cpu()), extra))
        with band_parallel(unet, timeout_s=self.timeout_s) as bp:
            out = bp.forward(lambda xb: executor(xb, timesteps, context, y, control, transformer_options, **kwargs), x)
        self._await("a UNet call")
        return out

    def close(self) -> None:
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
        global _GROUP
        if _GROUP is self:
            _GROUP = None


_GROUP: BandGroup | None = None


def group_for(devices: list[torch.device], timeout_s: float) -> BandGroup:
    global _GROUP
    if _GROUP is not None and (_GROUP.devices != devices or _GROUP.timeout_s != timeout_s):
        _GROUP.close()
    if _GROUP is None:
        _GROUP = BandGroup(devices, timeout_s)
    return _GROUP


@atexit.register
def _close_at_exit() -> None:
    if _GROUP is not None:
        _GROUP.close()


def multigpu_wrapper(devices: list[torch.device], timeout_s: float, config: dict):
    """DIFFUSION_MODEL wrapper: UNet calls whose latent splits into bands run band-parallel."""
    def wrapper(executor, x, timesteps, context, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        try:
            split_rows(x.shape[-2], len(devices))
        except BandParallelError as e:
            log.warning("LinFusion Multi-GPU: this call runs on one device: %s", e)
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        return group_for(devices, timeout_s).forward(executor, config, x, timesteps, context, y, control,
                                                    transformer_options, **kwargs)
    return wrapper


class LinFusionMultiGPU(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LinFusionMultiGPU",
            display_name="LinFusion Multi-GPU",
            category=CATEGORY,
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
        log.info("LinFusion Multi-GPU: sampling will run on %s", ", ".join(map(str, devs)))
        return io.NodeOutput(m)
