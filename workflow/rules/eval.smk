# Evaluation of each trained experiment, then one summary comparing them all.
# MLflow settings arrive as environment variables set by common.smk, not as params, on purpose:
# they change no result and must not rerun anything.


rule tasks:
    """What the final checkpoint can do: accuracy on the experiment's configured tasks (experiments.<exp>.tasks;
    none configured: an empty table), also logged as eval/<task>/<metric> to its training run in MLflow."""
    input:
        final=rules.train.output.final,
        tasks=lambda wildcards: task_inputs(wildcards.exp),
        code=code_fingerprint("eval"),
    output:
        tasks="results/eval/{exp}/tasks.json",
    params:
        run=lambda wildcards: run_dir(wildcards.exp),
        tasks=lambda wildcards: task_args(wildcards.exp),
        configured=lambda wildcards: "yes" if EXPERIMENTS[wildcards.exp]["tasks"] else "",
        device=config["eval"]["device"],
    threads: config["threads_per_process"]
    conda:
        CONDA_ENV
    log:
        "logs/tasks/{exp}.log",
    shell:
        """
        export OMP_NUM_THREADS={threads}
        if [ -n "{params.configured}" ]; then
            ironcore eval --checkpoint {params.run} {params.tasks} --device {params.device} \\
                --output {output.tasks} > {log} 2>&1
        else
            echo '{{"tasks": {{}}}}' > {output.tasks} && echo "no tasks configured" > {log}
        fi
        """


rule eval:
    """Validation loss/perplexity of the final checkpoint and a few generated samples; logs them, the task
    results, the configs and the data report to the experiment's MLflow parent run and closes it."""
    input:
        final=rules.train.output.final,
        tasks=rules.tasks.output.tasks,
        config=rules.train.output.config,
        metrics=rules.train.output.metrics,
        data_config=lambda wildcards: DATASETS[dataset_of(wildcards.exp)],
        inspect=lambda wildcards: list(inspect_outputs(dataset_of(wildcards.exp)).values()),
        code=code_fingerprint("eval"),
        samples_script=SCRIPTS / "samples.py",
    output:
        eval="results/eval/{exp}/eval.json",
        samples="results/eval/{exp}/samples.md",
        samples_json="results/eval/{exp}/samples.json",
    params:
        run=lambda wildcards: run_dir(wildcards.exp),
        sweep=lambda wildcards: mlflow_sweep(wildcards.exp, "--sweep"),
        eval_args=shlex.join(
            ["--device", config["eval"]["device"], "--micro-batch-size", str(config["eval"]["micro_batch_size"])]
            + (["--max-batches", str(config["eval"]["max_batches"])] if config["eval"]["max_batches"] else [])
        ),
        sample_args=lambda wildcards: sample_args(wildcards.exp),
    threads: config["threads_per_process"]
    conda:
        CONDA_ENV
    log:
        "logs/eval/{exp}.log",
    benchmark:
        "benchmarks/pipeline/eval/{exp}.tsv"
    shell:
        """
        export OMP_NUM_THREADS={threads}
        ironcore eval --checkpoint {params.run} --output {output.eval} {params.eval_args} > {log} 2>&1
        python {input.samples_script} --checkpoint {params.run} --output {output.samples} \\
            --output-json {output.samples_json} {params.sample_args} >> {log} 2>&1
        ironcore mlflow finish --run {wildcards.exp} {params.sweep} --eval {output.eval} {input.tasks} \\
            --config {input.config} --artifacts eval {output.eval} {input.tasks} {output.samples} {output.samples_json} \\
            --artifacts config {input.config} {input.data_config} \\
            --artifacts train {input.metrics} \\
            --artifacts data {input.inspect} >> {log} 2>&1
        """


rule summary:
    """One table (Markdown + HTML) and one loss-curve plot comparing the experiments, with the
    corpus' unigram entropy as the baseline a model must beat to have learned anything."""
    input:
        evals=expand(rules.eval.output.eval, exp=DEFAULT_EXPERIMENTS),
        samples=expand(rules.eval.output.samples_json, exp=DEFAULT_EXPERIMENTS),
        tasks=expand(rules.tasks.output.tasks, exp=DEFAULT_EXPERIMENTS),
        metrics=expand(rules.train.output.metrics, exp=DEFAULT_EXPERIMENTS),
        configs=expand(rules.train.output.config, exp=DEFAULT_EXPERIMENTS),
        data=[rules.preprocess.output.metadata.format(dataset=dataset_of(exp)) for exp in DEFAULT_EXPERIMENTS],
        script=SCRIPTS / "summary.py",
        table_script=SCRIPTS / "task_table.py",
    output:
        markdown="results/summary/summary.md",
        html="results/summary/summary.html",
        json="results/summary/summary.json",
        plot="results/summary/loss_curves.png",
    params:
        experiments=DEFAULT_EXPERIMENTS,
    conda:
        CONDA_ENV
    log:
        "logs/summary.log",
    benchmark:
        "benchmarks/pipeline/summary.tsv"
    shell:
        """
        python {input.script} --experiments {params.experiments} --evals {input.evals} \\
            --samples {input.samples} --tasks {input.tasks} --metrics {input.metrics} --configs {input.configs} \\
            --data {input.data} \\
            --output-dir results/summary > {log} 2>&1
        ironcore mlflow attach --runs {params.experiments} --artifacts summary {output.markdown} {output.html} \\
            {output.plot} >> {log} 2>&1
        """


rule chain_summary:
    """The optional chain's task accuracy side by side (experiments.<exp>.tasks; Markdown, HTML, JSON)."""
    input:
        tasks=expand(rules.tasks.output.tasks, exp=CHAIN_EXPERIMENTS),
        script=SCRIPTS / "task_table.py",
    output:
        markdown="results/chain/tasks.md",
        html="results/chain/tasks.html",
        json="results/chain/tasks.json",
    params:
        experiments=CHAIN_EXPERIMENTS,
    conda:
        CONDA_ENV
    log:
        "logs/chain_summary.log",
    shell:
        "python {input.script} --experiments {params.experiments} --tasks {input.tasks} --output-dir results/chain"
        " > {log} 2>&1"
