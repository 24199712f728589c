"""Processes of a band-parallel group. `Workers` is the one supervisor of spawned worker
processes: it starts them, gathers their replies while watching for a dead one, and stops them.
Two users: `launch` (every rank a spawned worker, a clear error when one dies; the tests and
bench/parallel.py) and the Multi-GPU node (nodes/multigpu.py: the host is rank 0, each extra
device a persistent worker running `serve`). The group meets at a TCP store that the parent
serves on the loopback interface (`host_store`), so nothing is left in the temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import queue as queue_mod
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .geometry import BandParallelError, conv_settings_applied
from .runtime import DEFAULT_TIMEOUT_S, band_parallel

POLL_S = 0.2  # how often a wait on the workers looks for a dead one (and runs its idle check)
STOP_GRACE_S = 5.0  # how long a stopped worker gets to exit before SIGKILL
HOST = "127.0.0.1"


class WorkerError(RuntimeError):
    """A band-parallel worker process died or raised; the message names its rank."""


def host_store(world: int, timeout_s: float) -> dist.TCPStore:
    """The group's meeting point, served by this process on a free loopback port (store.port)."""
    return dist.TCPStore(HOST, 0, world, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_group(backend: str, rank: int, world: int, store: dist.Store | int, timeout_s: float) -> None:
    """Join the process group at `store` (the host's own store, or the port of the host's store)."""
    timeout = timedelta(seconds=timeout_s)
    if isinstance(store, int):
        store = dist.TCPStore(HOST, store, world, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


@dataclass
class Replies:
    """What a wait on the workers saw: replies (status, value) by rank, the ranks that died
    without replying (exit codes), and the ranks still silent when the wait ended."""

    got: dict[int, tuple[str, Any]] = field(default_factory=dict)
    dead: dict[int, int] = field(default_factory=dict)
    silent: list[int] = field(default_factory=list)

    def errors(self) -> dict[int, Any]:
        return {r: v for r, (s, v) in sorted(self.got.items()) if s != "ok"}


class Workers:
    """Spawned worker processes, one per rank in `ranks`, replying (rank, status, value) on one queue.

    `args(rank)` gives a worker's arguments after the reply queue's place is filled in: the target
    is called as target(*args(rank), replies) with `inbox=False`, or target(*args(rank), inbox,
    replies) with `inbox=True` (each worker then reads requests from its own queue, and `stop`
    asks it to leave with ("stop",) before it is killed)."""

    def __init__(self, target: Callable, ranks: Iterable[int], args: Callable[[int], tuple], *,
                 inbox: bool = False, name: str = "linfusion-band") -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.ranks = list(ranks)
        self.replies = ctx.Queue()
        self.inboxes = {r: ctx.Queue() for r in self.ranks} if inbox else {}
        self.procs = {r: ctx.Process(target=target, daemon=True, name=f"{name}-rank{r}",
                                     args=(*args(r), *([self.inboxes[r]] if inbox else []), self.replies))
                      for r in self.ranks}

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, by rank (empty before start)."""
        return [p.pid for p in self.procs.values() if p.pid is not None]

    def start(self) -> None:
        for p in self.procs.values():
            p.start()

    def send(self, messages: dict[int, tuple]) -> None:
        """Queue a message for each rank. Its tensors must be nobody else's (see forward_message):
        the queue pickles them later, in its own thread, moving them into shared memory."""
        for r, msg in messages.items():
            self.inboxes[r].put(msg)

    def exited(self) -> dict[int, int]:
        """Exit codes of the workers that have exited, by rank."""
        return {r: p.exitcode for r, p in self.procs.items() if p.exitcode is not None}

    def kill(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(Exception):
                p.kill()

    def gather(self, ranks: Iterable[int], timeout_s: float, *, idle: Callable[[], None] | None = None,
               grace_s: float = 0.0, until_error: bool = False) -> Replies:
        """Replies of `ranks` until each replied or died, at most `timeout_s`. When one died, the
        others get `grace_s` more to report (e.g. the collective that failed with it); with
        `until_error` the first error reply ends the wait. `idle()` runs every POLL_S of silence
        (it may raise: the host's Cancel)."""
        pending, seen = set(ranks), Replies()
        deadline, grace_end = time.monotonic() + timeout_s, None
        while pending:
            try:
                r, status, value = self.replies.get(timeout=POLL_S)
                seen.got[r] = (status, value)
                pending.discard(r)
                if until_error and status != "ok":
                    break
                continue
            except queue_mod.Empty:
                pass
            if idle is not None:
                idle()
            for r, code in self.exited().items():
                if r in pending:
                    seen.dead[r] = code
                    pending.discard(r)
            now = time.monotonic()
            if seen.dead and grace_end is None:
                grace_end = now + grace_s
            if now > deadline or (grace_end is not None and now >= grace_end):
                break
        seen.silent = sorted(pending)
        return seen

    def stop(self) -> None:
        """Ask the workers to leave (("stop",), or SIGTERM without an inbox), SIGKILL those still
        alive STOP_GRACE_S later, and close the queues (never blocking on an unread message)."""
        started = [(r, p) for r, p in self.procs.items() if p.pid is not None]
        for r, p in started:
            with contextlib.suppress(Exception):
                if r in self.inboxes:
                    self.inboxes[r].put(("stop",))
                elif p.is_alive():
                    p.terminate()
        for _, p in started:
            p.join(STOP_GRACE_S)
            if p.is_alive():
                p.kill()
                p.join()
        for q in [*self.inboxes.values(), self.replies]:
            q.cancel_join_thread()
            q.close()


def _worker_main(rank: int, world: int, port: int, backend: str, timeout_s: float, threads: int | None,
                 fn: Callable, args: tuple, results: Any) -> None:
    if threads:
        torch.set_num_threads(threads)
    join_group(backend, rank, world, port, timeout_s)
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
    store = host_store(world, timeout_s)
    workers = Workers(_worker_main, range(world),
                      lambda r: (r, world, store.port, backend, timeout_s, threads, fn, args))
    try:
        workers.start()
        seen = workers.gather(range(world), join_timeout_s, grace_s=min(10.0, timeout_s))
        if seen.silent and not seen.dead:
            raise WorkerError(f"band-parallel workers did not finish within {join_timeout_s:.0f} s "
                              f"(ranks {seen.silent} still running)")
        errors = seen.errors()
        if seen.dead or errors:
            msg = [f"rank {r} died (exit code {c})" for r, c in sorted(seen.dead.items())]
            msg += [f"rank {r} raised:\n{v}" for r, v in errors.items()]
            raise WorkerError("band-parallel worker failure: " + "; ".join(msg))
        return [seen.got[r][1] for r in range(world)]
    finally:
        workers.stop()


def _to(t: Any, device: torch.device, copy: bool = False) -> Any:
    """Tensors moved to `device`, also inside dicts and lists (a ControlNet's residuals); with
    `copy`, each one a contiguous copy of its own (one copy, whatever the source's layout)."""
    if isinstance(t, dict):
        return {k: _to(v, device, copy) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        return type(t)(_to(v, device, copy) for v in t)
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().to(device, copy=True, memory_format=torch.contiguous_format) if copy else t.to(device)


def forward_message(x: torch.Tensor, args: tuple, kwargs: dict, convs: Any) -> tuple:
    """serve's ("forward", x, args, kwargs, convs) request, every tensor in it a CPU copy of its own.

    A copy also of CPU tensors: the queue's feeder thread pickles a message after put() returns,
    moving each tensor's storage into shared memory and freeing the old memory under any thread
    still reading it. Rank 0 reads x and the text context for its own band meanwhile; it read
    garbage now and then (tests/test_parallel.py: test_forward_message_copies)."""
    return ("forward", *_to((x, args, kwargs), torch.device("cpu"), copy=True), convs)


def serve(rank: int, world: int, port: int, backend: str, timeout_s: float, device: str,
          builder_file: str, requests: Any, replies: Any) -> None:
    """Worker loop of a persistent band-parallel group (run in a spawned process).

    Replies (rank, "ok", "started"), joins the group at the host's store on `port`, then serves
    messages from `requests`:
    ("load", payload) builds the model with build_unet(payload, device) from `builder_file` (a
    host-specific file loaded by path, so this module stays free of host imports);
    ("forward", x, args, kwargs, convs) runs this rank's band of one forward in step with rank 0,
    with rank 0's conv settings (conv_settings, or None); kwargs may hold `control`, already cut
    to this rank's rows (split_control); ("stop",) leaves. Replies
    (rank, "ok"|"error", text) go to `replies`. The worker also leaves when its parent process
    is gone. The process group is destroyed on the way out.
    """
    import importlib.util

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    replies.put((rank, "ok", "started"))  # the host waits for this before it joins the group
    join_group(backend, rank, world, port, timeout_s)
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
                    replies.put((rank, "ok", "stopped"))
                    return
                if msg[0] == "load":
                    unet = builder.build_unet(msg[1], dev)
                    replies.put((rank, "ok", "loaded"))
                elif msg[0] == "forward":
                    x, args, kwargs = _to(msg[1:4], dev)
                    with conv_settings_applied(unet, msg[4]), band_parallel(unet, timeout_s=timeout_s) as bp, \
                            torch.no_grad():
                        bp.forward(unet, x, *args, **kwargs)
                    replies.put((rank, "ok", "forward"))
            except Exception:
                replies.put((rank, "error", traceback.format_exc()))
                if isinstance(sys.exc_info()[1], BandParallelError) or msg[0] == "load":
                    return  # the group is out of step: rank 0 tears it down
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
