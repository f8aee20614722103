"""The trainer: learning, exact resume, accumulation equivalence, SFT loss, signals, tracking, guards."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import TINY_MODEL, read_metrics, shakespeare_slice, small_run_config

import ironcore.training.trainer as trainer_module
from ironcore.checkpoints import native as checkpoint
from ironcore.checkpoints.load import load_weights
from ironcore.config import ConfigError
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.metadata import load_metadata
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.data.samples.batches import StepBatches
from ironcore.data.samples.build import build_dataset
from ironcore.models import TransformerModel
from ironcore.objectives.lm import LMObjective
from ironcore.training.trainer import Trainer, TrainingStopped

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory) -> Path:
    """A preprocessed 60 KB slice of tinyshakespeare with a 512-token BPE; returns its data config path."""
    return shakespeare_slice(tmp_path_factory.mktemp("pretrain"), 60_000)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    path = _write_yaml(root / "data.yaml", {
        "name": "gsm8k-slice", "task_type": "sft", "source": {"path": str(EXAMPLES / "gsm8k" / "gsm8k_train_300.jsonl")},
        "fields": {"prompt": "question", "response": "answer"}, "prompt_template": "Question: {prompt}\nAnswer:\n",
        "tokenizer": {"path": str(EXAMPLES / "gpt2")}, "max_seq_length": 64, "valid_fraction": 0.1,
        "output_dir": str(root / "out"), "num_workers": 0,
    })
    preprocess(load_data_config(path), progress=False)
    return path


def make_config(data_config: Path, out: Path, **overrides):
    model = dict(TINY_MODEL)
    if "sft" in str(data_config):
        model.update(vocab_size=50257, hidden_size=32, ffn_hidden_size=64)
    return small_run_config(model, data_config, out, 8, **overrides)


def train_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


@pytest.mark.device
def test_loss_falls_on_real_text(pretrain_data, tmp_path) -> None:
    cfg = make_config(pretrain_data, tmp_path, operation__train_steps=60, operation__eval_interval=30)
    final = Trainer(cfg).train()
    losses = train_losses(tmp_path)
    assert losses[1] > math.log(512) - 0.5  # starts near uniform over the vocabulary
    assert losses[60] < losses[1] - 1.0
    assert final["val_loss"] < losses[1] - 0.8 and final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))
    evals = [m for m in read_metrics(tmp_path) if "val_loss" in m]
    assert [m["step"] for m in evals] == [30, 60]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(read_metrics(tmp_path)[0])
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "final_eval.json").is_file()
    assert (checkpoint.resolve(tmp_path) / "tokenizer.json").is_file()
    assert checkpoint.resolve(tmp_path).name == "step_0000060"


@pytest.mark.device
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(pretrain_data, tmp_path, precision) -> None:
    """2N steps in one go == N steps, a restart from the step-N checkpoint, N more steps. bf16: the checkpoint
    holds the fp32 master weights (not their bf16 rounding), so the resumed run steps from the same values."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = make_config(pretrain_data, straight, operation__train_steps=8, trainer__save_interval=4,
                      model__dropout=0.1, trainer__precision=precision)
    Trainer(cfg).train()
    # A run that "crashed" right after saving step 4: its checkpoint folder and pointer, nothing else.
    (resumed / "checkpoints").mkdir(parents=True)
    os.system(f"cp -r {straight}/checkpoints/step_0000004 {resumed}/checkpoints/")
    checkpoint.update_latest(resumed / "checkpoints", resumed / "checkpoints" / "step_0000004")
    cfg2 = make_config(pretrain_data, resumed, operation__train_steps=8, trainer__save_interval=4,
                       model__dropout=0.1, trainer__precision=precision)
    trainer = Trainer(cfg2)
    trainer.train()
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:
        assert abs(a[step] - b[step]) <= 1e-6
    final_a = load_weights(straight)
    final_b = load_weights(resumed)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    if precision == "bf16":
        assert next(trainer.model.parameters()).dtype == torch.bfloat16
        weight = final_a["layers.0.mlp.up.weight"]
        assert weight.dtype == torch.float32 and not torch.equal(weight, weight.bfloat16().float())


@pytest.mark.device
def test_accumulation_equals_larger_micro_batch(pretrain_data, tmp_path) -> None:
    big = make_config(pretrain_data, tmp_path / "a", trainer__micro_batch_size=4, trainer__gradient_accumulation_steps=1)
    small = make_config(pretrain_data, tmp_path / "b", trainer__micro_batch_size=1, trainer__gradient_accumulation_steps=4)
    Trainer(big).train()
    Trainer(small).train()
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5


