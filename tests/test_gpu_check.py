"""benchmarks/gpu_check.sh: where no GPU is visible it stops at once, clearly, and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_a_gpu_is_one_line_and_exit_2(tmp_path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GPU_CHECK_OUT=str(out), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("gpu_check: no CUDA device visible to torch (torch ") and "GPU machine" in line
    assert not out.exists()
