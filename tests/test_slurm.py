"""The SLURM profile on a real one-node cluster (scripts/slurm/local_cluster.sh): the `data` target and a
short training job through sbatch, launched the multi-node way (srun + torchrun's c10d rendezvous).

Needs SLURM's daemons (`scripts/slurm/local_cluster.sh install`, Debian's slurm-wlm and munge) and
snakemake-executor-plugin-slurm; skipped without them, except where IRONCORE_REQUIRE_SLURM=1 (CI) makes
their absence a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline import DATA_CONFIG, SNAKEFILE, environment, training_config, write_yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm" / "local_cluster.sh"
MISSING = [name for name in ("slurmctld", "slurmd", "munged", "ironcore", "torchrun") if shutil.which(name) is None]
if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
    MISSING.append("snakemake-executor-plugin-slurm")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING) and os.environ.get("IRONCORE_REQUIRE_SLURM") != "1",
                       reason=f"needs {', '.join(MISSING)} (scripts/slurm/local_cluster.sh install)"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, str]:
    """A running one-node cluster; the environment its clients need."""
    assert not MISSING, f"missing: {', '.join(MISSING)}"
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        logs = "".join(f"\n--- {log.name}:\n{log.read_text()[-2000:]}" for log in sorted(folder.glob("*.log")))
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], timeout=60)
        pytest.fail(f"the cluster did not start: {started.stderr[-2000:]}{logs}")
    try:
        yield {"SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], check=True, timeout=60)


def test_data_and_training_through_the_slurm_profile(cluster, tmp_path):
    workdir = tmp_path
    write_yaml(workdir / "cfg" / "data.yaml", DATA_CONFIG)
    train = training_config("tiny-rms", "rmsnorm")
    train["operation"].update(train_steps=4, eval_interval=0, log_interval=2)
    write_yaml(workdir / "cfg" / "a.yaml", train)
    write_yaml(workdir / "pipeline.yaml", {
        "corpus": {"max_bytes": 100_000}, "tokenizer": {"vocab_size": 512}, "mlflow": {"enabled": False},
        "experiments": {"a": {"config": "cfg/a.yaml", "nproc": 1, "srun": True}},  # the multi-node launch
    })
    # The profile as a user fills it in: the account and the partitions, nothing else.
    profile = (ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text()
    for placeholder in ("<account>", "<cpu partition>", "<gpu partition>"):
        assert placeholder in profile
    profile = profile.replace("<account>", "ironcore").replace("<cpu partition>", "debug")
    write_yaml(workdir / "profile" / "config.yaml", yaml.safe_load(profile.replace("<gpu partition>", "debug")))
    env = {**environment(workdir), **cluster}
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "--configfile",
               str(workdir / "pipeline.yaml"), "--workflow-profile", str(workdir / "profile"),
               "--latency-wait", "5", "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1"]
    done = subprocess.run([*command, "data", "results/train/a/final_eval.json"], env=env, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"snakemake failed:\n{output[-6000:]}"
    for rule in ("corpus", "tokenizer", "preprocess", "inspect", "train"):  # each one an sbatch job
        assert re.search(rf"rule {rule}:.*?submitted with SLURM jobid \d+", output, re.DOTALL), rule
    assert (workdir / "results" / "data" / "tiny" / "metadata.json").is_file()
    assert "srun --overlap --nodes 1 --ntasks-per-node 1 torchrun" in output
    metrics = (workdir / "results" / "train" / "a" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 4
