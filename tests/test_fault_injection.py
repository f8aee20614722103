"""Fault injection: every command, every file it reads or writes, every way that file can be bad.

One table of (command, file) rows and one of bad variants (missing, empty, truncated, garbage, a
directory in its place, unreadable). Each cell runs the command on a copy of a small, complete world
(data, shards, a trained run, an HF folder) with that one file damaged, and expects exit 2 and one
error line that names the file. Outputs get the same treatment: an existing file where a folder goes,
a folder under a file, a folder without write permission. Permission cells need a process that permissions apply
to: under root they run in one subprocess that has given up root's permission-override capabilities.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import yaml
from run_helpers import TINY_MODEL

from ironcore.cli import main

ROOT = Path(__file__).resolve().parents[1]
STEP = "run/checkpoints/step_0000004"
TRAIN = "train --config train.yaml operation.train_steps=6"
# Damaged bytes that no reader accepts: not UTF-8, not JSON, not YAML, not a zip or safetensors header.
GARBAGE = bytes(range(256))[::-1] * 4
VARIANTS = ("missing", "empty", "truncated", "garbage", "directory", "unreadable")

# (command run from the world folder, the file it reads, variants that do not apply and why)
READS: list[tuple[str, str, set[str]]] = [
    (TRAIN, "train.yaml", {"truncated"}),  # half a YAML file can still be a valid, smaller config
    (TRAIN, "data.yaml", {"truncated"}),
    (TRAIN, "shards/metadata.json", set()),
    (TRAIN, "shards/train.bin", set()),
    (TRAIN, "shards/train.idx", set()),
    (TRAIN, "shards/valid.idx", set()),
    (TRAIN, "shards/tokenizer.json", set()),
    (TRAIN, f"{STEP}/model.safetensors", set()),
    (TRAIN, f"{STEP}/optimizer.pt", set()),
    (TRAIN, f"{STEP}/rng.pt", set()),
    (TRAIN, f"{STEP}/trainer_state.json", set()),
    (TRAIN, f"{STEP}/model_config.yaml", {"truncated"}),
    (TRAIN, "run/metrics.jsonl", {"missing", "empty", "truncated", "garbage"}),  # torn lines are dropped, with a warning
    ("train --config train.yaml trainer.output_dir=new init.init_from=hf", "hf/config.json", set()),
    ("train --config train.yaml trainer.output_dir=new init.init_from=hf", "hf/model.safetensors", set()),
    ("preprocess --config data.yaml output_dir=fresh", "corpus.txt", {"truncated"}),
    ("preprocess --config data_hf.yaml", "hf/tokenizer.json", set()),
    ("eval --checkpoint run --data-config data.yaml", f"{STEP}/model.safetensors", set()),
    ("eval --checkpoint run --data-config data.yaml", f"{STEP}/model_config.yaml", {"truncated"}),
    ("eval --checkpoint run --data-config data.yaml", "shards/valid.bin", set()),
    ("generate --checkpoint run --prompt To --max-new-tokens 2", f"{STEP}/tokenizer.json", set()),
    ("generate --checkpoint hf --prompt To --max-new-tokens 2", "hf/generation_config.json", {"missing"}),
    ("convert --to-hf --checkpoint run --output out", f"{STEP}/model.safetensors", set()),
    ("convert --from-hf hf --output out", "hf/config.json", set()),
    ("convert --from-hf hf --output out", "hf/model.safetensors", set()),
    ("tokenizer --source corpus.txt --vocab-size 300 --output tok", "corpus.txt", {"truncated"}),
    ("model-info --config train.yaml", "train.yaml", {"truncated"}),
]
# (command, the folder or file it writes)
WRITES: list[tuple[str, str]] = [
    (TRAIN + " trainer.output_dir=out", "out"),
    ("preprocess --config data.yaml output_dir=out", "out"),
    ("eval --checkpoint run --data-config data.yaml --output out/eval.json", "out"),
    ("convert --to-hf --checkpoint run --output out", "out"),
    ("corpus --output out", "out"),
    ("tokenizer --source corpus.txt --vocab-size 300 --output out", "out"),
]
OUTPUT_VARIANTS = ("a file", "under a file", "not writable")


def _cells() -> list[tuple[str, str, str]]:
    cells = [(cmd, target, v) for cmd, target, skip in READS for v in VARIANTS if v not in skip]
    return cells + [(cmd, target, v) for cmd, target in WRITES for v in OUTPUT_VARIANTS]


CELLS = _cells()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Corpus, data config, shards, a trained 4-step run and its HF export, all with relative paths."""
    root = tmp_path_factory.mktemp("world")
    previous, mask = Path.cwd(), os.umask(0o022)
    try:
        os.chdir(root)
        text = (ROOT / "examples" / "data" / "tinyshakespeare.txt").read_text()[:20_000]
        Path("corpus.txt").write_text(text)
        Path("data.yaml").write_text(yaml.safe_dump({
            "name": "faults", "task_type": "pretrain", "source": {"path": "corpus.txt", "document_split": "paragraph"},
            "tokenizer": {"train": {"vocab_size": 512}}, "max_seq_length": 32, "valid_fraction": 0.1,
            "output_dir": "shards", "num_workers": 0,
        }))  # fmt: skip
        Path("train.yaml").write_text(yaml.safe_dump({
            "model": TINY_MODEL, "data": {"config_path": "data.yaml"},
            "trainer": {"micro_batch_size": 4, "output_dir": "run", "save_interval": 0, "device": "cpu"},
            "operation": {"train_steps": 4, "eval_interval": 0, "eval_steps": 1, "log_interval": 1},
            "optim": {"max_lr": 3e-3, "warmup_steps": 1}, "init": {"seed": 3}, "utils": {"tracking": False},
        }))  # fmt: skip
        for args in ("preprocess --config data.yaml --no-progress", "train --config train.yaml",
                     "convert --to-hf --checkpoint run --output hf"):  # fmt: skip
            assert main(shlex.split(args)) == 0, args
        Path("hf/generation_config.json").write_text(json.dumps({"eos_token_id": 0, "do_sample": False}))
        data_hf = {**yaml.safe_load(Path("data.yaml").read_text()), "tokenizer": {"path": "hf"}, "output_dir": "fresh"}
        Path("data_hf.yaml").write_text(yaml.safe_dump(data_hf))
        yield root
    finally:
        os.chdir(previous)
        os.umask(mask)


