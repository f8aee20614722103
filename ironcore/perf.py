"""Peak FLOP/s of the device, so MFU means the same thing on a laptop and on an H100.

GPUs: dense (no sparsity) tensor-core figures from the vendors' data sheets.
CPU: the best observed fp32 matmul rate of this process's threads, measured
once (about half a second) unless the config gives a figure.
"""

from __future__ import annotations

import functools
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
