"""Generation with a KV cache: ``generate`` (token lists) and ``stream`` (one step at a time).

generate   prefill + decode loop, sampling (greedy, temperature, top-k, top-p, seeds), stop tokens
settings   a model folder's generation_config.json (end tokens, BOS, sampling defaults) under explicit choices
"""

from ironcore.inference.generate import check_sampling, generate, sample_next, stream

__all__ = ["check_sampling", "generate", "sample_next", "stream"]
