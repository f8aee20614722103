"""The training samples and batches built from preprocessed shards (the runtime side; imports torch)."""
