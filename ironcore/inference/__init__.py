"""Generation with a KV cache: ``generate`` (token lists) and ``stream`` (one step at a time).

generate   prefill + decode loop (ragged batches compacted as rows finish), sampling, stop tokens
steps      decode steps with fixed shapes: static, CUDA graph, inductor-compiled
settings   a model folder's generation_config.json (end tokens, BOS, sampling defaults) under explicit choices
"""

from ironcore.inference.generate import check_sampling, generate, sample_next, stream
from ironcore.inference.steps import DecodeReport

__all__ = ["DecodeReport", "check_sampling", "generate", "sample_next", "stream"]
