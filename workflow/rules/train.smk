# Training: one job per experiment, launched with torchrun (the experiment's nodes, nproc and
# tensor-parallel size from configs/pipeline.yaml).
#
# The run itself lives in results/runs/<exp> (checkpoints, metrics.jsonl, config.yaml), which is
# NOT a declared output: Snakemake deletes the outputs of failed jobs, and that folder must
# survive so that rerunning a killed or failed job resumes from its last checkpoint (`ironcore
# train` resumes from checkpoints/latest by itself). The declared outputs are copies made when
# training has finished.
#
# Resume or start over? The job writes a signature (hyperparameters, data and code) into the run
# folder. An unfinished run with the same signature resumes; a finished run (Snakemake only
# reruns one because something changed or --forcerun asked for it) or one with another signature
# is cleared and trained from scratch.
#
# MLflow settings arrive as environment variables set by common.smk, not as params, on purpose:
# they change no result and must not rerun training.


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
        hparams=lambda wildcards: hyperparameters(wildcards.exp),  # every hyperparameter, resolved
        hparams_digest=lambda wildcards: hashlib.sha256(hyperparameters(wildcards.exp).encode()).hexdigest(),
        run=lambda wildcards: run_dir(wildcards.exp),
        command=lambda wildcards: train_command(wildcards.exp),
        nproc=lambda wildcards: EXPERIMENTS[wildcards.exp]["nproc"],
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
        """
        signature=$(echo {params.hparams_digest} | cat - {input.data} {input.code} | sha256sum | cut -c1-16)
        if [ -f {params.run}/final_eval.json ] || [ "$(cat {params.run}/signature 2>/dev/null)" != "$signature" ]; then
            rm -rf {params.run}
        fi
        mkdir -p {params.run} && echo "$signature" > {params.run}/signature
        export MLFLOW_PARENT_RUN_ID=$(python "$IRONCORE_MLFLOW_RUNS" parent --run {wildcards.exp})
        export OMP_NUM_THREADS=$(( {threads} / {params.nproc} > 0 ? {threads} / {params.nproc} : 1 ))
        {params.command} utils.tracking="$IRONCORE_TRACKING" utils.experiment_name="$IRONCORE_MLFLOW_EXPERIMENT" \
            utils.run_name={wildcards.exp}/train > {log} 2>&1
        cp {params.run}/final_eval.json {output.final}
        cp {params.run}/metrics.jsonl {output.metrics}
        cp {params.run}/config.yaml {output.config}
        """
