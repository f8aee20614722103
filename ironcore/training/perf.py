"""Peak FLOP/s of the device, so MFU means the same thing on a laptop and on an H100.

GPUs: dense (no sparsity) tensor-core figures from the vendors' data sheets.
CPU: the best observed fp32 matmul rate of this process's threads, kept per
CPU model, thread count and torch version in ``cpu_peak.json`` of IronCore's
cache folder (``$IRONCORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/ironcore``,
else ``~/.cache/ironcore``): a rate measured at every start-up on a shared
machine moves with the load, and the same tokens per second would read as
another MFU in each run. Each start-up still measures briefly and keeps the
higher figure: a first measurement made while the machine was busy would
otherwise stay too low for good (MFU above 100 %). Delete the entry to
measure afresh; ``trainer.peak_tflops`` pins a figure of your own.
:func:`device_peak` says which of these a run's MFU is taken against.

Also here: the host-allocator setting that keeps a CPU training step from
paying page faults for memory it freed a moment ago.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import functools
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ironcore.files import write_text_atomically

# name fragment -> (bf16 TFLOP/s, fp32 TFLOP/s without TF32)
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "A10G": (70.0, 31.2),
    "L4": (121.0, 30.3),
    "4090": (165.2, 82.6),
    "3090": (71.0, 35.6),
    "V100": (125.0, 15.7),
}


@functools.cache
def measured_cpu_peak(n: int = 1024, repeats: int = 8) -> float:
    """Best observed fp32 FLOP/s of an n x n matmul on the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


CPU_PEAK_FILE = "cpu_peak.json"


@dataclass(frozen=True)
class Peak:
    """The peak FLOP/s of one device that MFU is taken against, and where the figure comes from."""

    flops: float
    basis: str

    def __str__(self) -> str:
        return f"{format_rate(self.flops)} ({self.basis})"


def format_rate(flops: float) -> str:
    """``1.2e11`` -> ``"120 GFLOP/s"``, ``9.89e14`` -> ``"989 TFLOP/s"``."""
    if not math.isfinite(flops):
        return "unknown FLOP/s"
    return f"{flops / 1e12:,.4g} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.4g} GFLOP/s"


def device_peak(device: torch.device, precision: str, configured_tflops: float | None = None) -> Peak:
    """Peak FLOP/s of one device for the precision the matmuls run in, and its source (see the module doc)."""
    if configured_tflops:
        return Peak(configured_tflops * 1e12, "trainer.peak_tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                kind = "bf16" if precision == "bf16" else "fp32"
                return Peak((bf16 if kind == "bf16" else fp32) * 1e12, f"{name}: data-sheet dense {kind} peak")
        # An unknown GPU: MFU is reported as nan rather than a made-up number.
        return Peak(float("nan"), f"{name} is not in the data-sheet table: set trainer.peak_tflops")
    return cpu_peak()


def cache_dir() -> Path:
    """IronCore's cache folder: ``$IRONCORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/ironcore``, else
    ``~/.cache/ironcore``."""
    if os.environ.get("IRONCORE_CACHE_DIR"):
        return Path(os.environ["IRONCORE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ironcore"


def cpu_peak() -> Peak:
    """This CPU's fp32 matmul peak at this process's thread count: the highest rate measured so far, kept in
    :data:`CPU_PEAK_FILE`, so that later runs of this machine take MFU against the same figure until a start-up
    measures more (a brief measurement each time; a full one when there is no entry)."""
    threads = torch.get_num_threads()
    key = f"{_cpu_name()} | {threads} threads | torch {torch.__version__}"
    path = cache_dir() / CPU_PEAK_FILE
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    what = f"fp32 matmul peak of this CPU at {threads} thread{'s' if threads > 1 else ''}"
    known = isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0
    flops, today = measured_cpu_peak(1024, 2 if known else 16), datetime.date.today().isoformat()
    if known and flops <= entry["flops"]:
        return Peak(float(entry["flops"]), f"{what}, measured {entry.get('measured', 'earlier')}, kept in {path}")
    table[key] = {"flops": flops, "measured": today}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(table, indent=2, sort_keys=True) + "\n")
        kept = f"kept in {path}"
    except OSError:
        kept = f"measured at start-up: {path} cannot be written"
    return Peak(flops, f"{what}, measured {today}, {kept}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def peak_flops(device: torch.device, precision: str, configured_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device for the precision the matmuls run in (:func:`device_peak` without its source)."""
    return device_peak(device, precision, configured_tflops).flops


# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def retain_freed_host_memory() -> bool:
    """Make freed host memory stay in the process for reuse (Linux/glibc); True when applied.

    CPU tensors come from malloc, and glibc serves every block above 32 MiB
    (logits, the embedding gradient, large activations) with fresh ``mmap``
    pages that it unmaps on free: each training step then page-faults and
    zeroes the same gigabytes again, a fifth of a gpt2-small step on CPU.
    Disabling mmap for large blocks and heap trimming (what the jemalloc or
    tcmalloc preload of CPU tuning guides achieves) lets the next step reuse
    them, as CUDA's caching allocator does on GPUs. The cost: the process
    keeps its peak host memory until it exits, and the heap settles only
    after a few steps: glibc's aligned allocations leave small slivers that
    keep a freed block's hole from merging, so the first 2-6 repeats of a
    pattern grow the heap by it (tests/test_perf.py says more).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a trim threshold of -1 disables trimming (mallopt(3)).
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
