# Training: one job per experiment, launched with torchrun (the experiment's nodes, nproc and
# tensor-parallel size from configs/pipeline.yaml).
#
# The run itself lives in results/runs/<exp> (checkpoints, metrics.jsonl, config.yaml), which is
# NOT a declared output: Snakemake deletes the outputs of failed jobs, and that folder must
# survive so that rerunning a killed or failed job resumes from its last checkpoint (`ironcore
# train` resumes from checkpoints/latest by itself). The declared outputs are copies made when
# training has finished.
#
# Resume or start over? `ironcore train --signature` keeps a signature (hyperparameters, data and code) in
# the run folder. An unfinished run with the same signature resumes; a finished run (Snakemake only reruns
# one because something changed or --forcerun asked for it) or one with another signature is cleared and
# trained from scratch. `--export` then copies the declared outputs out of the finished run.
#
# MLflow settings arrive as environment variables set by common.smk, not as params, on purpose:
# they change no result and must not rerun training. `--mlflow-parent` makes the training run a child of
# the experiment's parent run of this invocation (`ironcore mlflow`); `--mlflow-sweep` makes that parent, for a
# sweep's point, a child of the sweep's run.


rule train:
    input:
        data=lambda wildcards: rules.preprocess.output.metadata.format(dataset=dataset_of(wildcards.exp)),
        config=lambda wildcards: EXPERIMENTS[wildcards.exp]["config"],
        code=code_fingerprint("train"),
        base=lambda wildcards: base_run(wildcards.exp),  # a chained experiment starts from its base's weights
    output:
        final="results/train/{exp}/final_eval.json",
        metrics="results/train/{exp}/metrics.jsonl",
        config="results/train/{exp}/config.yaml",
    params:
        hparams=lambda wildcards: hyperparameters(wildcards.exp),  # every hyperparameter, resolved: a change reruns
        command=lambda wildcards: train_command(wildcards.exp),
        export=lambda wildcards, output: os.path.dirname(output.final),
        sweep=lambda wildcards: mlflow_sweep(wildcards.exp, "--mlflow-sweep"),
    threads: lambda wildcards: EXPERIMENTS[wildcards.exp]["nproc"] * config["threads_per_process"]
    resources:
        nodes=lambda wildcards: EXPERIMENTS[wildcards.exp]["nodes"],
        tasks=lambda wildcards: EXPERIMENTS[wildcards.exp]["nodes"],  # one torchrun per node
        # SLURM (executor plugin): GPUs of the whole job; threads above become --cpus-per-task.
        gpu=lambda wildcards: EXPERIMENTS[wildcards.exp]["gpus_per_node"] * EXPERIMENTS[wildcards.exp]["nodes"],
        tasks_per_gpu=0,  # no --ntasks-per-gpu: one task (torchrun) per node, whatever the GPUs
    conda:
        CONDA_ENV
    log:
        "logs/train/{exp}.log",
    benchmark:
        "benchmarks/pipeline/train/{exp}.tsv"
    shell:
        "{params.command} --signature {input.data} --signature {input.code} --export {params.export}"
        " --mlflow-parent {wildcards.exp} {params.sweep} --threads {threads}"
        ' utils.tracking="$IRONCORE_TRACKING" utils.experiment_name="$IRONCORE_MLFLOW_EXPERIMENT"'
        " utils.run_name={wildcards.exp}/train > {log} 2>&1"