@pytest.mark.device
def test_sft_loss_is_the_masked_token_average(sft_data, tmp_path) -> None:
    cfg = make_config(sft_data, tmp_path, operation__train_steps=1, trainer__micro_batch_size=2,
                      trainer__gradient_accumulation_steps=2)
    Trainer(cfg).train()
    logged = train_losses(tmp_path)[1]
    # By hand: same seed -> same initial weights; the first global batch; mean CE over trained tokens only.
    torch.manual_seed(cfg.init.seed)
    model = TransformerModel(cfg.model)
    data_cfg = load_data_config(sft_data)
    meta = load_metadata(data_cfg.output_dir)
    dataset = build_dataset(data_cfg.output_dir, meta, "train", data_cfg.max_seq_length, cfg.init.seed)
    batches = StepBatches(dataset, global_batch_size=4, micro_batch_size=4, seed=cfg.init.seed, shuffle=True,
                          device=torch.device("cpu")).step(0)
    (batch,) = batches
    with torch.no_grad():
        logits = model(batch["input_ids"])
    total, count = 0.0, 0
    for b in range(4):
        for t in range(batch["input_ids"].shape[1]):
            if batch["loss_mask"][b, t]:
                total += -torch.log_softmax(logits[b, t], -1)[batch["labels"][b, t]].item()
                count += 1
    assert 0 < count < batch["loss_mask"].numel()  # prompts are masked out, answers are trained
    assert logged == pytest.approx(total / count, abs=1e-4)


def test_sft_packing_trains(sft_data, tmp_path) -> None:
    cfg = make_config(sft_data, tmp_path, data__packing=True, operation__train_steps=3)
    Trainer(cfg).train()
    assert len(train_losses(tmp_path)) == 3


def test_interrupted_checkpoint_write_keeps_latest(pretrain_data, tmp_path, monkeypatch) -> None:
    cfg = make_config(pretrain_data, tmp_path, operation__train_steps=4, trainer__save_interval=2)
    trainer = Trainer(cfg)
    real = checkpoint.write_model_files
    calls = []

    def crash_on_second(folder, state, config, base=None):
        calls.append(folder)
        if len(calls) == 2:
            real(folder, state, config, base)
            raise OSError("disk full")
        real(folder, state, config, base)

    monkeypatch.setattr(checkpoint, "write_model_files", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    ckpts = tmp_path / "checkpoints"
    assert checkpoint.resolve(tmp_path).name == "step_0000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002"]  # no half-written step_4


def test_sigterm_saves_a_resumable_checkpoint(pretrain_data, tmp_path) -> None:
    cfg_path = _write_yaml(tmp_path / "train.yaml", {
        "model": TINY_MODEL, "data": {"config_path": str(pretrain_data)},
        "trainer": {"micro_batch_size": 4, "output_dir": str(tmp_path / "run"), "save_interval": 0},
        "operation": {"train_steps": 100000, "eval_interval": 0, "log_interval": 1},
        "utils": {"tracking": False},
    })
    cmd = [sys.executable, "-m", "ironcore", "train", "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by signal SIGTERM" in err
    saved = checkpoint.resolve(tmp_path / "run")
    step = json.loads((saved / checkpoint.TRAINER_STATE).read_text())["step"]
    assert step >= 3
    # Rerun with a finite budget: it resumes after the saved step.
    done = subprocess.run(cmd + [f"operation.train_steps={step + 2}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m)[-2:] == [step + 1, step + 2]


def test_mlflow_records_params_metrics_and_tags(pretrain_data, tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    items = tmp_path / "task.jsonl"  # a task evaluated with the validation (operation.eval_tasks)
    items.write_text("".join(json.dumps({"prompt": p, "answer": "the"}) + "\n" for p in ("To be or", "My lord,")))
    (tmp_path / "toy.yaml").write_text(f"path: {items}\nchecker: exact\nmax_new_tokens: 4\n")
    cfg = make_config(pretrain_data, tmp_path / "run", utils__tracking=True, utils__experiment_name="trk",
                      operation__train_steps=4, operation__log_interval=2, operation__eval_interval=2,
                      operation__eval_tasks=[str(tmp_path / "toy.yaml")])  # fmt: skip
    Trainer(cfg).train()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("trk").experiment_id])
    assert json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/toy/accuracy")] == [2, 4]
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "eval/toy/accuracy" in m] == [2, 4]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.max_lr"] == "0.003" and run.data.params["model.hidden_size"] == "64"
    assert not any(name.startswith(("dpo", "trainer.objective_options.beta")) for name in run.data.params)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    for name in ("train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "val/loss", "val/ppl"):
        assert client.get_metric_history(run.info.run_id, name), name
    tags = run.data.tags
    assert tags["task_type"] == "pretrain" and tags["objective"] == "LMObjective" and tags["model_name"] == "tiny"
    assert tags["tensor_parallel_size"] == "1" and "ironcore_version" in tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final_eval.json"} <= artifacts


def test_a_run_started_outside_any_checkout_carries_the_code_version(pretrain_data, tmp_path, monkeypatch) -> None:
    """The commit is the one of the IronCore checkout that runs, not of the working directory."""
    from mlflow.tracking import MlflowClient

    from ironcore import __version__

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode:
        pytest.skip("the IronCore code under test is not a git checkout")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    assert subprocess.run(["git", "rev-parse"], cwd=workdir, capture_output=True).returncode != 0
    monkeypatch.chdir(workdir)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    Trainer(make_config(pretrain_data, workdir / "run", utils__tracking=True, utils__experiment_name="version",
                        operation__train_steps=1)).train()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("version").experiment_id])
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    changes = subprocess.run(["git", "status", "--porcelain", "--", "ironcore"], cwd=ROOT, capture_output=True,
                             text=True).stdout
    assert tags["git_dirty"] == str(bool(changes.strip())).lower()
    assert tags["ironcore_version"] == __version__


