"""Reliability: no lost run, no silent garbage, no code run from a run folder, one line for every mistake.

One test per defect class (the numbers are those of the reliability issue), then a table of bad paths
and files: every command, every file it reads or writes, exit 2 and one line naming the path.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import TINY_MODEL, cli_subprocess, read_metrics, shakespeare_slice

import ironcore.training.checkpointing as checkpointing
from ironcore.checkpoints import native
from ironcore.cli import main
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.files import describe_os_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_a(tmp_path_factory) -> Path:
    return shakespeare_slice(tmp_path_factory.mktemp("a"), 30_000)


@pytest.fixture(scope="module")
def data_b(tmp_path_factory) -> Path:
    """Other text, another 512-token BPE: the same vocabulary size, other meanings of the ids."""
    return shakespeare_slice(tmp_path_factory.mktemp("b"), 30_000, start=400_000)


def write_config(path: Path, data: Path, run: Path, **groups: dict) -> Path:
    raw = {
        "model": TINY_MODEL, "data": {"config_path": str(data)},
        "trainer": {"micro_batch_size": 4, "output_dir": str(run), "save_interval": 2},
        "operation": {"train_steps": 4, "eval_interval": 0, "eval_steps": 1, "log_interval": 1},
        "optim": {"max_lr": 3e-3, "warmup_steps": 1}, "init": {"seed": 3}, "utils": {"tracking": False},
    }
    for group, values in groups.items():
        raw.setdefault(group, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """``ironcore ARGS`` in this process: exit code and stderr."""
    code = main(list(args))
    return code, capsys.readouterr().err.strip()


def one_line(err: str) -> str:
    """The error line of a failed command (asserting it is one line)."""
    lines = [line for line in err.splitlines() if line.startswith("ironcore ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


# ---- 1. the non-finite guard never saves, or prunes towards, a broken state ---------------------------------


def test_non_finite_steps_go_back_to_the_last_healthy_checkpoint(data_a, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", data_a, run, trainer={"save_interval": 1, "keep_last_checkpoints": 1},
                          operation={"train_steps": 10})
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    # Resume with a learning rate that ruins the weights: its first steps may still be finite and get saved.
    code, err = run_cli(capsys, "train", "--config", str(config), "optim.max_lr=1e6", "operation.train_steps=40")
    line = one_line(err)
    assert code == 2 and "non-finite" in line and "step_0000010 is the newest healthy checkpoint" in line, line
    checkpoints = run / "checkpoints"
    assert native.pointed(checkpoints) == checkpoints / "step_0000010"  # not pruned, and `latest` again
    assert native.pointed(checkpoints, native.HEALTHY) == checkpoints / "step_0000010"
    # With a sane learning rate the run continues from step 10 and stays finite.
    assert run_cli(capsys, "train", "--config", str(config), "operation.train_steps=12")[0] == 0
    after = losses(run)
    assert sorted(after)[-2:] == [11, 12] and all(v == v and v < 10 for v in after.values())


# ---- 2. a checkpoint's tokenizer must be the data's -------------------------------------------------------


def test_a_checkpoint_refuses_data_of_another_tokenizer(data_a, data_b, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--config", str(write_config(tmp_path / "a.yaml", data_a, run)))[0] == 0
    checks = {
        "eval": ("eval", "--checkpoint", str(run), "--data-config", str(data_b)),
        "resume": ("train", "--config", str(write_config(tmp_path / "b.yaml", data_b, run)), "operation.train_steps=6"),
        "init_from": ("train", "--config", str(write_config(tmp_path / "c.yaml", data_b, tmp_path / "new",
                                                            init={"init_from": str(run)}))),
        "generate": ("generate", "--checkpoint", str(run), "--prompt", "To be", "--max-new-tokens", "8",
                     "--tokenizer", str(Path(load_data_config(data_b).output_dir))),
    }
    for name, args in checks.items():
        code, err = run_cli(capsys, *args)
        assert code == 2 and "the tokenizer saved with it is not" in one_line(err), (name, err)
    overrides = {"eval": ["--allow-other-tokenizer"], "resume": ["data.allow_other_tokenizer=true"],
                 "init_from": ["data.allow_other_tokenizer=true"], "generate": ["--allow-other-tokenizer"]}
    for name, args in checks.items():
        assert run_cli(capsys, *args, *overrides[name])[0] == 0, name


# ---- 3. a torn metrics line does not block resume ------------------------------------------------------------


def test_a_torn_metrics_line_is_dropped_on_resume(data_a, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", data_a, run)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.1, "lr"')  # the disk filled up mid-line
    assert run_cli(capsys, "train", "--config", str(config), "operation.train_steps=6")[0] == 0
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    assert not list(run.glob(".metrics.jsonl.tmp-*"))


# ---- 4. nothing evaluated is no result; no steps is no run ----------------------------------------------------


def test_empty_evaluations_and_runs_are_refused(data_a, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", data_a, run)
    code, err = run_cli(capsys, "train", "--config", str(config), "operation.train_steps=0")
    assert code == 2 and "operation.train_steps': must be >= 1" in one_line(err)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    for args, message in ((("--max-batches", "0"), "--max-batches must be >= 1"),
                          (("--micro-batch-size", "0"), "--micro-batch-size must be >= 1")):
        code, err = run_cli(capsys, "eval", "--checkpoint", str(run), *args)
        assert code == 2 and message in one_line(err)


# ---- 5. nothing read from a run folder can run code -------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_a_crafted_rng_file_is_refused_and_runs_nothing(data_a, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", data_a, run, trainer={"save_interval": 0})
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    _Payload.marker = tmp_path / "pwned"
    latest = run / "checkpoints" / "step_0000004"
    torch.save(_Payload(), latest / native.RNG)  # loading it with weights_only=False would run the command
    code, err = run_cli(capsys, "train", "--config", str(config), "operation.train_steps=6")
    assert code == 2 and "refusing to load it" in one_line(err) and str(latest / native.RNG) in err
    assert not _Payload.marker.exists()


def test_no_unsafe_deserialisation_in_the_package() -> None:
    unsafe = re.compile(r"weights_only=False|pickle\.loads?\(|yaml\.load\(|allow_pickle=True")
    hits = [f"{p}:{n}" for p in (ROOT / "ironcore").rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if unsafe.search(line)]
    assert not hits, hits


# ---- 6. outputs follow the umask ------------------------------------------------------------------------------


def test_outputs_are_readable_by_the_group_under_umask_022(data_a, tmp_path, capsys) -> None:
    previous = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert run_cli(capsys, "train", "--config", str(write_config(tmp_path / "t.yaml", data_a, run)))[0] == 0
        preprocess(load_data_config(data_a, [f"output_dir={tmp_path / 'shards'}"]), progress=False)
    finally:
        os.umask(previous)
    for folder in (run / "checkpoints" / "step_0000004", tmp_path / "shards"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in folder.iterdir() if p.is_file()), folder


# ---- 7, 8. a checkpoint that does not load ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["weights", "optimizer", "rng", "trainer_state", "missing_folder"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(data_a, tmp_path, capsys, caplog, damage) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", data_a, run)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    latest = run / "checkpoints" / "step_0000004"
    damaged = {"weights": latest / native.WEIGHTS, "optimizer": latest / native.OPTIMIZER,
               "rng": latest / native.RNG, "trainer_state": latest / native.TRAINER_STATE}.get(damage)
    if damaged is None:
        shutil.rmtree(latest)
    else:
        damaged.write_bytes(damaged.read_bytes()[: len(damaged.read_bytes()) // 2])
    assert run_cli(capsys, "train", "--config", str(config), "operation.train_steps=6")[0] == 0
    assert f"cannot resume from {latest.name}" in caplog.text and "step_0000002" in caplog.text
    assert sorted(losses(run))[-4:] == [3, 4, 5, 6]  # steps 3 and 4 were run again from step 2


@pytest.mark.parametrize("pointer", ["", "\n", "nothing", "step_0000099"])
def test_a_latest_pointer_that_names_no_checkpoint_resumes_from_the_newest(data_a, tmp_path, capsys, caplog,
                                                                           pointer) -> None:
    """An empty ``latest``, or one naming a folder that is not there: a warning, and the newest checkpoint that
    loads; ``eval`` and ``convert`` of the run folder use the newest complete checkpoint the same way."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", data_a, run)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    (run / "checkpoints" / native.LATEST).write_text(pointer)
    assert native.pointed(run / "checkpoints") is None
    assert run_cli(capsys, "train", "--config", str(config), "operation.train_steps=6")[0] == 0
    assert "cannot resume from" in caplog.text and "resuming from" in caplog.text, caplog.text
    assert sorted(losses(run))[-2:] == [5, 6] and 4 in losses(run)  # continued after step 4, nothing run again
    (run / "checkpoints" / native.LATEST).write_text(pointer)
    caplog.clear()
    assert native.resolve(run) == run / "checkpoints" / "step_0000006"
    assert "step_0000006, the newest complete checkpoint" in caplog.text
    assert run_cli(capsys, "convert", "--to-hf", "--checkpoint", str(run), "--output", str(tmp_path / "hf"))[0] == 0
    for folder in (run / "checkpoints").glob("step_*"):
        shutil.rmtree(folder)
    code, err = run_cli(capsys, "convert", "--to-hf", "--checkpoint", str(run), "--output", str(tmp_path / "hf2"))
    assert code == 2 and "no complete checkpoint is left" in one_line(err)


