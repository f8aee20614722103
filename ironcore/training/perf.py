"""Peak FLOP/s of the device, so MFU means the same thing on a laptop and on an H100.

GPUs: dense (no sparsity) tensor-core figures from the vendors' data sheets.
CPU: the best observed fp32 matmul rate of this process's threads, measured
once (about half a second) unless the config gives a figure.

Also here: the host-allocator setting that keeps a CPU training step from
paying page faults for memory it freed a moment ago.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import time

import torch

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


def peak_flops(device: torch.device, precision: str, configured_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device for the precision the matmuls run in."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return (bf16 if precision == "bf16" else fp32) * 1e12
        return float("nan")  # unknown GPU: MFU is reported as nan rather than a made-up number
    return measured_cpu_peak()


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