def test_mlflow_runs_and_pipeline_parents_show_their_source(pretrain_data, tmp_path, monkeypatch) -> None:
    """The runs table's "Source": mlflow.source.name/type and the commit, on training runs and on the pipeline's
    parent runs (`ironcore mlflow parent`), in a store in tmp_path."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    Trainer(make_config(pretrain_data, tmp_path / "run", utils__tracking=True, utils__experiment_name="src",
                        operation__train_steps=1)).train()  # fmt: skip
    env = {**os.environ, "IRONCORE_PIPELINE_INVOCATION": "inv1", "IRONCORE_MLFLOW_EXPERIMENT": "src",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "ironcore", "mlflow", "parent", "--run", "a"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0 and "skipped" not in done.stderr, done.stderr
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("src").experiment_id])}
    assert set(runs) == {"run", "a"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    for name, source in (("run", "ironcore train"), ("a", "snakemake (workflow/Snakefile)")):
        tags = runs[name].data.tags
        assert tags["mlflow.source.name"] == source and tags["mlflow.source.type"] == "LOCAL", tags
        if head.returncode == 0:  # a git checkout: the commit beside the source
            assert tags["mlflow.source.git.commit"] == head.stdout.strip()


def test_dead_tracking_server_does_not_stop_training(pretrain_data, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_config(pretrain_data, tmp_path, utils__tracking=True, operation__train_steps=2)
    Trainer(cfg).train()
    assert len(train_losses(tmp_path)) == 2
    assert "MLflow tracking disabled" in caplog.text


@pytest.mark.device
def test_non_finite_steps_are_skipped_then_stop(pretrain_data, tmp_path, monkeypatch) -> None:
    real = LMObjective.token_losses
    calls = {"n": 0}

    def poisoned(self, logits, micro_batch):
        calls["n"] += 1
        loss = real(self, logits, micro_batch)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(LMObjective, "token_losses", poisoned)
    cfg = make_config(pretrain_data, tmp_path, operation__train_steps=20, trainer__max_consecutive_skips=3)
    with pytest.raises(TrainingStopped, match="3 steps in a row had a non-finite loss.*no checkpoint of this run is "
                                              "known healthy"):
        Trainer(cfg).train()
    assert not (tmp_path / "checkpoints").exists()  # weights that led to NaN are not saved as a good state
    assert set(train_losses(tmp_path)) == {1, 2}  # the finite steps were logged, the skipped ones not


@pytest.mark.parametrize(
    ("model_override", "message"),
    [({"vocab_size": 100}, "tokenizer vocabulary 512 is larger than model.vocab_size 100"),
     ({"max_position_embeddings": 16}, "max_seq_length 32 exceeds model.max_position_embeddings 16")],
)
def test_data_model_mismatch_fails_at_start(pretrain_data, tmp_path, model_override, message) -> None:
    cfg = make_config(pretrain_data, tmp_path)
    for key, value in model_override.items():
        setattr(cfg.model, key, value)
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg)


@pytest.mark.device
def test_init_from_hf_folder_fine_tunes_those_weights(pretrain_data, tmp_path) -> None:
    from ironcore.checkpoints.hf import save_hf_model

    cfg = make_config(pretrain_data, tmp_path / "run", operation__train_steps=1)
    torch.manual_seed(99)
    source = TransformerModel(cfg.model)
    hf_dir = save_hf_model(source, tmp_path / "hf")
    cfg = make_config(pretrain_data, tmp_path / "run", operation__train_steps=1, init__init_from=str(hf_dir))
    trainer = Trainer(cfg)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(trainer.model.state_dict().values(), source.state_dict().values()))


def _exported_ids(folder: Path) -> tuple:
    """(bos, eos, pad) of an HF export's config.json and (bos, eos, pad) of its generation config, as transformers
    reads them."""
    from transformers import AutoConfig, GenerationConfig

    config, generation = AutoConfig.from_pretrained(folder), GenerationConfig.from_pretrained(folder)
    return ((config.bos_token_id, config.eos_token_id, config.pad_token_id),
            (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id))  # fmt: skip


def test_an_export_of_a_model_trained_from_scratch_names_its_tokenizers_ids(pretrain_data, tmp_path) -> None:
    """Not LLaMA's defaults (BOS 1, EOS 2: other tokens of this vocabulary): the tokenizer's end-of-document
    token, where every document starts and ends, in config.json and in a generation_config.json."""
    from ironcore.cli import main
    from ironcore.data.preprocessing.tokenizer import Tokenizer

    Trainer(make_config(pretrain_data, tmp_path / "run", operation__train_steps=1)).train()
    assert main(["convert", "--to-hf", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    eod = Tokenizer.from_path(load_data_config(pretrain_data).output_dir).eod_id
    assert _exported_ids(tmp_path / "hf") == ((eod, eod, None), (eod, eod, None))


def test_an_export_keeps_the_token_ids_of_the_imported_hf_folder(pretrain_data, tmp_path) -> None:
    """An HF folder whose config.json says BOS 1, EOS 2, PAD 2 (SmolLM2's), fine-tuned and exported, or converted
    there and back: the export says the same (not the tokenizer's end-of-document id, not PAD null)."""
    from ironcore.checkpoints.hf import save_hf_model
    from ironcore.cli import main

    cfg = make_config(pretrain_data, tmp_path / "run", operation__train_steps=1)
    hf_dir = save_hf_model(TransformerModel(cfg.model), tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
    (hf_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    checkpoint.copy_tokenizer(load_data_config(pretrain_data).output_dir, hf_dir)  # its end-of-document id is 0
    Trainer(make_config(pretrain_data, tmp_path / "run", operation__train_steps=1, init__init_from=str(hf_dir))).train()
    assert main(["convert", "--from-hf", str(hf_dir), "--output", str(tmp_path / "imported")]) == 0
    for source, out in ((tmp_path / "run", "trained_hf"), (tmp_path / "imported", "converted_hf")):
        assert main(["convert", "--to-hf", "--checkpoint", str(source), "--output", str(tmp_path / out)]) == 0
        assert _exported_ids(tmp_path / out) == ((1, 2, 2), (1, 2, None)), out


@pytest.mark.device
def test_eval_command_reproduces_the_final_validation_loss(pretrain_data, tmp_path) -> None:
    from ironcore.cli import main

    cfg = make_config(pretrain_data, tmp_path / "run", operation__train_steps=3)
    final = Trainer(cfg).train()
    out = tmp_path / "eval.json"
    # The trainer evaluated eval_steps=2 global batches of 4 samples: the same 8 samples here.
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--output", str(out), "--micro-batch-size", "4",
                 "--max-batches", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["step"] == 3
    assert result["val_loss"] == pytest.approx(final["val_loss"], abs=1e-5)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data-config", str(pretrain_data)]) == 0


@pytest.mark.device
@pytest.mark.parametrize(
    "option",
    ["trainer__activation_checkpointing", pytest.param("trainer__compile", marks=pytest.mark.slow), "trainer__precision"],
)
def test_recompute_compile_and_bf16_train(pretrain_data, tmp_path, option) -> None:
    reference = make_config(pretrain_data, tmp_path / "ref", operation__train_steps=2)
    Trainer(reference).train()
    value = "bf16" if option.endswith("precision") else True
    cfg = make_config(pretrain_data, tmp_path / "run", operation__train_steps=2, **{option: value})
    Trainer(cfg).train()
    a, b = train_losses(tmp_path / "ref"), train_losses(tmp_path / "run")
    if option.endswith("checkpointing"):  # recomputation changes nothing numerically
        assert all(abs(a[s] - b[s]) < 1e-6 for s in a)
    elif option.endswith("compile"):  # fused kernels round differently, nothing more
        assert all(abs(a[s] - b[s]) < 1e-4 for s in a)
    else:  # bf16 autocast: close to fp32, not equal
        assert all(abs(a[s] - b[s]) < 0.05 for s in a) and a != b


def test_a_cpu_run_logs_what_it_measures(pretrain_data, tmp_path, monkeypatch, capsys, caplog) -> None:
    """Memory per process (not per GPU) on a CPU, the peak MFU is taken against, and every validation on the
    console beside the step lines, the one of eval_at_start included."""
    import logging

    monkeypatch.setenv("IRONCORE_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="ironcore")
    cfg = make_config(pretrain_data, tmp_path / "run", operation__train_steps=2, operation__eval_at_start=True)
    final = Trainer(cfg).train()
    out = capsys.readouterr().out
    assert "memory per process: planned" in caplog.text and "per GPU" not in caplog.text
    peak = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("MFU is taken against"))
    assert "FLOP/s per process (fp32 matmul peak of this CPU" in peak and "cpu_peak.json" in peak, peak
    start = next(m for m in read_metrics(tmp_path / "run") if m["step"] == 0)
    evals = [line for line in out.splitlines() if "| eval |" in line]
    assert evals == [f"step 0/2 | eval | val_loss {start['val_loss']:.4f} | val_ppl {start['val_ppl']:.4f}",
                     f"step 2/2 | eval | val_loss {final['val_loss']:.4f} | val_ppl {final['val_ppl']:.4f}"], out


@pytest.mark.parametrize("retain", [True, False])
def test_cpu_trainer_keeps_freed_host_memory_unless_told_not_to(pretrain_data, tmp_path, monkeypatch, retain):
    calls = []
    monkeypatch.setattr(trainer_module, "retain_freed_host_memory", lambda: calls.append(True))
    Trainer(make_config(pretrain_data, tmp_path / "run", trainer__retain_host_memory=retain))
    assert calls == ([True] if retain else [])


def test_stop_metric_ends_the_run_at_the_first_evaluation_that_reaches_it(pretrain_data, tmp_path) -> None:
    """operation.stop_metric: the run stops at the evaluation that reaches the threshold, saves its final
    checkpoint there, and a rerun trains no further; an unknown metric is one line naming the key."""
    cfg = make_config(pretrain_data, tmp_path, operation__train_steps=40, operation__eval_interval=5,
                      operation__stop_metric="val_loss", operation__stop_threshold=100.0, operation__stop_mode="min")
    final = Trainer(cfg).train()
    assert checkpoint.resolve(tmp_path).name == "step_0000005"  # the first evaluation already met val_loss <= 100
    assert json.loads((tmp_path / "final_eval.json").read_text()) == {"step": 5, **final}
    assert [m["step"] for m in read_metrics(tmp_path) if "val_loss" in m] == [5]  # no second final evaluation
    Trainer(make_config(pretrain_data, tmp_path, operation__train_steps=40, operation__eval_interval=5,
                        operation__stop_metric="val_loss", operation__stop_threshold=100.0,
                        operation__stop_mode="min")).train()
    assert checkpoint.resolve(tmp_path).name == "step_0000005"  # resumed: stopped, trains no further

    never = make_config(pretrain_data, tmp_path / "never", operation__train_steps=10, operation__eval_interval=5,
                        operation__stop_metric="val_loss", operation__stop_threshold=0.0, operation__stop_mode="min")
    Trainer(never).train()
    assert checkpoint.resolve(tmp_path / "never").name == "step_0000010"  # not reached: the whole run

    wrong = make_config(pretrain_data, tmp_path / "wrong", operation__train_steps=10, operation__eval_interval=5,
                        operation__stop_metric="val_acc")
    with pytest.raises(ConfigError, match=r"operation.stop_metric.*'val_acc'.*val_loss"):
        Trainer(wrong).train()
