"""Device peak for MFU, and the host-allocator setting of CPU training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ironcore.training.perf import peak_flops

# Page faults per cycle of a training-step-like pattern: a 64 MiB tensor (above the 32 MiB that glibc always
# serves with mmap) and a 21 MiB one allocated, filled and freed, ten times over.
_CYCLE_FAULTS = """
import resource, sys, torch
from ironcore.training.perf import retain_freed_host_memory
if sys.argv[1] == "retain":
    assert retain_freed_host_memory()
n, faults = 64 * 2**20 // 4, []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(n), torch.ones(n // 3)
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _cycle_faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _CYCLE_FAULTS, mode], capture_output=True, text=True, check=True)
    return [int(x) for x in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_host_memory_is_reused_without_page_faults():
    pages = (64 + 64 // 3) * 2**20 // 4096
    retained = _cycle_faults("retain")
    assert max(retained[-3:]) < pages // 100, retained  # steady state: the freed blocks are reused
    assert min(_cycle_faults("default")[-3:]) > max(retained[-3:])  # glibc's default unmaps and faults them back


def test_peak_flops_configured_or_measured():
    cpu = torch.device("cpu")
    assert peak_flops(cpu, "fp32", configured_tflops=2.5) == 2.5e12
    assert peak_flops(cpu, "fp32") > 1e9
