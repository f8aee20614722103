"""Data: Megatron shards, preprocessing (source -> shards), inspection, training datasets, sampler.

Modules are imported directly (``from ironcore.data.pretrain import PretrainDataset``) so that
preprocessing never imports torch and training never imports the tokenizer trainer.
"""
