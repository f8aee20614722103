"""FSDP2 (``trainer.data_parallel: fsdp``) and sharded checkpoints (torch.distributed.checkpoint), under torchrun
on gloo: the same losses and weights as plain data parallelism and as one process, half the bytes per rank at
DP=2, a save that gathers nothing, checkpoints that resume at any layout, a kill during a save that loses
nothing, and readers that consolidate a sharded checkpoint into the tensors a full one holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import ROOT, TINY_MODEL, launch_train, read_metrics, shakespeare_slice
from safetensors.torch import load_file

from ironcore.checkpoints import native, sharded
from ironcore.checkpoints.load import load_weights
from ironcore.cli import main

MODELS = {
    "llama": {**TINY_MODEL, "tie_word_embeddings": False},  # RoPE, GQA, SwiGLU, RMSNorm, untied head
    "gpt2": {"name": "tiny-gpt2", "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 64, "position_embedding": "learned", "norm_type": "layernorm",
             "gated_mlp": False, "activation": "gelu_tanh", "attention_bias": True, "attention_out_bias": True,
             "mlp_bias": True, "tie_word_embeddings": True},  # fmt: skip
}
LOGS: dict[Path, str] = {}


@pytest.fixture(scope="module")
def data_config(tmp_path_factory) -> Path:
    return shakespeare_slice(tmp_path_factory.mktemp("fsdpdata"), 40_000)


def train(data_config: Path, out: Path, nproc: int, *overrides: str, model: str = "llama") -> list[dict]:
    """10 steps (clipping and weight decay on, a checkpoint every 5) of ``model`` on ``nproc`` processes."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": MODELS[model], "data": {"config_path": str(data_config)},
        "trainer": {"micro_batch_size": 2, "output_dir": str(out), "save_interval": 5, "grad_clip": 0.5},
        "operation": {"train_steps": 10, "eval_interval": 5, "eval_steps": 2, "log_interval": 1},
        "optim": {"max_lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.1}, "utils": {"tracking": False},
    }))
    LOGS[out] = launch_train(config, nproc, *overrides)
    return read_metrics(out)


# FSDP at DP=2 of the LLaMA-style model, recomputing its blocks: one run that three tests read (compared with DDP,
# killed during a save and rerun, exported), trained once.
FSDP_LLAMA = ("trainer.data_parallel=fsdp", "trainer.activation_checkpointing=true")


@pytest.fixture(scope="module")
def fsdp_run(data_config, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp_llama") / "fsdp"
    return out, train(data_config, out, 2, *FSDP_LLAMA)


def series(lines: list[dict], key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in lines if key in m}


def assert_same_run(a: list[dict], b: list[dict], run_a: Path, run_b: Path, tol: float = 1e-6) -> None:
    """Losses, validation losses and gradient norms within ``tol`` (relative), the final checkpoints' weights
    (a LoRA run's: its adapters) within ``tol``."""
    for key in ("loss", "val_loss", "grad_norm"):
        x, y = series(a, key), series(b, key)
        assert x.keys() == y.keys() and x
        assert all(abs(x[s] - y[s]) <= tol * abs(x[s]) for s in x), (key, x, y)
    wa, wb = (native.read_model(native.resolve(run))[1] for run in (run_a, run_b))
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=tol) for k in wa), \
        max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_fsdp_equals_ddp_equals_one_process_with_accumulation(data_config, tmp_path, model, request) -> None:
    """For the LLaMA-style model the FSDP run also recomputes its blocks' activations (composes: same numbers)."""
    one = train(data_config, tmp_path / "one", 1, "trainer.gradient_accumulation_steps=2", model=model)
    ddp = train(data_config, tmp_path / "ddp", 2, model=model)
    if model == "llama":
        run, fsdp = request.getfixturevalue("fsdp_run")
    else:
        run = tmp_path / "fsdp"
        fsdp = train(data_config, run, 2, "trainer.data_parallel=fsdp", model=model)
    assert "DP 2, fully sharded (FSDP)" in LOGS[run]
    assert (run / "checkpoints/step_0000010/shards/.metadata").is_file()  # sharded by default
    assert not (run / "checkpoints/step_0000010" / native.WEIGHTS).exists()
    assert_same_run(one, ddp, tmp_path / "one", tmp_path / "ddp")
    assert_same_run(ddp, fsdp, tmp_path / "ddp", run)


def resume_from_step_5(source: Path, run: Path, data_config: Path, nproc: int, *overrides: str) -> list[dict]:
    """A copy of ``source`` cut back to its step-5 checkpoint, resumed for steps 6-10 at another layout."""
    shutil.copytree(source, run)
    for folder in (run / "checkpoints").glob("step_*"):
        if folder.name != "step_0000005":
            shutil.rmtree(folder)
    native.update_latest(run / "checkpoints", run / "checkpoints/step_0000005")
    return train(data_config, run, nproc, *overrides)


