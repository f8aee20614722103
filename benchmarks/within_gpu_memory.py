"""Run an ``ironcore`` command as if the GPU had only GIB of memory: a 24 GB consumer card emulated on a bigger
one (``torch.cuda.set_per_process_memory_fraction``; allocations beyond it fail as out-of-memory)::

    python benchmarks/within_gpu_memory.py 24 train --config configs/example.yaml trainer.device=cuda ...

The trainer's first-step log line then holds the memory planner's figure beside
``torch.cuda.max_memory_allocated``; ``benchmarks/gpu_check.sh`` runs its 24 GiB steps through this.
"""

from __future__ import annotations

import sys

import torch

from ironcore.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit("usage: within_gpu_memory.py GIB IRONCORE-ARGS...")
    if not torch.cuda.is_available():
        raise SystemExit("within_gpu_memory.py: no CUDA device")
    gib = float(sys.argv[1])
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), 0)
    print(f"within_gpu_memory: {gib:g} GiB of the {total / 2**30:.1f} GiB of {torch.cuda.get_device_name(0)}",
          flush=True)
    sys.exit(main(sys.argv[2:]))