def damage(path: Path, variant: str) -> None:
    """Make ``path`` (a file, or for outputs a folder to be written) bad in the way ``variant`` says."""
    if variant == "missing":
        path.unlink()
    elif variant == "empty":
        path.write_bytes(b"")
    elif variant == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif variant == "garbage":
        path.write_bytes(GARBAGE)
    elif variant == "directory":
        path.unlink()
        path.mkdir()
    elif variant == "unreadable":
        path.chmod(0)
    elif variant == "a file":
        path.write_text("x")
    elif variant == "under a file":
        path.write_text("x")
    elif variant == "not writable":
        path.mkdir()
        path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    else:
        raise AssertionError(variant)


def prepare(world: Path, case: Path, command: str, target: str, variant: str) -> list[str]:
    """Copy the world to ``case``, damage ``target`` there; returns the command's argv."""
    shutil.copytree(world, case, symlinks=True)
    damage(case / target, variant)
    args = shlex.split(command)
    if variant == "under a file":  # the output goes one level below the file
        args = [re.sub(r"(^|=)out(?=/|$)", r"\1out/below", a) for a in args]
    return args


def names(line: str, path: str) -> bool:
    """Does ``line`` name ``path`` (relative as given, or at the end of an absolute path)?"""
    return re.search(rf"(^|[\s'\"/=]){re.escape(path)}(/|\b|$)", line) is not None


def check(command: str, target: str, variant: str, code: int, err: str) -> str | None:
    """None when the cell behaved (exit 2, one error line naming the file); else what went wrong."""
    errors = [line for line in err.splitlines() if ": error: " in line]
    if code != 2 or len(errors) != 1 or "Traceback" in err:
        return f"{command!r} with {target} {variant}: exit {code}\n{err[-600:]}"
    if not names(errors[0], target) and not (variant == "missing" and names(errors[0], str(Path(target).parent))):
        return f"{command!r} with {target} {variant}: the error does not name {target}: {errors[0]}"
    return None


def run_here(args: list[str], case: Path, capsys) -> tuple[int, str]:
    """``ironcore ARGS`` in ``case``: exit code and stderr (an escaped exception is its traceback)."""
    previous = Path.cwd()
    os.chdir(case)
    try:
        code = main(args)
    except BaseException:  # noqa: BLE001 - the table reports every cell, not the first to fail
        code = -1
        print(traceback.format_exc(), file=sys.stderr)
    finally:
        os.chdir(previous)
    return code, capsys.readouterr().err


# Runs the unreadable / not-writable cells in one process that file permissions apply to (CI runs as root).
WITHOUT_OVERRIDE = f"""
import json, os, sys, traceback
sys.path.insert(0, {str(ROOT / "tests")!r})
from run_helpers import drop_permission_override
drop_permission_override()
from ironcore.cli import main
results = []
for case, args in json.loads(sys.argv[1]):
    os.chdir(case)
    with open(case + ".err", "w") as err:  # fd 2 itself: log handlers keep the sys.stderr they were given
        os.dup2(err.fileno(), 2)
    try:
        code = main(args)
    except BaseException:
        code = -1
        traceback.print_exc()
    sys.stderr.flush()
    results.append(code)
sys.__stdout__.write("\\n" + json.dumps(results))
"""


def test_every_bad_file_and_output_is_one_line_naming_it(world, tmp_path, capsys) -> None:
    cases = tmp_path / "cases"
    failures, as_root = [], []
    previous_mask = os.umask(0o022)
    try:
        for n, (command, target, variant) in enumerate(CELLS):
            case = cases / f"case{n:03d}"
            args = prepare(world, case, command, target, variant)
            if variant in ("unreadable", "not writable") and os.geteuid() == 0:
                as_root.append((n, str(case), args))
                continue
            code, err = run_here(args, case, capsys)
            failures.append(check(command, target, variant, code, err))
        if as_root:
            payload = json.dumps([(case, args) for _, case, args in as_root])
            proc = subprocess.run([sys.executable, "-c", WITHOUT_OVERRIDE, payload], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            for (n, case, _), code in zip(as_root, json.loads(proc.stdout.splitlines()[-1])):
                command, target, variant = CELLS[n]
                failures.append(check(command, target, variant, code, Path(case + ".err").read_text()))
    finally:
        os.umask(previous_mask)
        shutil.rmtree(cases, ignore_errors=True)
    failures = [f for f in failures if f]
    assert not failures, f"{len(failures)} of {len(CELLS)} cells:\n\n" + "\n\n".join(failures)
