# The `rl` target (docs/rl.md): a synthetic verifiable task -> its tokenizer -> SFT -> GRPO, then the
# held-out accuracy of the SFT start and of the GRPO policy, and a summary with the reward curve.
# The two experiments are ordinary pipeline experiments (configs/pipeline.yaml, target: rl), so
# their data go through preprocess and inspect, and they train through the `train` rule; every
# setting of the rules below comes from the config's `rl` group through `params:`.

rule synthetic:
    """The task's seeded training and held-out records (`ironcore synthetic`)."""
    input:
        code=code_fingerprint("synthetic"),
    output:
        train=f"{RL_TASK}/train.jsonl",
        heldout=f"{RL_TASK}/heldout.jsonl",
        manifest=f"{RL_TASK}/task.json",
    params:
        task=RL["task"]["name"],
        train=RL["task"]["train"],
        heldout=RL["task"]["heldout"],
        seed=RL["task"]["seed"],
        options=shlex.join(f"{key}={value}" for key, value in RL["task"]["options"].items()),
        folder=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        CONDA_ENV
    log:
        "logs/synthetic.log",
    shell:
        "ironcore synthetic --task {params.task} --output {params.folder} --train {params.train}"
        " --heldout {params.heldout} --seed {params.seed} {params.options} > {log} 2>&1"


rule rl_tokenizer:
    """A byte-level BPE of the task's prompts and answers (the RL data configs point here)."""
    input:
        records=rules.synthetic.output.train,
        code=code_fingerprint("tokenizer"),
    output:
        json="results/rl_tokenizer/tokenizer.json",
        config="results/rl_tokenizer/tokenizer_config.json",
    params:
        vocab_size=RL["tokenizer_vocab_size"],
    conda:
        CONDA_ENV
    log:
        "logs/rl_tokenizer.log",
    shell:
        "ironcore tokenizer --source {input.records} --field prompt --field answer"
        " --vocab-size {params.vocab_size} --output results/rl_tokenizer > {log} 2>&1"


rule rl_eval:
    """Held-out greedy accuracy and pass@k of one RL experiment's final checkpoint (`ironcore eval --task
    synthetic=...`, under the names the GRPO run logs); logs them to the experiment's MLflow parent run and
    closes it (the `eval` rule's job for the other experiments)."""
    input:
        final=rules.train.output.final,
        config=rules.train.output.config,
        metrics=rules.train.output.metrics,
        heldout=rules.synthetic.output.heldout,
        manifest=rules.synthetic.output.manifest,
        code=code_fingerprint("eval"),
    output:
        eval="results/rl/eval/{exp}.json",
        samples="results/rl/eval/{exp}.md",
    params:
        run=lambda wildcards: run_dir(wildcards.exp),
        k=RL["eval"]["k"],
        max_new_tokens=RL["eval"]["max_new_tokens"],
        temperature=RL["eval"]["temperature"],
        seed=RL["eval"]["seed"],
        batch_size=64,  # prompts per batch: the samples' draws depend on it
        device=config["eval"]["device"],
        task=lambda wildcards, input: os.path.dirname(input.manifest),
    threads: config["threads_per_process"]
    conda:
        CONDA_ENV
    log:
        "logs/rl_eval/{exp}.log",
    shell:
        """
        export OMP_NUM_THREADS={threads}
        ironcore eval --checkpoint {params.run} --task synthetic={params.task} --as-validation --pass-at {params.k} \\
            --max-new-tokens {params.max_new_tokens} --temperature {params.temperature} --seed {params.seed} \\
            --micro-batch-size {params.batch_size} --device {params.device} --no-mlflow --output {output.eval} \\
            --samples-markdown {output.samples} > {log} 2>&1
        ironcore mlflow finish --run {wildcards.exp} --eval {output.eval} --config {input.config} \\
            --artifacts eval {output.eval} {output.samples} --artifacts train {input.metrics} >> {log} 2>&1
        """


rule rl_summary:
    """Held-out accuracy before and after GRPO, and the reward curve (Markdown, HTML, PNG, JSON)."""
    input:
        before=lambda wildcards: f"results/rl/eval/{rl_experiment('start')}.json",
        after=lambda wildcards: f"results/rl/eval/{rl_experiment('policy')}.json",
        metrics=lambda wildcards: f"results/train/{rl_experiment('policy')}/metrics.jsonl",
        inspect=lambda wildcards: [inspect_outputs(dataset_of(rl_experiment(key)))["html"]
                                   for key in ("start", "policy")],  # the data reports are built too
        script=SCRIPTS / "rl_summary.py",
    output:
        markdown="results/rl/summary.md",
        html="results/rl/summary.html",
        json="results/rl/summary.json",
        plot="results/rl/reward_curve.png",
    params:
        names=[RL["start"], RL["policy"]],
    conda:
        CONDA_ENV
    log:
        "logs/rl_summary.log",
    shell:
        """
        python {input.script} --before {input.before} --after {input.after} --metrics {input.metrics} \\
            --names {params.names} --output-dir results/rl > {log} 2>&1
        ironcore mlflow attach --runs {params.names} \\
            --artifacts summary {output.markdown} {output.html} {output.plot} {output.json} >> {log} 2>&1
        """
