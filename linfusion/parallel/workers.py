"""Processes of a band-parallel group: `launch` (a group of spawned workers with a clear error
when one dies; used by the tests and bench/parallel.py) and `serve` (the loop of a persistent
worker: one extra device of a host application, the Multi-GPU node).
"""

from __future__ import annotations

import contextlib
import os
import queue as queue_mod
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .geometry import BandParallelError, conv_settings_applied
from .runtime import DEFAULT_TIMEOUT_S, band_parallel


class WorkerError(RuntimeError):
    """A band-parallel worker process died or raised; the message names its rank."""


def _worker_main(rank: int, world: int, init_method: str, backend: str, timeout_s: float, threads: int | None,
                 fn: Callable, args: tuple, results: Any) -> None:
    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def launch(fn: Callable, world: int, args: tuple = (), *, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S,
           threads: int | None = None, join_timeout_s: float = 600.0) -> list[Any]:
    """Run fn(rank, world, *args) in `world` spawned processes sharing one process group.

    fn must be importable (module level) and return picklable values (plain Python or numpy:
    tensors would travel through shared memory that dies with the worker). Returns the values
    by rank. If a worker dies or raises, the others are stopped and WorkerError names the
    rank(s); no process is left behind, whatever happens.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    fd, path = tempfile.mkstemp(prefix="linfusion-band-")
    os.close(fd)
    os.unlink(path)  # the file store creates it
    procs = [ctx.Process(target=_worker_main, daemon=True,
                         args=(r, world, f"file://{path}", backend, timeout_s, threads, fn, args, results))
             for r in range(world)]
    got: dict[int, tuple[str, Any]] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + join_timeout_s
        dead: dict[int, int] = {}
        while len(got) < world:
            try:
                r, status, value = results.get(timeout=0.2)
                got[r] = (status, value)
                continue
            except queue_mod.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in got and r not in dead and p.exitcode is not None:
                    dead[r] = p.exitcode
            if dead:
                # Give the survivors a moment to report the failed collective, then stop them.
                grace = time.monotonic() + min(10.0, timeout_s)
                while len(got) + len(dead) < world and time.monotonic() < grace:
                    with contextlib.suppress(queue_mod.Empty):
                        r, status, value = results.get(timeout=0.2)
                        got[r] = (status, value)
                break
            if time.monotonic() > deadline:
                raise WorkerError(f"band-parallel workers did not finish within {join_timeout_s:.0f} s "
                                  f"(ranks {sorted(set(range(world)) - set(got))} still running)")
        errors = {r: v for r, (s, v) in got.items() if s != "ok"}
        if dead or errors:
            msg = [f"rank {r} died (exit code {c})" for r, c in sorted(dead.items())]
            msg += [f"rank {r} raised:\n{v}" for r, v in sorted(errors.items())]
            raise WorkerError("band-parallel worker failure: " + "; ".join(msg))
        return [got[r][1] for r in range(world)]
    finally:
        _stop(procs)
        results.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _stop(procs: list) -> None:
    """Terminate the started processes; kill those still alive 5 s later."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    for p in started:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def _to(t: Any, device: torch.device) -> Any:
    """Tensors moved to `device`, also inside dicts and lists (a ControlNet's residuals)."""
    if isinstance(t, dict):
        return {k: _to(v, device) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        return type(t)(_to(v, device) for v in t)
    return t.to(device) if isinstance(t, torch.Tensor) else t


def serve(rank: int, world: int, init_method: str, backend: str, timeout_s: float, device: str,
          builder_file: str, requests: Any, replies: Any) -> None:
    """Worker loop of a persistent band-parallel group (run in a spawned process).

    Replies ("ok", rank, "started"), joins the group, then serves messages from `requests`:
    ("load", payload) builds the model with build_unet(payload, device) from `builder_file` (a
    host-specific file loaded by path, so this module stays free of host imports);
    ("forward", x, args, kwargs, convs) runs this rank's band of one forward in step with rank 0,
    with rank 0's conv settings (conv_settings, or None); kwargs may hold `control`, already cut
    to this rank's rows (split_control); ("stop",) leaves. Replies
    ("ok"|"error", rank, text) go to `replies`. The worker also leaves when its parent process
    is gone. The process group is destroyed on the way out.
    """
    import importlib.util

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    replies.put(("ok", rank, "started"))  # the host waits for this before it joins the group
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    unet = None
    try:
        spec = importlib.util.spec_from_file_location("linfusion_band_builder", builder_file)
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        parent = os.getppid()
        while True:
            try:
                msg = requests.get(timeout=1.0)
            except queue_mod.Empty:
                if os.getppid() != parent:
                    return  # the host died without stopping us (SIGKILL, or SIGTERM without cleanup)
                continue
            try:
                if msg[0] == "stop":
                    replies.put(("ok", rank, "stopped"))
                    return
                if msg[0] == "load":
                    unet = builder.build_unet(msg[1], dev)
                    replies.put(("ok", rank, "loaded"))
                elif msg[0] == "forward":
                    _, x, args, kwargs, convs = msg
                    with conv_settings_applied(unet, convs), band_parallel(unet, timeout_s=timeout_s) as bp, \
                            torch.no_grad():
                        bp.forward(unet, _to(x, dev), *[_to(a, dev) for a in args],
                                   **{k: _to(v, dev) for k, v in kwargs.items()})
                    replies.put(("ok", rank, "forward"))
            except Exception:
                replies.put(("error", rank, traceback.format_exc()))
                if isinstance(sys.exc_info()[1], BandParallelError) or msg[0] == "load":
                    return  # the group is out of step: rank 0 tears it down
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