def test_resuming_at_another_data_parallel_size_is_said_once(data_a, tmp_path, capsys, caplog) -> None:
    """A checkpoint written by two data-parallel ranks (two RNG states) resumed by one process: one warning
    (GRPO's rollouts and the ranks' random states differ from a run at the saved size: docs/rl.md)."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", data_a, run)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    rng = run / "checkpoints" / "step_0000004" / native.RNG
    torch.save(torch.load(rng, weights_only=True) * 2, rng)  # as saved by world size 2 at TP 1
    assert run_cli(capsys, "train", "--config", str(config), "operation.train_steps=6")[0] == 0
    said = [r.getMessage() for r in caplog.records if "data-parallel size" in r.getMessage()]
    assert len(said) == 1 and "saved at data-parallel size 2, this run has 1" in said[0], said
    caplog.clear()
    assert run_cli(capsys, "train", "--config", str(config), "operation.train_steps=8")[0] == 0
    assert "data-parallel size" not in caplog.text  # step 6 was saved by this layout


def test_resuming_with_another_optimizer_is_one_line(data_a, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", data_a, run)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    code, err = run_cli(capsys, "train", "--config", str(config), "optim.optimizer=sgd", "operation.train_steps=6")
    assert code == 2 and "was optim.optimizer changed?" in one_line(err)


# ---- 9. a chat template that refuses a record ------------------------------------------------------------------


def test_a_record_the_chat_template_refuses_is_a_bad_record(tmp_path, chat_tokenizer_dir) -> None:
    from ironcore.errors import DataError

    folder = tmp_path / "tok"
    shutil.copytree(chat_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text((ROOT / "tests/data/chat_templates/gemma.jinja").read_text())
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "system", "content": "no"}, {"role": "user", "content": "x"},
                          {"role": "assistant", "content": "y"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({
        "name": "chat", "task_type": "sft", "source": {"path": str(tmp_path / "chat.jsonl")},
        "fields": {"messages": "messages"}, "tokenizer": {"path": str(folder)}, "output_dir": str(tmp_path / "out"),
        "num_workers": 0}))
    with pytest.raises(DataError, match=r"chat\.jsonl:2: chat template: System role not supported"):
        preprocess(load_data_config(config), progress=False)
    metadata = preprocess(load_data_config(config, ["on_bad_record=skip"]), progress=False)
    assert metadata["counts"]["bad_records"] == 1 and metadata["splits"]["train"]["documents"] == 1


# ---- 10, 11. bad paths and arguments: exit 2, one line (every file of every command: test_fault_injection.py) ------


def test_bad_arguments_are_one_line_before_any_work(data_a, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--config", str(write_config(tmp_path / "t.yaml", data_a, run)))[0] == 0
    big_vocab = tmp_path / "big_vocab"
    shutil.copytree(ROOT / "examples" / "data" / "gpt2", big_vocab)
    cases = [
        (("eval", "--checkpoint", str(run), "--output", str(tmp_path)), f"{tmp_path}: is a folder"),
        (("generate", "--checkpoint", str(run), "--prompt", "x", "--temperature", "nan"), "temperature"),
        (("generate", "--checkpoint", str(run), "--prompt", "the university", "--tokenizer", str(big_vocab),
          "--allow-other-tokenizer"), "outside the model's vocabulary"),
    ]
    for args, named in cases:
        code, err = run_cli(capsys, *args)
        assert code == 2 and named in one_line(err), (args, err)


def test_preprocess_builds_inside_an_output_folder_it_cannot_replace(data_a, tmp_path) -> None:
    """A folder that cannot be renamed -- a mount point, or (tested here, without root's mount) one in a read-only
    parent -- is built in place: the temporary lives inside it and its entries move up, stale ones go."""
    parent = tmp_path / "read-only"
    out = parent / "shards"
    out.mkdir(parents=True)
    parent.chmod(0o555)
    try:
        runs = [cli_subprocess(["preprocess", "--config", str(data_a), "--no-progress", f"output_dir={out}", *extra],
                               cwd=tmp_path, permissions=True) for extra in ([], ["valid_fraction=0"])]
    finally:
        parent.chmod(0o755)
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert "metadata.json" in names and "train.bin" in names and not [n for n in names if ".tmp-" in n]
    assert "valid.bin" not in names  # the second build's folder has no valid split: the first one's is gone
    assert set(json.loads((out / "metadata.json").read_text())["splits"]) == {"train"}


def test_preprocess_builds_inside_a_mount_point(data_a, tmp_path, monkeypatch) -> None:
    """The same for a mount point, which only root could make: ``os.path.ismount`` says so here."""
    import ironcore.files as files

    mounted = tmp_path / "mounted"
    mounted.mkdir()
    monkeypatch.setattr(files.os.path, "ismount", lambda path: Path(path) == mounted)
    inode = mounted.stat().st_ino
    preprocess(load_data_config(data_a, [f"output_dir={mounted}"]), progress=False)
    assert mounted.stat().st_ino == inode  # filled, not replaced by a renamed sibling
    names = sorted(p.name for p in mounted.iterdir())
    assert "metadata.json" in names and "train.bin" in names and not [n for n in names if ".tmp-" in n]


# ---- 12. a full disk ---------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(data_a, tmp_path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", data_a, run)
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if Path(path).name == native.OPTIMIZER and "step_0000004" in str(Path(path).parent.name):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    code, err = run_cli(capsys, "train", "--config", str(config))
    line = one_line(err)
    assert code == 2 and "no space left on device" in line and "step_0000002 is the last complete one" in line
    assert native.pointed(run / "checkpoints") == run / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]  # no temporary left


def test_the_message_of_an_oserror_names_the_path() -> None:
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device"), "/x/y") == "/x/y: no space left on device"
    assert describe_os_error(OSError(errno.EACCES, "Permission denied"), "/x/y") == "/x/y: permission denied"


# ---- MLflow: a store that cannot be written costs one warning line, never the run --------------------------------


@pytest.mark.parametrize("store", ["read-only", "locked"])
def test_an_unwritable_tracking_store_is_one_warning_and_no_stray_mlruns(data_a, tmp_path, store) -> None:
    import sqlite3

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    sqlite3.connect(db).close()
    lock = None
    if store == "read-only":
        db.chmod(0o444)
        db.parent.chmod(0o555)
    else:  # another process holds the write lock for the whole run
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
    config = write_config(tmp_path / "train.yaml", data_a, tmp_path / "run", utils={"tracking": True})
    try:
        proc = cli_subprocess(["train", "--config", str(config)], cwd=tmp_path, permissions=True,
                              env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    finally:
        if lock is not None:
            lock.close()
        db.parent.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in proc.stderr.splitlines()  # the warnings (INFO lines say what MFU and memory are)
             if line.strip() and "step " not in line and not line.startswith("INFO ")]  # fmt: skip
    assert len(noise) == 1 and "MLflow tracking disabled" in noise[0] and str(db) in noise[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlruns").exists()
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]

