"""Peak-memory, timing and plotting helpers shared by the bench scripts.

CPU peak memory is the process's resident high-water mark (VmHWM) after resetting it
through /proc/self/clear_refs, minus the resident size just before the measured call.
malloc_trim(0) first hands freed heap memory back to the system, so the call's tensors
cannot hide in memory an earlier call left behind. (Forcing every allocation through mmap
instead, with MALLOC_MMAP_THRESHOLD_, distorts timings many times over: not used.) On
CUDA the peak is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

import torch


def trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the measurement may then read low, never high
        pass


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> tuple[float, int]:
    """(best wall seconds over `repeats` after one warm-up, peak extra bytes of one call)."""
    fn()  # warm-up: lazy inits, allocator caches
    _, peak = measure_once(fn, device)
    best = float("inf")
    for _ in range(repeats):
        best = min(best, measure_once(fn, device, peak=False)[0])
    return best, peak


def measure_once(fn: Callable[[], object], device: torch.device, peak: bool = True) -> tuple[float, int]:
    """(wall seconds, peak extra bytes) of a single call, with no warm-up: for cases that take
    minutes, where a warm-up would triple the run and lazy inits are lost in the noise.
    With peak=False only the time is taken (and 0 returned for the bytes)."""
    cuda = device.type == "cuda"
    base = 0
    if cuda:
        torch.cuda.synchronize()
        if peak:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
    elif peak:
        trim_heap()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status_kib("VmRSS")
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    if not peak:
        return seconds, 0
    used = torch.cuda.max_memory_allocated() - base if cuda else (status_kib("VmHWM") - base) * 1024
    return seconds, max(0, used)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def run_child(cmd: list[str], timeout: float) -> dict:
    """Run one bench case in a fresh process (clean high-water mark) and parse the JSON it
    prints last. A case past `timeout` seconds is stopped: {"stopped": True, "why": ...}."""
    import json
    import subprocess

    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"stopped": True, "why": f"ran past {timeout:.0f} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        err = out.stderr.strip().splitlines()
        return {"error": (err[-1] if err else f"exit code {out.returncode}")[:200]}
    return json.loads(lines[-1])


def plot_loglog(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str, path) -> None:
    """One log-log line per series (name -> [(x, y), ...]) into a PNG; says so if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in series.items():
        if pts:
            ax.loglog(*zip(*sorted(pts)), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
