# Data stages: built-in corpus -> tokenizer -> preprocess -> inspect. Each rule calls one
# `ironcore` sub-command; its settings arrive through `params:` and its package code through
# a fingerprint input (see common.smk), so Snakemake reruns a stage exactly when one changes.


rule corpus:
    """The built-in English + Python corpus from this interpreter's standard library."""
    input:
        code=code_fingerprint("corpus"),
    output:
        train="results/corpus/train.jsonl",
        valid="results/corpus/valid.jsonl",
        manifest="results/corpus/manifest.json",
    params:
        valid_fraction=config["corpus"]["valid_fraction"],
        max_bytes=f"--max-bytes {config['corpus']['max_bytes']}" if config["corpus"]["max_bytes"] else "",
        python=platform.python_version(),  # another Python has another standard library
    conda:
        CONDA_ENV
    log:
        "logs/corpus.log",
    benchmark:
        "benchmarks/pipeline/corpus.tsv"
    shell:
        "ironcore corpus --output results/corpus --valid-fraction {params.valid_fraction} {params.max_bytes}"
        " > {log} 2>&1"


rule tokenizer:
    """A byte-level BPE trained on the corpus' training part (data configs point tokenizer.path here)."""
    input:
        corpus=rules.corpus.output.train,
        code=code_fingerprint("tokenizer"),
    output:
        json="results/tokenizer/tokenizer.json",
        config="results/tokenizer/tokenizer_config.json",
    params:
        vocab_size=config["tokenizer"]["vocab_size"],
        min_frequency=config["tokenizer"]["min_frequency"],
    conda:
        CONDA_ENV
    log:
        "logs/tokenizer.log",
    benchmark:
        "benchmarks/pipeline/tokenizer.tsv"
    shell:
        "ironcore tokenizer --source {input.corpus} --vocab-size {params.vocab_size}"
        " --min-frequency {params.min_frequency} --output results/tokenizer > {log} 2>&1"


rule preprocess:
    """Tokenize a data set into Megatron shards in results/data/<dataset>.

    Snakemake decides when this runs, so a run always rebuilds: the folder is cleared first
    (Snakemake has already deleted metadata.json, which `ironcore preprocess` would otherwise
    take for a foreign folder)."""
    input:
        unpack(preprocess_inputs),
    output:
        metadata="results/data/{dataset}/metadata.json",
    params:
        settings=lambda wildcards: json.dumps(to_dict(data_config(DATASETS[wildcards.dataset])), sort_keys=True),
        folder=lambda wildcards: data_dir(wildcards.dataset),
    threads: 2
    conda:
        CONDA_ENV
    log:
        "logs/preprocess/{dataset}.log",
    benchmark:
        "benchmarks/pipeline/preprocess/{dataset}.tsv"
    shell:
        "rm -rf {params.folder} && ironcore preprocess --config {input.config} --no-progress > {log} 2>&1"


rule inspect:
    """Statistics and the human report (HTML with decoded samples, length histogram) of a data set."""
    input:
        metadata=rules.preprocess.output.metadata,
        config=lambda wildcards: DATASETS[wildcards.dataset],
        code=code_fingerprint("inspect"),
    output:
        **inspect_outputs("{dataset}"),
    priority: 1  # seconds of work: before the long training jobs take every core
    conda:
        CONDA_ENV
    log:
        "logs/inspect/{dataset}.log",
    benchmark:
        "benchmarks/pipeline/inspect/{dataset}.tsv"
    shell:
        "ironcore preprocess --config {input.config} --only-inspect > {log} 2>&1"
