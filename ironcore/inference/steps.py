"""Decode steps with fixed shapes: run eagerly, replayed from a CUDA graph, or compiled by inductor.

A static step feeds one token per row into a static :class:`KVCache` (the
slot to write is held in a tensor, attention covers every slot under a mask),
so every call has the same shapes and addresses. That is what lets it be

- replayed from a **CUDA graph** (``graph``): captured once per batch size,
  which removes the per-kernel launch cost that bounds small and medium models
  on a GPU; a capture costs about two steps, so a compacted batch recaptures;
- **compiled** by inductor on the CPU (``compile``): the weights are frozen
  into the compiled step and packed for inductor's own matrix-vector kernels
  (``max_autotune`` with the C++ GEMM template), which read them close to the
  memory bandwidth where MKL's ``sgemv`` on these shapes reaches about half
  of it. The compilation (30 s to minutes, less with inductor's on-disk
  cache warm) is paid once per (model, batch, cache bucket) and kept in
  :data:`COMPILED` while the weights stay unchanged; a weight update (an
  optimizer step, a loaded checkpoint) makes the next call compile again,
  because frozen weights would be stale.
"""

from __future__ import annotations

import math
import time
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ironcore.layers.attention import KVCache
from ironcore.models.transformer import TransformerModel

CACHE_BUCKET = 256  # compiled steps: cache capacities round up to a multiple of this, so prompt lengths share one
COMPILED_PER_MODEL = 2  # compiled steps kept per model (each holds a packed copy of the weights)
# Patched around the step's calls (torch.compile's ``options`` do not reach freezing and autotuning).
INDUCTOR_CONFIG = {
    "freezing": True,  # weights become constants: packed once for the GEMV kernels
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",  # inductor's C++ GEMM template beside MKL, the faster one wins
}


@dataclass
class DecodeReport:
    """What a ``generate``/``stream`` call did; pass one in to read it afterwards (the benchmark does)."""

    path: str = ""  # the decode step used: eager, static, graph or compile
    compile_seconds: float = 0.0  # compiling or capturing decode steps in this call (0 when reused)
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0  # prompt positions computed, padding included
    steps: int = 0  # decode steps run (forward passes after the prefill)
    row_steps: int = 0  # rows computed, summed over those steps: compaction makes it smaller than batch x steps
    compactions: int = 0
    kv_cache_bytes: int = 0  # bytes of the cache's buffers, measured after the prefill allocated them


