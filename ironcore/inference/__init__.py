"""Generation with a KV cache: ``generate`` (token lists) and ``stream`` (one step at a time).

generate   prefill + decode loop: the running rows, the step backend chosen once, continuous batching, stop tokens
sampling   the next token: HF's filters (temperature, top-k, top-p), one uniform per row, no sort on a CPU
steps      decode steps with fixed shapes: static, CUDA graph, inductor-compiled
settings   a model folder's generation_config.json (end tokens, BOS, sampling defaults) under explicit choices
"""

from ironcore.inference.generate import check_sampling, generate, stream
from ironcore.inference.sampling import sample_next
from ironcore.inference.steps import DecodeReport

__all__ = ["DecodeReport", "check_sampling", "generate", "sample_next", "stream"]
