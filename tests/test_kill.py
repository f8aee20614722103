"""SIGKILL at seeded points of preprocessing and training: the rerun finishes with the results of an
uninterrupted run, and no worker process or temporary folder outlives the killed one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from run_helpers import TINY_MODEL, shakespeare_slice

from ironcore.checkpoints.load import load_weights

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
SEEDS = (11, 12)


def ironcore(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "ironcore", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 8 MB of text: long enough to be killed in the middle of preprocessing."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text((EXAMPLES / "tinyshakespeare.txt").read_text() * 7)
    return path


def data_config(root: Path, corpus: Path, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": "kill", "source": {"path": str(corpus)}, "tokenizer": {"path": str(EXAMPLES / "gpt2")},
        "max_seq_length": 128, "output_dir": str(root / name), "num_workers": 2,
    }))
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("seed", SEEDS)
def test_killed_preprocess_leaves_no_workers_and_its_rerun_builds_the_same_shards(corpus, tmp_path, seed) -> None:
    finish(ironcore("preprocess", "--config", str(data_config(tmp_path, corpus, "straight")), "--no-progress"))
    config = data_config(tmp_path, corpus, "killed")
    process = ironcore("preprocess", "--config", str(config), "--no-progress")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob(".killed.tmp-*/train.bin")):
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 1.0))  # a seeded point in the middle of the work
    workers = children(process.pid)
    assert workers and process.poll() is None, "preprocessing ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if alive(w)], "worker processes outlived their parent"
    assert list(tmp_path.glob(".killed.tmp-*")) and not (tmp_path / "killed").exists()  # nothing looks complete
    finish(ironcore("preprocess", "--config", str(config), "--no-progress"))
    assert not list(tmp_path.glob(".killed.tmp-*"))  # the rerun removed the killed run's temporaries
    for name in ("train.bin", "train.idx"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory) -> Path:
    return shakespeare_slice(tmp_path_factory.mktemp("pretrain"), 30_000)


def train_config(root: Path, data: Path, run: Path) -> Path:
    path = root / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "data": {"config_path": str(data)},
        "trainer": {"micro_batch_size": 4, "output_dir": str(run), "save_interval": 2},
        "operation": {"train_steps": 12, "eval_interval": 0, "log_interval": 1},
        "optim": {"max_lr": 3e-3, "warmup_steps": 2}, "init": {"seed": 5}, "utils": {"tracking": False},
    }))
    return path


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_training_reruns_to_the_weights_of_an_uninterrupted_run(pretrain, tmp_path, seed) -> None:
    finish(ironcore("train", "--config", str(train_config(tmp_path, pretrain, tmp_path / "straight"))))
    run = tmp_path / "killed"
    config = train_config(tmp_path, pretrain, run)
    kill_after = random.Random(seed).randint(3, 9)  # a seeded step: before, at or after a checkpoint
    process = ironcore("train", "--config", str(config))
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.01)
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    stale = run / "checkpoints" / ".step_0000099.tmp-999999999-x"  # a save killed mid-write, from a dead process
    stale.mkdir(parents=True)
    finish(ironcore("train", "--config", str(config)))
    assert not stale.exists()
    straight, killed = load_weights(tmp_path / "straight"), load_weights(run)
    assert all((straight[k] == killed[k]).all() for k in straight)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 13))
