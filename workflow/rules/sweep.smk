# Sweeps (configs/pipeline.yaml `sweeps`, docs/playground.md): each point is an ordinary experiment
# (common.smk expands the grid), trained and evaluated by the `train`, `tasks` and `eval` rules and
# cached like any other, so adding a point trains only that point. This rule ranks the points by
# their final validation loss and overlays their curves, then attaches the summary to the sweep's
# MLflow run (whose children are the points' parent runs) and closes it.


rule sweep_summary:
    """One sweep's points ranked by final validation loss (Markdown, HTML, JSON) and their curves in one figure."""
    input:
        evals=lambda wildcards: expand(rules.eval.output.eval, exp=SWEEP_POINTS[wildcards.sweep]),
        metrics=lambda wildcards: expand(rules.train.output.metrics, exp=SWEEP_POINTS[wildcards.sweep]),
        times=lambda wildcards: expand("benchmarks/pipeline/train/{exp}.tsv", exp=SWEEP_POINTS[wildcards.sweep]),
        script=SCRIPTS / "sweep_summary.py",
    output:
        markdown="results/sweeps/{sweep}/summary.md",
        html="results/sweeps/{sweep}/summary.html",
        json="results/sweeps/{sweep}/summary.json",
        plot="results/sweeps/{sweep}/curves.png",
    params:
        points=lambda wildcards: shlex.quote(json.dumps({exp: EXPERIMENTS[exp]["swept"]
                                                         for exp in SWEEP_POINTS[wildcards.sweep]})),
        base=lambda wildcards: SWEEPS[wildcards.sweep]["base"],
        folder=lambda wildcards, output: os.path.dirname(output.markdown),
    conda:
        CONDA_ENV
    log:
        "logs/sweeps/{sweep}.log",
    shell:
        """
        python {input.script} --sweep {wildcards.sweep} --base {params.base} --points {params.points} \\
            --evals {input.evals} --metrics {input.metrics} --times {input.times} --output-dir {params.folder} > {log} 2>&1
        ironcore mlflow sweep --sweep {wildcards.sweep} --artifacts summary {output.markdown} {output.html} \\
            {output.json} {output.plot} >> {log} 2>&1
        """
