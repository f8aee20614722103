# IronCore pipeline (docs/pipeline.md):
#
#   corpus -> tokenizer -> preprocess -> inspect -> train -> eval -> summary
#
#   snakemake --cores 2                    everything (the default target `all`)
#   snakemake --cores 2 data               corpus, tokenizer, shards and inspection reports
#   snakemake --cores 2 train_all          ... and every experiment trained
#   snakemake --cores 2 eval_all           ... and evaluated
#   snakemake --cores 2 --forcerun train   retrain (and re-evaluate, re-summarize)
#   snakemake --cores 2 chain              the optional experiments: pretrain -> SFT -> DPO
#   snakemake --cores 2 rl                 synthetic task -> SFT -> GRPO -> accuracy before/after
#   snakemake --cores 2 sweep_NAME         every point of the sweep NAME, ranked (results/sweeps/NAME)
#
# Settings: configs/pipeline.yaml (schema: workflow/schemas/pipeline.schema.yaml). Rules only call
# the `ironcore` command line (and small evaluation and reporting scripts in workflow/scripts/).

import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("8.0")

sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))
from pipeline_config import read_config_files  # noqa: E402

# Snakemake reads the config files itself and keeps the last of a key given twice: read them through IronCore's
# YAML loader first, for one line naming the file and the line(s) of that, or of a syntax error (a file given
# with --configfile is read by Snakemake before this, and a syntax error in it is Snakemake's own message).
read_config_files(["configs/pipeline.yaml", *workflow.configfiles])


configfile: "configs/pipeline.yaml"


include: "workflow/rules/common.smk"


rule all:
    """Default target: the summary comparing every experiment."""
    input:
        "results/summary/summary.md",


rule data:
    """Corpus, tokenizer, token shards and inspection reports of every data set."""
    input:
        [inspect_outputs(dataset)["report"] for dataset in DEFAULT_DATASETS],


rule train_all:
    """Every experiment trained (the `train` rule is one experiment's job)."""
    input:
        expand("results/train/{exp}/final_eval.json", exp=DEFAULT_EXPERIMENTS),


rule eval_all:
    """Every experiment evaluated (the `eval` rule is one experiment's job)."""
    input:
        expand("results/eval/{exp}/eval.json", exp=DEFAULT_EXPERIMENTS),


rule chain:
    """The optional experiments (configs/pipeline.yaml: optional: true), each started from the final
    weights of its init_from_experiment: the pretrain -> SFT -> DPO chain, and their task accuracy."""
    input:
        expand("results/train/{exp}/final_eval.json", exp=CHAIN_EXPERIMENTS),
        ["results/chain/tasks.md"] if CHAIN_EXPERIMENTS else [],


rule rl:
    """Reinforcement learning on a synthetic verifiable task: SFT, then GRPO from it, evaluated before
    and after (configs/pipeline.yaml: rl and the experiments with target: rl; docs/rl.md)."""
    input:
        "results/rl/summary.md",


# One target per sweep (configs/pipeline.yaml `sweeps`): its points trained, evaluated and ranked.
for _sweep in SWEEPS:

    rule:
        name:
            f"sweep_{_sweep}"
        input:
            f"results/sweeps/{_sweep}/summary.md",


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/rl.smk"
include: "workflow/rules/sweep.smk"
