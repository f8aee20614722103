"""The torch-free preprocessing stage: data config, task types, tokenizer, sources, encoders, shards."""
