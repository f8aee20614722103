"""Small training runs for the trainer, objective and DPO tests: data, a tiny model, configs, metric lines."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ironcore.config import Config, build_config
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[1]
# Where the tests marked `device` run: cpu, or cuda (benchmarks/gpu_check.sh sets IRONCORE_TEST_DEVICE).
DEVICE = os.environ.get("IRONCORE_TEST_DEVICE", "cpu")
# A 2-layer LLaMA-style model (GQA, SwiGLU, RoPE) for a 512-token BPE: trains in seconds on a CPU.
TINY_MODEL = {
    "name": "tiny", "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 64, "position_embedding": "rope", "norm_type": "rmsnorm", "gated_mlp": True,
    "activation": "silu", "ffn_hidden_size": 128, "num_key_value_heads": 2,
}


def shakespeare_slice(root: Path, characters: int, start: int = 0) -> Path:
    """``characters`` of tinyshakespeare from ``start`` preprocessed with a 512-token BPE trained on them
    (32 positions, 10 % validation) in ``root``; returns the data config path."""
    text = (ROOT / "examples" / "data" / "tinyshakespeare.txt").read_text()
    (root / "corpus.txt").write_text(text[start : start + characters])
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({
        "name": "shakespeare-slice", "task_type": "pretrain",
        "source": {"path": str(root / "corpus.txt"), "document_split": "paragraph"},
        "tokenizer": {"train": {"vocab_size": 512}}, "max_seq_length": 32, "valid_fraction": 0.1,
        "output_dir": str(root / "out"), "num_workers": 0,
    }))
    preprocess(load_data_config(path), progress=False)
    return path


def small_run_config(model: dict[str, Any], data_config: Path, out: Path, train_steps: int, **overrides: Any) -> Config:
    """A single-process run of ``train_steps`` steps on DEVICE, no tracking; ``group__key=value`` overrides."""
    raw: dict[str, Any] = {
        "model": dict(model),
        "data": {"config_path": str(data_config)},
        "trainer": {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "output_dir": str(out),
                    "save_interval": 0, "device": DEVICE},
        "operation": {"train_steps": train_steps, "eval_interval": 0, "eval_steps": 2, "log_interval": 1},
        "optim": {"max_lr": 3e-3, "warmup_steps": 2, "min_lr": 3e-4},
        "init": {"seed": 3},
        "utils": {"tracking": False},
    }
    for key, value in overrides.items():
        group, name = key.split("__")
        raw.setdefault(group, {})[name] = value
    return build_config(raw, world_size=1)


def read_metrics(out: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def launch_train(config: Path, nproc: int, *overrides: str, tests_importable: bool = False) -> str:
    """``ironcore train`` in a subprocess: torchrun (single-node c10d rendezvous) when nproc > 1; its log
    (stderr). ``tests_importable``: test modules can be named in the config (e.g. a reward function
    ``test_x:fn``)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "ironcore", "train", "--config", str(config), *overrides]
    path = f"{ROOT}{os.pathsep}{ROOT / 'tests'}" if tests_importable else str(ROOT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def drop_permission_override() -> None:
    """Make this process subject to file permissions even as root (CI runs as root): drop CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from its effective capabilities. Nothing to do for other users."""
    if os.geteuid() != 0:
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc, header, caps = ctypes.CDLL(None, use_errno=True), Header(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(header), caps) == 0, os.strerror(ctypes.get_errno())
    caps[0].effective &= ~0b110  # bits 1 and 2
    assert libc.capset(ctypes.byref(header), caps) == 0, os.strerror(ctypes.get_errno())


def cli_subprocess(args: list[str], cwd: Path, env: dict[str, str] | None = None,
                   permissions: bool = False) -> subprocess.CompletedProcess:
    """``ironcore ARGS`` in a fresh process (its stderr exactly as a user sees it); ``permissions=True`` makes
    file permissions apply to it even under root (see :func:`drop_permission_override`)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from run_helpers import drop_permission_override; "
            f"{'drop_permission_override(); ' if permissions else ''}"
            "from ironcore.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)

