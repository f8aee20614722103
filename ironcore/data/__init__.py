"""Data sets: the data config, task types, tokenizer, preprocessing into Megatron shards, inspection, samples.

config      the data config (configs/data/*.yaml) and its validation
tasks       one TaskSpec per task type (pretrain, sft, dpo): fields, shards, encoder, samples, objective
tokenizer   the one tokenizer wrapper (tokenizer.json, chat templates, BPE training)
corpus      the built-in offline corpus (the standard library's docs and sources)
sources     reading local files and hub data sets as chunks of records
encode      records -> tokens and loss masks (in the preprocessing workers)
preprocess  the `ironcore preprocess` engine: chunks -> workers -> shards + metadata.json
indexed     Megatron's .bin/.idx shard format, read and written
metadata    metadata.json: what a preprocessed data set is
inspect     statistics and the HTML report of a preprocessed data set
pretrain, sft, dpo   training samples built from a split's shards
batches     the micro-batches of each optimizer step (resumable, the same at any DP layout)

Modules are imported directly (``from ironcore.data.pretrain import PretrainDataset``) so that
preprocessing never imports torch and training never imports the tokenizer trainer.
"""