@pytest.mark.slow
def test_fsdp_with_tensor_parallelism_and_resharding_on_resume(data_config, tmp_path) -> None:
    """FSDP x TP on 4 processes = TP=2; its sharded step-5 checkpoint resumes in one process, at zero1 DP=2 and
    at fsdp DP=4 (same global batch), each with the uninterrupted run's losses."""
    tp2 = train(data_config, tmp_path / "tp2", 2, "--tensor-model-parallel-size", "2",
                "trainer.gradient_accumulation_steps=2")  # fmt: skip
    both = train(data_config, tmp_path / "fsdp_tp", 4, "--tensor-model-parallel-size", "2",
                 "trainer.data_parallel=fsdp", "trainer.sequence_parallel=true")  # fmt: skip
    assert "TP 2 x DP 2, sequence parallel, fully sharded (FSDP)" in LOGS[tmp_path / "fsdp_tp"]
    assert_same_run(tp2, both, tmp_path / "tp2", tmp_path / "fsdp_tp")
    layouts = {
        "one": (1, "trainer.gradient_accumulation_steps=2"),
        "zero1": (2, "trainer.data_parallel=zero1"),
        "fsdp4": (4, "trainer.data_parallel=fsdp", "trainer.micro_batch_size=1"),
    }
    uninterrupted = series(both)
    for name, (nproc, *overrides) in layouts.items():
        resumed = series(resume_from_step_5(tmp_path / "fsdp_tp", tmp_path / name, data_config, nproc, *overrides))
        assert "resumed from" in LOGS[tmp_path / name] and "at step 5" in LOGS[tmp_path / name]
        assert all(abs(resumed[s] - uninterrupted[s]) <= 1e-6 * uninterrupted[s] for s in range(6, 11)), \
            (name, resumed, uninterrupted)


@pytest.mark.slow
def test_lora_with_fsdp_trains_the_adapters_of_ddp(data_config, tmp_path) -> None:
    """LoRA composes: FSDP shards the frozen base and the adapters; the checkpoint holds the adapters' shards only."""
    lora = "model.lora={rank: 4, alpha: 8}"
    ddp = train(data_config, tmp_path / "ddp", 2, lora)
    fsdp = train(data_config, tmp_path / "fsdp", 2, lora, "trainer.data_parallel=fsdp")
    assert_same_run(ddp, fsdp, tmp_path / "ddp", tmp_path / "fsdp")
    saved = sharded.saved_tensors(tmp_path / "fsdp/checkpoints/step_0000010")
    weights = [k for k in saved if k.startswith(native.MODEL_PREFIX)]
    assert weights and all(".lora." in k for k in weights)


def test_offload_in_one_process_trains_as_one_process(data_config, tmp_path) -> None:
    """``offload: params`` at DP size 1 (one GPU's case: weights and AdamW in host memory) still runs FSDP, on a
    group of one, with the plain run's losses and weights; its sharded checkpoint holds every weight."""
    plain = train(data_config, tmp_path / "plain", 1)
    offload = train(data_config, tmp_path / "offload", 1, "trainer.data_parallel=fsdp", "trainer.offload=params")
    assert_same_run(plain, offload, tmp_path / "plain", tmp_path / "offload")
    assert (tmp_path / "offload/checkpoints/step_0000010/shards/.metadata").is_file()


