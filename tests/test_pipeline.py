"""The Snakemake pipeline end to end on a tiny configuration, its caching semantics, and resume.

One temporary working directory holds a tiny pipeline config (300 kB corpus, 512-token BPE, two
43k-parameter models, 20 steps). The full pipeline runs there once; dry runs then check exactly
which jobs a change reruns; finally a training job is killed and rerun, and must resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ironcore.checkpoints import native

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("ironcore") is None or shutil.which("torchrun") is None,
        reason="the pipeline's rules call the `ironcore` and `torchrun` commands (pip install -e .)",
    ),
]

DATA_CONFIG = {
    "name": "tiny",
    "source": {"path": "results/corpus/train.jsonl"},
    "valid_source": {"path": "results/corpus/valid.jsonl"},
    "fields": {"text": "text"},
    "tokenizer": {"path": "results/tokenizer"},
    "max_seq_length": 64,
    "output_dir": "results/data/tiny",
    "num_workers": 0,
}


def training_config(name: str, norm: str) -> dict:
    model = {"name": name, "vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 2,
             "max_position_embeddings": 64, "norm_type": norm}
    return {
        "model": model,
        "data": {"config_path": "cfg/data.yaml"},
        "trainer": {"micro_batch_size": 4, "save_interval": 10},
        "operation": {"train_steps": 20, "eval_interval": 10, "eval_steps": 2, "log_interval": 5},
        "optim": {"max_lr": 3.0e-3, "warmup_steps": 2},
    }


PIPELINE = {
    "corpus": {"max_bytes": 300_000},
    "tokenizer": {"vocab_size": 512},
    "eval": {"max_batches": 4, "max_new_tokens": 8, "prompts": ["def "]},
    "experiments": {"a": {"config": "cfg/a.yaml", "tasks": ["cfg/mc.yaml"]}, "b": {"config": "cfg/b.yaml"}},
}
# Experiment a's task (ironcore eval --task): multiple choice between a Python keyword and nonsense.
MC_ITEMS = [{"prompt": prompt, "choices": [" " + word, " qzx" + word[::-1]], "gold": 0}
            for prompt, word in [("import", "os"), ("def f(x):\n   ", "return"), ("for i", "in"), ("if x", "is")]]


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def snakemake_command(workdir: Path, *args: str, configfile: str = "pipeline.yaml") -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir),
            "--configfile", str(workdir / configfile), "--cores", "2", *args]


def environment(workdir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "IRONCORE_PIPELINE_INVOCATION"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    return env


def snakemake(workdir: Path, *args: str, configfile: str = "pipeline.yaml", check: bool = True):
    done = subprocess.run(snakemake_command(workdir, *args, configfile=configfile), env=environment(workdir),
                          capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def planned_jobs(workdir: Path, *args: str, configfile: str = "pipeline.yaml") -> Counter:
    """Jobs a dry run would run, from its 'Job stats' table (empty when there is nothing to do)."""
    done = snakemake(workdir, "--dry-run", *args, configfile=configfile)
    output = done.stdout + done.stderr
    if "Nothing to be done" in output:
        return Counter()
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory where the tiny pipeline has run to the end."""
    workdir = tmp_path_factory.mktemp("pipeline")
    write_yaml(workdir / "cfg" / "data.yaml", DATA_CONFIG)
    write_yaml(workdir / "cfg" / "a.yaml", training_config("tiny-gpt", "layernorm"))
    write_yaml(workdir / "cfg" / "b.yaml", training_config("tiny-rms", "rmsnorm"))
    write_yaml(workdir / "pipeline.yaml", PIPELINE)
    (workdir / "cfg" / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in MC_ITEMS))
    write_yaml(workdir / "cfg" / "mc.yaml", {"type": "multiple_choice", "path": "mc.jsonl"})
    snakemake(workdir)
    return workdir


