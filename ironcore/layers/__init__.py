"""Transformer building blocks: norms, rotary embeddings, attention and MLPs."""