KILLER = """
import os, signal, sys
from pathlib import Path
from ironcore.checkpoints import native, sharded
write = native.write_model_files
def killed(folder, *args, **kwargs):  # rank 0, after every rank wrote its shards of step 10, before the rename
    if Path(folder).name.startswith(".step_0000010"):
        os.kill(os.getpid(), signal.SIGKILL)
    return write(folder, *args, **kwargs)
native.write_model_files = killed
from ironcore.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_save_killed_with_sigkill_leaves_latest_loadable(data_config, fsdp_run, tmp_path) -> None:
    """SIGKILL while step 10's shards are on disk but its folder is not complete: ``latest`` still names step 5,
    nothing named step 10 looks complete, and the rerun ends where an uninterrupted run does."""
    source, straight = fsdp_run
    run = tmp_path / "killed"
    config = tmp_path / "killed.yaml"
    config.write_text((source.parent / f"{source.name}.yaml").read_text().replace(str(source), str(run)))
    (tmp_path / "killer.py").write_text(KILLER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", str(tmp_path / "killer.py"), "train",
           "--config", str(config), *FSDP_LLAMA]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    checkpoints = run / "checkpoints"
    assert native.pointed(checkpoints) == checkpoints / "step_0000005"
    assert not (checkpoints / "step_0000010").exists()
    assert list(checkpoints.glob(".step_0000010*/shards/__1_0.distcp"))  # killed with the shards written
    resumed = train(data_config, run, 2, *FSDP_LLAMA)
    assert "at step 5" in LOGS[run]
    assert series(resumed) == series(straight)
    assert not list(checkpoints.glob(".step_*"))  # the rerun removed the killed save's temporary folder


@pytest.mark.slow
def test_a_sharded_checkpoint_exports_and_loads_the_tensors_of_a_full_one(data_config, fsdp_run, tmp_path,
                                                                          capsys) -> None:  # fmt: skip
    """The same FSDP run saved both ways: ``convert --to-hf`` writes bit-identical tensors, and ``load_model``
    (what generate and eval read) gives bit-identical weights."""
    runs = {"sharded": fsdp_run[0], "full": tmp_path / "full"}
    train(data_config, runs["full"], 2, *FSDP_LLAMA, "trainer.checkpoint_format=full")
    assert (runs["full"] / "checkpoints/step_0000010" / native.WEIGHTS).is_file()
    exported = {}
    for name, run in runs.items():
        assert main(["convert", "--to-hf", "--checkpoint", str(run), "--output", str(tmp_path / f"hf_{name}")]) == 0
        exported[name] = load_file(tmp_path / f"hf_{name}" / "model.safetensors")
    assert exported["sharded"].keys() == exported["full"].keys()
    assert all(torch.equal(exported["sharded"][k], exported["full"][k]) for k in exported["full"])
    sharded, full = load_weights(runs["sharded"]), load_weights(runs["full"])
    assert all(torch.equal(sharded[k], full[k]) for k in full)


def torchrun_worker(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", str(ROOT / "tests" / "fsdp_worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fsdp_holds_half_of_ddps_bytes_at_dp2_as_planned(tmp_path) -> None:
    """Parameters, gradients and optimizer states per rank after a step: the planner's bytes exactly, and half of
    DDP's plus FSDP's padding (hidden size 63: the tensors of 63 or 105 rows do not halve, rank 0 holds the
    larger half and every rank a shard of that size)."""
    torchrun_worker("bytes", str(tmp_path))
    result = json.loads((tmp_path / "bytes.json").read_text())
    for layout in ("ddp", "fsdp"):
        assert result[layout]["measured"] == result[layout]["planned"], layout
    ddp, fsdp = result["ddp"]["measured"], result["fsdp"]["measured"]
    for full, half in zip(ddp, fsdp):
        assert full / 2 < half <= full / 2 + 0.01 * full  # padded, by less than a row per tensor


def test_a_sharded_save_holds_nothing_beyond_a_ranks_own_shards(tmp_path) -> None:
    """Peak resident memory of a rank while saving, beyond what it held before: a sharded save stays under 5 % of
    the rank's own state (a bounded buffer), the gathered full save needs the full state and more."""
    torchrun_worker("save", str(tmp_path), str(ROOT / "examples" / "data" / "gpt2"))
    result = json.loads((tmp_path / "save.json").read_text())
    own = result["sharded"]["own"]
    assert result["sharded"]["growth"] < 0.05 * own
    assert result["full"]["growth"] > 2 * own  # every full tensor, weights and both moments, on each rank


@pytest.fixture(scope="module")
def sharded_run(data_config, tmp_path_factory) -> Path:
    """10 steps in one process with sharded checkpoints at steps 5 and 10."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    train(data_config, run, 1, "trainer.checkpoint_format=sharded")
    return run


@pytest.mark.parametrize("damage", ["metadata", "shard", "code"])
def test_a_damaged_sharded_checkpoint_falls_back_to_the_one_before(data_config, sharded_run, tmp_path,
                                                                   damage) -> None:  # fmt: skip
    """A sharded checkpoint (one process, ``checkpoint_format: sharded``) whose metadata or data file is damaged,
    or whose metadata pickle would run code, is named in a warning and the run resumes from step 5; the pickle's
    code never runs."""
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    shards = run / "checkpoints/step_0000010/shards"
    marker = tmp_path / "ran"
    if damage == "metadata":
        (shards / ".metadata").write_bytes(b"\x80\x04garbage")
    elif damage == "shard":
        (shards / "__0_0.distcp").write_bytes((shards / "__0_0.distcp").read_bytes()[:1000])
    else:  # a pickle that would call os.system if it were unpickled freely
        (shards / ".metadata").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    lines = train(data_config, run, 1, "trainer.checkpoint_format=sharded", "operation.train_steps=12")
    assert "cannot resume from step_0000010" in LOGS[run] and "resuming from" in LOGS[run]
    assert str(shards) in LOGS[run]
    assert "at step 5" in LOGS[run] and max(series(lines)) == 12
    assert not marker.exists()