class StaticStep:
    """A decode step with fixed shapes over a static cache, run eagerly, replayed from a CUDA graph or compiled.

    Its inputs live in fixed buffers (token, positions, the mask over all cache
    slots, the slot to write); each call updates them in place, then runs the
    model (or replays the captured graph) and returns the logits [B, V].
    ``written`` is the number of slots that hold keys already (the next slot
    to write); ``key_valid`` [B, capacity] marks the slots that are real tokens.
    """

    def __init__(self, model: TransformerModel, cache: KVCache, key_valid: torch.Tensor, written: int,
                 run: Callable | None = None, graph: bool = False) -> None:
        B, capacity = key_valid.shape
        device = key_valid.device
        self.model, self.cache, self.window = model, cache, model.config.sliding_window
        self.run = run or _forward
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(B, 1, 1, capacity, dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :written] = key_valid[:, :written]
        if self.window is not None:  # the slots before the next query's window
            self.mask[:, 0, 0, : max(written - self.window + 1, 0)] = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if graph:
            self._capture(written)

    def _run(self) -> torch.Tensor:
        return self.run(self.model, self.token, self.positions, self.mask, self.cache)

    def _capture(self, slot: int) -> None:
        """Warm up on a side stream (as CUDA graphs require), then capture one step. The warm-up steps write
        the next slot, which the first real step overwrites before any query reads it."""
        self.cache.slot.fill_(slot)
        self.mask[:, 0, 0, slot] = True
        device_type = self.token.device.type
        # Autocast's cache of cast weights must stay off while capturing: its tensors die with the context.
        autocast = torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                                  enabled=torch.is_autocast_enabled(device_type), cache_enabled=False)
        side = torch.cuda.Stream(self.token.device)
        side.wait_stream(torch.cuda.current_stream(self.token.device))
        with torch.cuda.stream(side), autocast:
            for _ in range(2):
                self._run()
        torch.cuda.current_stream(self.token.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), autocast:
            self.logits = self._run()

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits [B, V] after feeding ``token`` [B, 1] at ``positions`` into cache slot ``slot``."""
        self.token.copy_(token)
        self.positions.copy_(positions)
        self.cache.slot.fill_(slot)
        self.mask[:, 0, 0, slot] = True
        if self.window is not None and slot - self.window >= 0:
            self.mask[:, 0, 0, slot - self.window] = False  # fell out of the window
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


def _forward(model: TransformerModel, token: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             cache: KVCache) -> torch.Tensor:
    return model(token, positions, mask, kv_cache=cache)[:, -1]


@dataclass
class _Compiled:
    run: Callable
    versions: tuple[int, ...]  # the weights' version counters when it was compiled
    compiled: bool = False  # has run once (compiled) already


# model -> {(batch, cache bucket, dtypes): compiled step}, most recently used last
COMPILED: weakref.WeakKeyDictionary[TransformerModel, OrderedDict] = weakref.WeakKeyDictionary()


def bucket(capacity: int) -> int:
    """The cache capacity a compiled step is built for: ``capacity`` rounded up to :data:`CACHE_BUCKET`."""
    return CACHE_BUCKET * math.ceil(capacity / CACHE_BUCKET)


def has_compiled(model: TransformerModel, key: tuple) -> bool:
    """Whether a compiled step for ``key`` (batch, cache bucket, dtypes) exists for the current weights."""
    entry = COMPILED.get(model, {}).get(key)
    return entry is not None and entry.versions == _versions(model)


def weights_changed(model: TransformerModel) -> bool:
    """Whether the model has compiled steps built for weights it no longer has (it is being trained)."""
    return any(entry.versions != _versions(model) for entry in COMPILED.get(model, {}).values())


def compiled_step(model: TransformerModel, key: tuple) -> _Compiled:
    """The compiled step for ``key`` (batch, cache bucket, dtypes): reused while the weights are unchanged."""
    steps = COMPILED.setdefault(model, OrderedDict())
    versions = _versions(model)
    if any(entry.versions != versions for entry in steps.values()):
        steps.clear()  # frozen copies of old weights
    if key not in steps:
        # Dynamo keeps compiled code per code object: a private copy of the function per step lets each step's
        # frozen weights go when the step is dropped, and a new step never meets an old step's code.
        fn = types.FunctionType(_forward.__code__.replace(), _forward.__globals__, "decode_step")
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}  # versions track validity
        steps[key] = _Compiled(torch.compile(fn, fullgraph=True, dynamic=False, options=options), versions)
        while len(steps) > COMPILED_PER_MODEL:
            steps.popitem(last=False)
    steps.move_to_end(key)
    return steps[key]


def timed(entry: _Compiled, report: DecodeReport) -> Callable:
    """``entry.run``, adding the time of its first call (the compilation) to ``report.compile_seconds``."""

    def run(*args: object) -> torch.Tensor:
        if entry.compiled:
            return entry.run(*args)
        from torch._inductor import config

        start = time.perf_counter()
        with config.patch(INDUCTOR_CONFIG):  # the first call compiles
            out = entry.run(*args)
        report.compile_seconds += time.perf_counter() - start
        entry.compiled = True
        return out

    return run


def _versions(model: TransformerModel) -> tuple[int, ...]:
    """In-place updates bump a tensor's version: a changed tuple means the weights changed."""
    return tuple(p._version for p in model.parameters())
