# Shared by all rules: the validated pipeline config, the experiments and data sets it names,
# code fingerprints, the torchrun launch line and the MLflow hooks. No rules live here.

import hashlib
import json
import os
import platform
import re
import shlex
import sys
import time
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from snakemake.utils import validate

from ironcore.checkpoints.hf_families import model_config_from_folder
from ironcore.config import load_config, to_dict
from ironcore.config.base import did_you_mean
from ironcore.errors import UserError
from ironcore.data.preprocessing.config import load_data_config

REPO = Path(workflow.current_basedir).parents[1]  # the checkout holding this workflow
SCRIPTS = REPO / "workflow" / "scripts"  # the pipeline's own helpers (run with `python`, or imported here)
sys.path.insert(0, str(SCRIPTS))
from code_fingerprint import fingerprint_text  # noqa: E402
from pipeline_config import check_config, fail, one_line_errors, sweep_experiments  # noqa: E402

# Every problem of the config is one line naming the file and the key (workflow/scripts/pipeline_config.py).
CONFIG_FILES = workflow.configfiles
check_config(config, CONFIG_FILES)
validate(config, "../schemas/pipeline.schema.yaml")  # valid by now: fills in the schema's defaults

# Each point of a sweep is an experiment of its own (NAME-KEY=VALUE-...), built by `sweep_NAME`
# (workflow/rules/sweep.smk), so it is trained, cached and evaluated like any other.
SWEEPS = config["sweeps"]
EXPERIMENTS = {**config["experiments"], **sweep_experiments(SWEEPS, config["experiments"], CONFIG_FILES)}
SWEEP_POINTS = {sweep: [exp for exp, e in EXPERIMENTS.items() if e.get("sweep") == sweep] for sweep in SWEEPS}
# The default target trains and compares these; optional ones are built by their own target:
# `chain` (pretrain -> SFT -> DPO), `rl` (SFT -> GRPO on a synthetic task, workflow/rules/rl.smk) or `sweep_NAME`.
DEFAULT_EXPERIMENTS = [exp for exp, e in EXPERIMENTS.items() if not e["optional"]]
CHAIN_EXPERIMENTS = [exp for exp, e in EXPERIMENTS.items() if e["optional"] and e["target"] == "chain"]
for _exp, _e in EXPERIMENTS.items():
    if _e["init_from_experiment"] not in (None, *EXPERIMENTS):
        fail(f"{', '.join(map(str, CONFIG_FILES))}: 'experiments.{_exp}.init_from_experiment': "
             f"{_e['init_from_experiment']!r} is not an experiment")

# With --software-deployment-method conda every rule runs in this environment; it installs
# IronCore from ${IRONCORE_ROOT}, which is this checkout.
CONDA_ENV = str(REPO / "envs" / "ironcore.yaml")
os.environ.setdefault("IRONCORE_ROOT", str(REPO))