def test_end_to_end(workdir):
    summary = json.loads((workdir / "results" / "summary" / "summary.json").read_text())
    (data,) = summary["datasets"].values()
    assert data["vocab_size"] == 512 and data["train_tokens"] > 50_000
    assert 3.0 < data["unigram_entropy"] < 6.3  # ln(512) = 6.24
    rows = {row["experiment"]: row for row in summary["experiments"]}
    assert set(rows) == {"a", "b"}
    for name, row in rows.items():
        result = json.loads((workdir / "results" / "eval" / name / "eval.json").read_text())
        assert result["step"] == 20 and result["val_loss"] == row["val_loss"]
        assert row["val_loss"] < 6.3  # below a uniform guess after 20 steps
        samples = json.loads((workdir / "results" / "eval" / name / "samples.json").read_text())
        assert len(samples["samples"]) >= 1 and samples["note"] is None
    assert (workdir / "results" / "summary" / "loss_curves.png").stat().st_size > 10_000
    table = (workdir / "results" / "summary" / "summary.md").read_text()
    assert "| a | tiny-gpt |" in table and " mc acc | mc acc_norm |" in table  # a's task; b has none: "-"
    tasks = json.loads((workdir / "results" / "eval" / "a" / "tasks.json").read_text())
    assert tasks["tasks"]["mc"]["items"] == 4 and rows["a"]["tasks"]["mc acc"] == tasks["eval/mc/acc"]
    b_row = next(line for line in table.splitlines() if line.startswith("| b |"))
    assert rows["b"]["tasks"] == {} and b_row.endswith("| - | - |")
    for report in ("report.json", "report.html", "lengths.png"):
        assert (workdir / "results" / "data" / "tiny" / "inspect" / report).is_file()
    for rule in ("corpus", "tokenizer", "preprocess/tiny", "inspect/tiny", "train/a", "eval/b", "summary"):
        assert (workdir / "benchmarks" / "pipeline" / f"{rule}.tsv").is_file()
        assert (workdir / "logs" / f"{rule}.log").is_file()


