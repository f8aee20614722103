"""Data, by when it runs: preprocessing (torch-free), the training samples, and the demo data and report.

preprocessing/   the `ironcore preprocess` stage; never imports torch (a test walks its imports)
    config       the data config (configs/data/*.yaml) and its validation
    tasks        one TaskSpec per task type (pretrain, sft, dpo, rl): fields, shards, encoder, objective
    tokenizer    the one tokenizer wrapper (tokenizer.json, chat templates, BPE training)
    chat_template  chat templates rendered with jinja2
    sources      reading local files and hub data sets as chunks of records
    encode       records -> tokens and loss masks (in the preprocessing workers)
    preprocess   the engine: chunks -> workers -> shards + metadata.json
    indexed      Megatron's .bin/.idx shard format, read and written
    metadata     metadata.json: what a preprocessed data set is
samples/         what training and evaluation read (torch)
    build        a split's samples, built the way its task type says
    pretrain, sft, dpo, rl   the samples of each task type, from a split's shards
    batches      the micro-batches of each optimizer step (resumable, the same at any DP layout)
demo/            data to try things with, and what users look at
    corpus       the built-in offline corpus (the standard library's docs and sources)
    synthetic    generated tasks whose answers a program checks (for SFT, RL and evaluation)
    inspect      statistics and the HTML report of a preprocessed data set

Modules are imported directly (``from ironcore.data.samples.pretrain import PretrainDataset``).
"""