# One id per `snakemake` invocation: it groups the MLflow runs of this invocation. Jobs inherit it
# through the environment (local jobs and SLURM jobs alike), so it is never a param or an input.
os.environ.setdefault("IRONCORE_PIPELINE_INVOCATION", time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")

wildcard_constraints:
    exp="|".join(map(re.escape, EXPERIMENTS)),
    sweep="|".join(map(re.escape, SWEEPS)) or "(?!)",  # no sweeps: matches nothing


# ---- experiments and data sets ------------------------------------------------------------------

def run_dir(exp):
    """The training run folder (checkpoints, metrics): deliberately not a declared output, so
    Snakemake never deletes it and a killed or failed training job resumes on the next run."""
    return f"results/runs/{exp}"


def train_overrides(exp):
    """`ironcore train` KEY=VALUE overrides: the run folder, the starting weights of a chained
    experiment (its base's run folder), then the experiment's own overrides."""
    base = EXPERIMENTS[exp]["init_from_experiment"]
    items = {"trainer.output_dir": run_dir(exp), **({"init.init_from": run_dir(base)} if base else {}),
             **EXPERIMENTS[exp]["overrides"]}
    return [f"{key}={json.dumps(value)}" for key, value in items.items()]


@cache
def training_config(exp):
    """The experiment's fully resolved ironcore training Config (errors surface at parse time, one line)."""
    e = EXPERIMENTS[exp]
    try:
        return load_config(e["config"], train_overrides(exp), e["tensor_parallel"], world_size=e["nproc"] * e["nodes"],
                           read_folder=model_config_from_folder)  # a model: may be an HF folder, as in `ironcore train`
    except UserError as err:
        sweep = f"{', '.join(map(str, CONFIG_FILES))}: 'sweeps.{e['sweep']}': " if "sweep" in e else ""
        fail(f"{sweep}experiment {exp}: {err}")


def hyperparameters(exp):
    """Everything that changes what training computes, as canonical JSON (a rule param).
    `utils` (logging, MLflow names) is left out: it does not change the model."""
    settings = to_dict(training_config(exp))
    settings.pop("utils")
    return json.dumps(settings, sort_keys=True)


@cache
@one_line_errors
def data_config(path):
    return load_data_config(path)


def dataset_of(exp):
    """Name of the data set the experiment trains on (its data config's output folder name)."""
    return Path(data_config(training_config(exp).data.config_path).output_dir).name


def sample_args(exp):
    """The sample options of the `eval` rule's samples.py: the pipeline's eval group, under the experiment's own
    `samples` settings."""
    settings = {**config["eval"], **EXPERIMENTS[exp]["samples"]}
    return shlex.join(
        (["--enabled"] if settings["samples"] else [])
        + [arg for prompt in settings["prompts"] for arg in ("--prompt", prompt)]
        + ["--max-new-tokens", str(settings["max_new_tokens"]), "--temperature", str(settings["temperature"])]
        + (["--top-k", str(settings["top_k"])] if settings["top_k"] else [])
    )


def base_run(exp):
    """The base experiment's finished training (an input of a chained experiment's train job), or nothing."""
    base = EXPERIMENTS[exp]["init_from_experiment"]
    return [f"results/train/{base}/final_eval.json"] if base else []


def _datasets(experiments):
    """Data set name -> data config path, for the experiments; pipeline data sets live in results/data/."""
    found = {}
    for exp in experiments:
        path = training_config(exp).data.config_path
        if path is None:
            fail(f"experiment {exp}: its training config {EXPERIMENTS[exp]['config']} has no data.config_path")
        output_dir = Path(data_config(path).output_dir)
        if output_dir != Path("results/data") / output_dir.name:
            fail(f"{path}: output_dir must be results/data/<name> in the pipeline, not {output_dir}")
        if found.setdefault(output_dir.name, path) != path:
            fail(f"{path} and {found[output_dir.name]} both write {output_dir}")
    return found


DATASETS = _datasets(EXPERIMENTS)
DEFAULT_DATASETS = _datasets(DEFAULT_EXPERIMENTS)  # what `data` (and so the default target) builds

wildcard_constraints:
    dataset="|".join(map(re.escape, DATASETS)),


def data_dir(dataset):
    return f"results/data/{dataset}"


def inspect_outputs(dataset):
    folder = f"{data_dir(dataset)}/inspect"
    return {"report": f"{folder}/report.json", "html": f"{folder}/report.html", "lengths": f"{folder}/lengths.png"}


def preprocess_inputs(wildcards):
    """The data config and the local files it reads: the corpus and tokenizer when they come from
    the `corpus` and `tokenizer` rules, or any other local file or folder (globs are not tracked)."""
    path = DATASETS[wildcards.dataset]
    cfg = data_config(path)
    inputs = {"config": path, "code": code_fingerprint("preprocess")}
    for key, source in (("source", cfg.source), ("valid_source", cfg.valid_source)):
        if source is not None and source.path is not None and not any(c in source.path for c in "*?["):
            inputs[key] = source.path
    if cfg.tokenizer.path is not None:
        tokenizer = Path(cfg.tokenizer.path)
        is_folder = tokenizer.is_dir() or tokenizer.suffix != ".json"
        inputs["tokenizer"] = str(tokenizer / "tokenizer.json" if is_folder else tokenizer)
    return inputs


# ---- evaluation tasks (experiments.<exp>.tasks; workflow/rules/eval.smk) -------------------------

def task_args(exp):
    """``--task SPEC`` for each task the experiment configures."""
    return shlex.join([arg for spec in EXPERIMENTS[exp]["tasks"] for arg in ("--task", spec)])


@one_line_errors
def task_inputs(exp):
    """The files the experiment's tasks read (task YAML files, their items and few-shot examples)."""
    from ironcore.evaluation.task_config import load_task  # torch-free: the Snakefile is parsed at every call

    files = []
    for spec in EXPERIMENTS[exp]["tasks"]:
        task = load_task(spec)
        files += [spec] if "=" not in spec else []
        files += [task.path] + ([task.few_shot.path] if task.few_shot and task.few_shot.k else [])
    return files


# ---- the `rl` target (workflow/rules/rl.smk) ------------------------------------------------------

RL = config["rl"]
RL_TASK = f"results/synthetic/{RL['task']['name']}"


def rl_experiment(key):
    """The experiment that rl.<key> names (checked when the Snakefile is parsed if an experiment has target: rl,
    else when the `rl` target is built)."""
    if RL[key] not in EXPERIMENTS:
        fail(f"{', '.join(map(str, CONFIG_FILES))}: 'rl.{key}': {RL[key]!r} is not an experiment of the pipeline "
             f"config{did_you_mean(RL[key], EXPERIMENTS)}")
    return RL[key]


if any(e["optional"] and e["target"] == "rl" for e in EXPERIMENTS.values()):  # the rl target is set up: check now
    for _key in ("start", "policy"):
        rl_experiment(_key)


# ---- code fingerprints ---------------------------------------------------------------------------
# Each stage takes results/code/<stage>.sha256 as an input: a digest of every ironcore file its entry
# points import, directly or not (workflow/scripts/code_fingerprint.py walks the imports), rewritten
# only when the digest changes, so a code change reruns exactly the stages that run it.

PACKAGE = Path(find_spec("ironcore").origin).parent  # the installed package the `ironcore` command runs


@cache
def code_fingerprint(stage):
    text = fingerprint_text(PACKAGE, stage)
    target = Path(f"results/code/{stage}.sha256")
    if not target.is_file() or target.read_text() != text:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return str(target)


# ---- launching ----------------------------------------------------------------------------------

def torchrun(exp):
    """The launcher of an experiment's training processes.

    One node: `torchrun --standalone`. Several nodes, or `srun: true` (under SLURM): one torchrun per node
    started by srun, meeting at the first node of the allocation through the c10d rendezvous."""
    e = EXPERIMENTS[exp]
    if e["nodes"] == 1 and not e["srun"]:
        return f"torchrun --standalone --nnodes 1 --nproc_per_node {e['nproc']}"
    head = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    return (
        # --overlap: the executor plugin runs the job itself as an srun step holding the allocation's CPUs; a
        # second step that does not share them waits for them forever (reproduced on a one-node cluster).
        f"srun --overlap --nodes {e['nodes']} --ntasks-per-node 1 torchrun --nnodes {e['nodes']} "
        f"--nproc_per_node {e['nproc']} "
        f'--rdzv-backend c10d --rdzv-endpoint "{head}:29500" --rdzv-id "$SLURM_JOB_ID"'
    )


def train_command(exp):
    """The full training command line (shell-quoted)."""
    e = EXPERIMENTS[exp]
    args = ["-m", "ironcore", "train", "--config", e["config"], "--tensor-model-parallel-size", str(e["tensor_parallel"])]
    return f"{torchrun(exp)} {shlex.join(args + train_overrides(exp))}"


# ---- MLflow ---------------------------------------------------------------------------------------
# One parent run per experiment and invocation, created by the first job of the experiment that
# runs (train, or eval when only eval reruns); the training run is its child (`ironcore train
# --mlflow-parent`), the eval job logs val metrics, configs, reports and samples to it and closes it
# (`ironcore mlflow finish`; ironcore/cli/mlflow_runs.py).
#
# The settings reach the jobs as environment variables, not as params: switching MLflow off or
# renaming its experiment changes no result, so it must not rerun anything. Shell commands call
# `ironcore mlflow ...` (a no-op when tracking is off) and pass utils.tracking=$IRONCORE_TRACKING
# utils.experiment_name=$IRONCORE_MLFLOW_EXPERIMENT to training.

os.environ.update(
    IRONCORE_TRACKING="true" if config["mlflow"]["enabled"] else "false",
    IRONCORE_MLFLOW_EXPERIMENT=config["mlflow"]["experiment"],
)
MLFLOW_RUNS = shlex.join([sys.executable, "-m", "ironcore", "mlflow"])


def mlflow_sweep(exp, flag):
    """``FLAG SWEEP`` for a sweep's point, whose parent run is then a child of the sweep's run; else nothing."""
    sweep = EXPERIMENTS[exp].get("sweep")
    return f"{flag} {shlex.quote(sweep)}" if sweep else ""


onstart:
    # Create the sqlite store and the experiment once, before jobs race to do it.
    shell(f"{MLFLOW_RUNS} init")

onerror:
    # Parent runs of this invocation still open belong to experiments whose jobs failed.
    shell(f"{MLFLOW_RUNS} close --status FAILED")