def test_mlflow_parent_run_per_experiment_with_training_as_child(workdir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ironcore-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    parents = {run.info.run_name: run for run in runs if "mlflow.parentRunId" not in run.data.tags}
    children = {run.info.run_name: run for run in runs if "mlflow.parentRunId" in run.data.tags}
    assert set(parents) == {"a", "b"} and set(children) == {"a/train", "b/train"}
    for name, parent in parents.items():
        assert parent.info.status == "FINISHED"
        assert children[f"{name}/train"].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "val/loss" in parent.data.metrics and parent.data.params["optim.max_lr"] == "0.003"
        assert ("eval/mc/acc" in parent.data.metrics) == (name == "a")  # the task's metric: on a's runs
        assert ("eval/mc/acc" in children[f"{name}/train"].data.metrics) == (name == "a")
        folders = {item.path for item in client.list_artifacts(parent.info.run_id)}
        assert folders == {"config", "data", "eval", "summary", "train"}


def test_nothing_changed_means_no_job(workdir):
    assert planned_jobs(workdir) == Counter()


def test_training_param_change_reruns_train_and_eval_only(workdir):
    changed = json.loads(json.dumps(PIPELINE))
    changed["experiments"]["a"]["overrides"] = {"optim.max_lr": 1.0e-3}
    write_yaml(workdir / "pipeline_lr.yaml", changed)
    assert planned_jobs(workdir, configfile="pipeline_lr.yaml") == Counter(train=1, tasks=1, eval=1, summary=1, all=1)


def test_data_config_change_reruns_from_preprocess(workdir):
    path = workdir / "cfg" / "data.yaml"
    original, stat = path.read_text(), path.stat()
    try:
        write_yaml(path, {**DATA_CONFIG, "max_seq_length": 32})
        expected = Counter(preprocess=1, inspect=1, train=2, tasks=2, eval=2, summary=1, all=1)
        assert planned_jobs(workdir) == expected
    finally:
        path.write_text(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned_jobs(workdir) == Counter()


def test_mlflow_settings_rerun_nothing(workdir):
    """MLflow settings reach the jobs through the environment, not params: changing them reruns nothing."""
    for mlflow in ({"enabled": False}, {"experiment": "another-name"}):
        write_yaml(workdir / "pipeline_mlflow.yaml", {**PIPELINE, "mlflow": mlflow})
        assert planned_jobs(workdir, configfile="pipeline_mlflow.yaml") == Counter()


def _config_error(tmp_path: Path, pipeline: dict | str, default: bool = False) -> str:
    """What a dry run prints for ``pipeline`` (a mapping, or YAML text): given with --configfile, or as the
    default configs/pipeline.yaml of the working directory. The pipeline must refuse it."""
    write_yaml(tmp_path / "cfg" / "data.yaml", DATA_CONFIG)
    write_yaml(tmp_path / "cfg" / "a.yaml", training_config("tiny-gpt", "layernorm"))
    text = pipeline if isinstance(pipeline, str) else yaml.safe_dump(pipeline, sort_keys=False)
    path = tmp_path / ("configs/pipeline.yaml" if default else "bad.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(tmp_path), "--cores", "1",
               "--dry-run", *([] if default else ["--configfile", str(path)])]
    done = subprocess.run(command, env=environment(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    return (done.stdout + done.stderr).strip()


BASE = {**PIPELINE, "experiments": {"a": {"config": "cfg/a.yaml"}}}  # (its training config only is written)
RL_EXPERIMENTS = {"s": {"config": "cfg/a.yaml", "optional": True, "target": "rl"},
                  "g": {"config": "cfg/a.yaml", "optional": True, "target": "rl", "init_from_experiment": "s"}}


@pytest.mark.parametrize(("pipeline", "message"), [
    ({**BASE, "bogus": 1}, "bad.yaml: unknown key 'bogus' (known: mlflow, corpus, tokenizer, "),
    ({**BASE, "mlflow": {"experimnt": "x"}}, "bad.yaml: unknown key 'mlflow.experimnt' (did you mean 'experiment'?)"),
    ({**BASE, "tokenizer": {"vocab_size": "big"}}, "bad.yaml: 'tokenizer.vocab_size': expected integer, got 'big'"),
    ({**BASE, "experiments": {"a": {"config": "cfg/a.yaml", "nprocs": 2}}},
     "bad.yaml: unknown key 'experiments.a.nprocs' (did you mean 'nproc'?)"),
    ({**BASE, "experiments": {"a": {"config": "cfg/missing.yaml"}}},
     "experiment a: cfg/missing.yaml: no such file (config)"),
    ({**BASE, "rl": {"start": "s", "policy": "gg"}, "experiments": {**BASE["experiments"], **RL_EXPERIMENTS}},
     "bad.yaml: 'rl.policy': 'gg' is not an experiment of the pipeline config (did you mean 'g'?)"),
    (yaml.safe_dump(BASE, sort_keys=False) + "eval: {}\n", "bad.yaml: key 'eval' given twice (lines 5 and 13)"),
    ({**BASE, "sweeps": {"lr": {"base": "aa", "grid": {"optim.max_lr": [1]}}}},
     "bad.yaml: 'sweeps.lr.base': 'aa' is not an experiment of the pipeline config (did you mean 'a'?)"),
    ({**BASE, "sweeps": {"lr": {"base": "a", "grid": {"optim.max_lrr": [1]}}}},
     "bad.yaml: 'sweeps.lr': experiment lr-max_lrr=1: cfg/a.yaml: unknown config key 'optim.max_lrr' (did you mean "
     "'max_lr'?)"),
])  # fmt: skip
def test_a_bad_pipeline_config_is_one_line_naming_the_key(tmp_path, pipeline, message):
    """Not the whole config (an unknown key), nor a traceback (an unknown rl.policy, a missing training config),
    nor a silently dropped group (a key given twice): one line naming the file and the key."""
    output = _config_error(tmp_path, pipeline)
    assert output == f"pipeline: error: {tmp_path / 'bad.yaml'}: {message}" or (
        output.startswith("pipeline: error: ") and message in output and "\n" not in output), output


def test_the_default_pipeline_config_is_read_through_ironcores_yaml_loader(tmp_path):
    """configs/pipeline.yaml, which Snakemake reads itself: its syntax error names the line, a key given twice
    both lines."""
    text = yaml.safe_dump(BASE, sort_keys=False)
    assert _config_error(tmp_path, text + "corpus: x: y\n", default=True) == (
        "pipeline: error: configs/pipeline.yaml:13: invalid YAML: mapping values are not allowed here")
    assert _config_error(tmp_path, text + "corpus: {}\n", default=True) == (
        "pipeline: error: configs/pipeline.yaml: key 'corpus' given twice (lines 1 and 13)")


def test_workflow_lint_is_clean():
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--lint"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Congratulations" in done.stdout + done.stderr, done.stdout + done.stderr


def test_forcerun_train_reruns_train_and_what_follows(workdir):
    assert planned_jobs(workdir, "--forcerun", "train") == Counter(train=2, tasks=2, eval=2, summary=1, all=1)


def test_optional_chain_pretrain_sft_dpo(workdir):
    """`snakemake chain`: SFT from experiment a's final weights, then DPO from the SFT weights;
    the default target does not include them."""
    # Short records, so that they fit the tiny models' 64 positions.
    records = [{"prompt": f"def f{i}(x):", "chosen": f" return x + {i}", "rejected": f" pass  # {i}"} for i in range(60)]
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for stage, fields in (("sft", {"prompt": "prompt", "response": "chosen"}),
                          ("dpo", {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"})):
        write_yaml(workdir / "cfg" / f"{stage}_data.yaml", {
            "name": stage, "task_type": stage, "source": {"path": str(workdir / "pairs.jsonl")}, "fields": fields,
            "tokenizer": {"path": "results/tokenizer"}, "max_seq_length": 64, "valid_fraction": 0.1,
            "output_dir": f"results/data/{stage}", "num_workers": 0})
    for stage in ("sft", "dpo", "lora"):
        cfg = training_config("tiny-gpt", "layernorm")  # the model of experiment a
        cfg["data"]["config_path"] = f"cfg/{'sft' if stage == 'lora' else stage}_data.yaml"
        cfg["operation"].update(train_steps=6, eval_interval=0)
        if stage == "lora":  # LoRA SFT on experiment a's frozen weights
            cfg["model"]["lora"] = {"rank": 4, "alpha": 8, "targets": ["qkv", "o", "up", "down"]}
        write_yaml(workdir / "cfg" / f"{stage}.yaml", cfg)
    # A generation task for the SFT model (ironcore eval --task): the prompts it was trained on, an exact checker.
    (workdir / "cfg" / "toy.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["chosen"]})
                                                       + "\n" for r in records[:8]))
    write_yaml(workdir / "cfg" / "toy.yaml", {"path": "toy.jsonl", "checker": "exact", "max_new_tokens": 6})
    pipeline = {**PIPELINE, "experiments": {
        **PIPELINE["experiments"],
        "sft": {"config": "cfg/sft.yaml", "init_from_experiment": "a", "optional": True, "tasks": ["cfg/toy.yaml"]},
        "dpo": {"config": "cfg/dpo.yaml", "init_from_experiment": "sft", "optional": True},
        "lora": {"config": "cfg/lora.yaml", "init_from_experiment": "a", "optional": True, "tasks": ["cfg/toy.yaml"]},
    }}
    write_yaml(workdir / "chain.yaml", pipeline)
    snakemake(workdir)  # bring the default target up to date (earlier tests changed things)
    assert planned_jobs(workdir, configfile="chain.yaml") == Counter()  # optional experiments add nothing to it
    assert planned_jobs(workdir, "chain", configfile="chain.yaml") == Counter(
        {"preprocess": 2, "train": 3, "tasks": 3, "chain_summary": 1, "chain": 1})
    snakemake(workdir, "chain", configfile="chain.yaml")
    sft = yaml.safe_load((workdir / "results" / "train" / "sft" / "config.yaml").read_text())
    dpo = yaml.safe_load((workdir / "results" / "train" / "dpo" / "config.yaml").read_text())
    assert sft["init"]["init_from"] == "results/runs/a" and dpo["init"]["init_from"] == "results/runs/sft"
    # The LoRA experiment: adapters-only checkpoints on a's frozen weights, evaluated through them.
    lora_run = workdir / "results" / "runs" / "lora"
    assert (native.resolve(lora_run) / native.ADAPTER_BASE).is_file()
    assert all(".lora." in name for name in native.read_safetensors(native.resolve(lora_run) / native.WEIGHTS))
    lora_tasks = json.loads((workdir / "results" / "eval" / "lora" / "tasks.json").read_text())
    assert lora_tasks["tasks"]["toy"]["items"] == 8
    final = json.loads((workdir / "results" / "train" / "dpo" / "final_eval.json").read_text())
    assert "val_rewards/accuracies" in final
    # The task's accuracy: in the chain's table (the DPO experiment configures none), and on the SFT training run.
    tasks = json.loads((workdir / "results" / "eval" / "sft" / "tasks.json").read_text())
    assert tasks["tasks"]["toy"]["items"] == 8 and 0.0 <= tasks["eval/toy/accuracy"] <= 1.0
    table = (workdir / "results" / "chain" / "tasks.md").read_text()
    assert "| experiment | toy accuracy |" in table and "| dpo | - |" in table
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ironcore-pipeline")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'sft/train'")
    assert run.data.metrics["eval/toy/accuracy"] == tasks["eval/toy/accuracy"]


def test_sweep_builds_each_point_once_ranks_them_and_groups_them_in_mlflow(workdir):
    """`snakemake sweep_lr`: a grid of two learning rates over experiment b, each point an experiment of its own;
    nothing to do the second time, one point's jobs when a point is added; one MLflow run for the sweep whose
    children are the points, with the swept key among their params."""
    from mlflow.tracking import MlflowClient

    sweep = {"base": "c", "grid": {"optim.max_lr": [1e-3, 3e-3]}}
    # the base: b's config, samples of its own, built only through sweeps
    base = {"config": "cfg/b.yaml", "optional": True, "target": "sweep",
            "samples": {"prompts": ["class "], "max_new_tokens": 4}}
    experiments = {**PIPELINE["experiments"], "c": base}
    write_yaml(workdir / "sweep.yaml", {**PIPELINE, "experiments": experiments, "sweeps": {"lr": sweep}})
    # the sweep adds nothing to the default target (whatever earlier tests left of it to do)
    assert planned_jobs(workdir, configfile="sweep.yaml") == planned_jobs(workdir)
    snakemake(workdir, "sweep_lr", configfile="sweep.yaml")
    assert planned_jobs(workdir, "sweep_lr", configfile="sweep.yaml") == Counter()
    summary = json.loads((workdir / "results" / "sweeps" / "lr" / "summary.json").read_text())
    points = {point["point"]: point for point in summary["points"]}
    assert set(points) == {"lr-max_lr=0.001", "lr-max_lr=0.003"} and summary["keys"] == ["optim.max_lr"]
    losses = [point["val_loss"] for point in summary["points"]]
    assert losses == sorted(losses) and losses[0] < losses[1]  # ranked, and the two rates train differently
    for name, point in points.items():
        assert point["val_loss"] == json.loads((workdir / "results" / "eval" / name / "eval.json").read_text())[
            "val_loss"] and point["seconds"] > 0 and len(point["valid"]) == 2  # fmt: skip
        samples = json.loads((workdir / "results" / "eval" / name / "samples.json").read_text())["samples"]
        assert [sample["prompt"] for sample in samples] == ["class "]  # the base's own sample settings
    table = (workdir / "results" / "sweeps" / "lr" / "summary.md").read_text()
    assert table.index("| 1 | ") < table.index("| 2 | ") and "| optim.max_lr |" in table
    assert (workdir / "results" / "sweeps" / "lr" / "curves.png").stat().st_size > 10_000
    added = {"lr": {**sweep, "points": [{"optim.max_lr": 2e-3}]}}
    write_yaml(workdir / "sweep_added.yaml", {**PIPELINE, "experiments": experiments, "sweeps": added})
    assert planned_jobs(workdir, "sweep_lr", configfile="sweep_added.yaml") == Counter(
        train=1, tasks=1, eval=1, sweep_summary=1, sweep_lr=1)

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ironcore-pipeline").experiment_id
    (sweep_run,) = client.search_runs([experiment], "tags.pipeline_sweep_run = 'lr'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{sweep_run.info.run_id}'")
    assert {run.info.run_name: run.data.params["optim.max_lr"] for run in children} == {
        "lr-max_lr=0.001": "0.001", "lr-max_lr=0.003": "0.003"}
    assert all(run.data.metrics["val/loss"] == points[run.info.run_name]["val_loss"] for run in children)
    assert sweep_run.info.status == "FINISHED" and sweep_run.info.run_name == "sweep_lr"
    assert {item.path for item in client.list_artifacts(sweep_run.info.run_id, "summary")} == {
        f"summary/{name}" for name in ("summary.md", "summary.html", "summary.json", "curves.png")}


# Metrics that measure the machine (time, speed, memory) rather than the run.
MACHINE_METRIC = re.compile(r"(^|/)time|_s$|_sec|seconds|mfu|elapsed|memory|throughput|tok", re.IGNORECASE)


def rl_numbers(results: Path) -> dict:
    """What the `rl` target computed: both training runs' metrics, both evaluations and the summary, without
    the metrics that time the machine."""
    def strip(record):
        if isinstance(record, dict):
            return {key: strip(value) for key, value in record.items() if not MACHINE_METRIC.search(key)}
        if isinstance(record, list):
            return [strip(value) for value in record]
        return record

    numbers = {f"eval/{exp}": strip(json.loads((results / "rl" / "eval" / f"{exp}.json").read_text()))
               for exp in ("s", "g")}
    numbers["summary"] = strip(json.loads((results / "rl" / "summary.json").read_text()))
    for exp in ("s", "g"):
        lines = (results / "train" / exp / "metrics.jsonl").read_text().splitlines()
        numbers[f"train/{exp}"] = [strip(json.loads(line)) for line in lines]
    return numbers


def test_rl_target_sft_then_grpo_with_accuracy_before_and_after(workdir):
    """`snakemake rl`: the synthetic task, its tokenizer, SFT, GRPO from it, the held-out evaluation of both
    (logged to their MLflow parent runs) and the summary; a GRPO setting reruns only what follows from it."""
    model = {"name": "adder", "vocab_size": 258, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 2,
             "max_position_embeddings": 32, "position_embedding": "rope", "norm_type": "rmsnorm"}
    for stage, task_type in (("sft", "sft"), ("grpo", "rl")):
        data = {"name": f"add_{stage}", "task_type": task_type,
                "source": {"path": "results/synthetic/addition/train.jsonl"},
                "valid_source": {"path": "results/synthetic/addition/heldout.jsonl"},
                "fields": {"prompt": "prompt", **({"response": "answer"} if stage == "sft" else {})},
                "tokenizer": {"path": "results/rl_tokenizer"}, "max_seq_length": 16,
                "output_dir": f"results/data/add_{stage}", "num_workers": 0}
        if stage == "grpo":
            data["reward_fields"] = ["answer"]
        write_yaml(workdir / "cfg" / f"add_{stage}_data.yaml", data)
        cfg = {"model": model, "data": {"config_path": f"cfg/add_{stage}_data.yaml"},
               "trainer": {"micro_batch_size": 4, "save_interval": 0},
               "operation": {"train_steps": 20 if stage == "sft" else 3, "eval_interval": 0, "eval_steps": 2},
               "optim": {"max_lr": 3.0e-3, "warmup_steps": 2}}
        if stage == "grpo":
            cfg["trainer"]["objective_options"] = {"num_generations": 4, "max_completion_length": 4,
                                                   "rewards": [{"function": "exact"}]}
            cfg["operation"].update(eval_at_start=True, eval_interval=2)
        write_yaml(workdir / "cfg" / f"add_{stage}.yaml", cfg)
    pipeline = {**PIPELINE,
                "rl": {"task": {"train": 200, "heldout": 8}, "eval": {"k": 2, "max_new_tokens": 4},
                       "start": "s", "policy": "g"},
                "experiments": {**PIPELINE["experiments"],
                                "s": {"config": "cfg/add_sft.yaml", "optional": True, "target": "rl"},
                                "g": {"config": "cfg/add_grpo.yaml", "init_from_experiment": "s", "optional": True,
                                      "target": "rl"}}}
    write_yaml(workdir / "rl.yaml", pipeline)
    snakemake(workdir)  # bring the default target up to date (earlier tests changed things)
    assert planned_jobs(workdir, configfile="rl.yaml") == Counter()  # the rl experiments are not in the default
    assert planned_jobs(workdir, "rl", configfile="rl.yaml") == Counter(
        {"synthetic": 1, "rl_tokenizer": 1, "preprocess": 2, "inspect": 2, "train": 2, "rl_eval": 2,
         "rl_summary": 1, "rl": 1})
    snakemake(workdir, "rl", configfile="rl.yaml")
    results = workdir / "results"
    before, after = (json.loads((results / "rl" / "eval" / f"{exp}.json").read_text()) for exp in ("s", "g"))
    assert before["step"] == 20 and after["step"] == 3 and before["prompts"] == 8
    assert 0.0 <= before["val_accuracy"] <= 1.0 and "val_pass_at_2" in after
    summary = json.loads((results / "rl" / "summary.json").read_text())
    assert summary["gain_points"] == pytest.approx(100 * (after["val_accuracy"] - before["val_accuracy"]), abs=0.01)
    assert [e["step"] for e in summary["evaluations"]] == [0, 2, 3]  # eval_at_start, every 2 steps, the end
    assert "held-out greedy accuracy" in (results / "rl" / "summary.md").read_text()
    assert (results / "rl" / "reward_curve.png").stat().st_size > 10_000
    grpo = yaml.safe_load((results / "train" / "g" / "config.yaml").read_text())
    assert grpo["init"]["init_from"] == "results/runs/s"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ironcore-pipeline")
    for exp in ("s", "g"):
        (parent,) = client.search_runs([experiment.experiment_id],
                                       filter_string=f"tags.pipeline_experiment = '{exp}'", max_results=1)
        assert parent.info.status == "FINISHED" and "val/accuracy" in parent.data.metrics
    # Deterministic: the whole target again from its first stage gives the same numbers, to the last bit.
    first, trained = rl_numbers(results), (results / "train" / "g" / "metrics.jsonl").stat().st_mtime_ns
    snakemake(workdir, "rl", "--forcerun", "synthetic", configfile="rl.yaml")
    assert (results / "train" / "g" / "metrics.jsonl").stat().st_mtime_ns != trained  # trained again
    assert rl_numbers(results) == first
    changed = {**pipeline, "experiments": {**pipeline["experiments"], "g": {
        **pipeline["experiments"]["g"], "overrides": {"trainer.objective_options.temperature": 0.7}}}}
    write_yaml(workdir / "rl_changed.yaml", changed)
    assert planned_jobs(workdir, "rl", configfile="rl_changed.yaml") == Counter(
        {"train": 1, "rl_eval": 1, "rl_summary": 1, "rl": 1})


def test_killed_training_resumes_from_its_checkpoint(workdir):
    """A long run of experiment a is killed after its first checkpoint, then completed by a rerun. (Last in the
    file: it leaves experiment a trained by another configuration, which the tests before it would retrain.)"""
    long_run = json.loads(json.dumps(PIPELINE))
    long_run["experiments"]["a"]["overrides"] = {
        "operation.train_steps": 60, "operation.eval_interval": 0, "operation.log_interval": 100,
    }
    write_yaml(workdir / "pipeline_long.yaml", long_run)
    target = "results/train/a/final_eval.json"
    latest = workdir / "results" / "runs" / "a" / "checkpoints" / "latest"
    latest.unlink()  # the finished 20-step run is cleared when the job starts: wait for a new checkpoint
    command = snakemake_command(workdir, target, configfile="pipeline_long.yaml")
    process = subprocess.Popen(command, env=environment(workdir), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # Kill the training job the way a cluster does (SIGTERM to the launcher); Snakemake sees it fail.
    launcher = subprocess.run(["pgrep", "-s", str(process.pid), "-f", "torchrun"], capture_output=True, text=True)
    assert process.poll() is None and launcher.stdout.split(), "training ended before it could be killed"
    for pid in launcher.stdout.split():
        os.kill(int(pid), signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output
    assert not (workdir / target).exists()  # Snakemake removed the failed job's outputs ...
    stopped_at = int(latest.read_text().strip().rsplit("_", 1)[-1])
    assert 0 < stopped_at < 60  # ... but not its checkpoints, outside them

    snakemake(workdir, target, configfile="pipeline_long.yaml")
    log = (workdir / "logs" / "train" / "a.log").read_text()
    assert re.search(rf"resumed from \S+ at step {stopped_at}\b", log), log[-2000:]
    assert json.loads((workdir / target).read_text())["step"] == 60
