"""Decode steps with fixed shapes: run eagerly, replayed from CUDA graphs, or compiled by inductor.

A static step feeds one token per row into a static KV cache (the slot to
write is held in a tensor, attention covers every slot under a mask), so every
call has the same shapes and addresses. Its buffers live in a
:class:`DecodeArena`, one per model, kept from call to call (the cache of the
largest batch seen at that capacity; :func:`release` frees it). That is what
lets the step be

- replayed from **CUDA graphs** (``graph``): captured once per batch bucket
  (powers of two) on views of the arena's first rows, vLLM's way, and
  replayed by every later call while the weights stay where they are; it
  removes the Python and launch cost that bounds small and medium models on
  a GPU. A compacted batch moves its rows to the front and replays a smaller
  bucket's graph: nothing is captured twice;
- **compiled** by inductor on the CPU (``compile``): the weights are frozen
  into the compiled step and packed for inductor's own matrix-vector kernels
  (``max_autotune`` with the C++ GEMM template), which read them close to the
  memory bandwidth where MKL's ``sgemv`` on these shapes reaches about half
  of it. The compilation (30 s to minutes, less with inductor's on-disk
  cache warm) is paid once per (model, batch, cache bucket) and kept in
  :data:`COMPILED` while the weights stay unchanged; a weight update (an
  optimizer step, a loaded checkpoint) makes the next call compile again,
  because frozen weights would be stale. (A graph reads the weights where
  they are, so an optimizer step needs no new capture.) A step compiled
  with the weights as inputs (``freezing`` off) would survive the updates,
  and was measured for RL on a CPU (issue 32, docs/inference.md): it does
  not pay -- no faster for the RL pipeline's tiny model, and for a 135M
  model its gain per full step is lost to the finished rows it cannot drop
  (each batch size would be another compilation) -- so training stays eager.
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
ARENA_BUCKET = 64  # static steps and graphs: the same, finer (attention reads every slot of the cache)
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
    kv_cache_shape: tuple[int, int] = (0, 0)  # the rows and positions they hold (an arena's may exceed the batch)


class DecodeArena:
    """Static decode buffers for up to ``rows`` rows and ``capacity`` cache slots, kept from one call to the next.

    Holds the KV cache and the step's inputs (token, positions, the mask over
    every slot; the slot to write is a tensor); a step for k rows runs on views
    of their first k rows, so its shapes and addresses are the same at every
    position. With ``graphs`` (CUDA) the step is captured in a CUDA graph once
    per batch bucket (k rounded up to a power of two, at most ``rows``) and
    replayed; the bucket's rows past k are copies of finished rows whose
    outputs are ignored. Compaction moves the rows still running to the front.
    ``run`` computes the step (the plain forward, or a compiled one).
    """

    def __init__(self, model: TransformerModel, rows: int, capacity: int, key: tuple, graphs: bool = False) -> None:
        device = next(model.parameters()).device
        self.model, self.rows, self.capacity, self.key = model, rows, capacity, key
        self.run: Callable = forward_step
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=device)
        self.cache = KVCache(len(model.layers), capacity, self.slot)  # buffers allocated by the first load
        self.views: dict[int, KVCache] = {}  # k -> the cache of the first k rows
        self.padded = graphs
        self.capture = graphs and device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None  # the graphs share their memory
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its logits)
        self.pointers = _pointers(model)
        self.count = 0  # rows in use
        self.busy = False  # a stream is decoding with it
        self.report = DecodeReport()

    def bucket(self, k: int) -> int:
        """The rows a step for ``k`` rows computes: k, or with graphs the next power of two (at most ``rows``)."""
        return min(self.rows, 1 << (k - 1).bit_length()) if self.padded else k

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def load(self, prefill: KVCache, rows: torch.Tensor | None, key_valid: torch.Tensor, written: int,
             report: DecodeReport) -> None:  # fmt: skip
        """Start a call: the prefilled cache's ``rows`` (all when None) become the first rows, ``written`` slots
        full; ``key_valid`` [B, capacity] marks the slots that are real tokens."""
        B = key_valid.shape[0]
        for mine, theirs in zip(self.cache.layers, prefill.layers, strict=True):
            if mine.keys is None:  # zeros: slots attended under the mask must hold numbers (0 x NaN is NaN)
                shape = (self.rows, theirs.keys.shape[1], self.capacity, theirs.keys.shape[3])
                mine.keys = torch.zeros(shape, dtype=theirs.keys.dtype, device=theirs.keys.device)
                mine.values = torch.zeros(shape, dtype=theirs.values.dtype, device=theirs.values.device)
            for dst, src in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                dst[:B, :, :written] = src[:, :, :written] if rows is None else src[rows, :, :written]
        self.mask[:B] = False
        self.mask[:B, 0, 0, :written] = key_valid[:, :written]
        self.mask[B:] = self.mask[0]  # rows past the batch (computed in a bucket) attend like a real one
        self.count, self.report = B, report

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the rows ``rows`` (sorted indices of the rows in use), moved to the front."""
        for layer in self.cache.layers:
            for t in (layer.keys, layer.values):
                t[: len(rows)] = t[rows]
        self.mask[: len(rows)] = self.mask[rows]
        self.count = len(rows)

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits [k, V] after feeding ``token`` [k, 1] at ``positions`` into cache slot ``slot`` (k rows in use)."""
        k = token.shape[0]
        self.token[:k] = token
        self.positions[:k] = positions
        self.slot.fill_(slot)
        self.mask[:, 0, 0, slot] = True  # (the model narrows it to each layer's sliding window)
        b = self.bucket(k)
        if not self.capture:
            return self._run(b)[:k]
        if b not in self.graphs:
            self._capture(b)
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:k]

    def _run(self, b: int) -> torch.Tensor:
        if b not in self.views:
            view = self.views[b] = KVCache(len(self.cache.layers), self.capacity, self.slot)
            for part, whole in zip(view.layers, self.cache.layers, strict=True):
                part.keys, part.values = whole.keys[:b], whole.values[:b]
        return self.run(self.model, self.token[:b], self.positions[:b], self.mask[:b], self.views[b])

    def _capture(self, b: int) -> None:
        """Warm up on a side stream (as CUDA graphs require), then capture the step for ``b`` rows. The warm-up
        steps compute the step about to be replayed, so what they write is what it writes."""
        started = time.perf_counter()
        device_type = self.token.device.type
        # Autocast's cache of cast weights must stay off while capturing: its tensors die with the context.
        autocast = torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                                  enabled=torch.is_autocast_enabled(device_type), cache_enabled=False)
        side = torch.cuda.Stream(self.token.device)
        side.wait_stream(torch.cuda.current_stream(self.token.device))
        with torch.cuda.stream(side), autocast:
            for _ in range(2):
                self._run(b)
        torch.cuda.current_stream(self.token.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), autocast:
            logits = self._run(b)
        self.graphs[b] = (graph, logits)
        torch.cuda.synchronize(self.token.device)
        self.report.compile_seconds += time.perf_counter() - started


# model -> its decode arena (one: each holds a KV cache for its largest batch)
ARENAS: weakref.WeakKeyDictionary[TransformerModel, DecodeArena] = weakref.WeakKeyDictionary()


def arena(model: TransformerModel, batch: int, capacity: int, graphs: bool) -> DecodeArena:
    """The model's arena when it fits (rows >= ``batch``, this capacity and these dtypes, graphs or not, the
    weights at the addresses its graphs read) and no other stream is using it; else a new one, kept instead."""
    key = (capacity, graphs, *weight_dtypes(model))
    current = ARENAS.get(model)
    if (current is not None and not current.busy and current.key == key and current.rows >= batch
            and current.pointers == _pointers(model)):  # fmt: skip
        return current
    ARENAS.pop(model, None)  # its cache goes before the new one is allocated (unless a stream still holds it)
    ARENAS[model] = DecodeArena(model, batch, capacity, key, graphs)
    return ARENAS[model]


def release(model: TransformerModel) -> None:
    """Free what decoding keeps for ``model`` between calls: its arena (KV cache, CUDA graphs) and compiled steps."""
    ARENAS.pop(model, None)
    COMPILED.pop(model, None)


def weight_dtypes(model: TransformerModel) -> tuple[torch.dtype, torch.dtype | None]:
    """The weights' dtype and the autocast dtype in force on the model's device (None when off)."""
    device_type = next(model.parameters()).device.type
    autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return next(model.parameters()).dtype, autocast


def _pointers(model: TransformerModel) -> tuple[int, ...]:
    """Where the weights live: a captured graph reads these addresses (moved or reloaded weights need a new one)."""
    return tuple(p.data_ptr() for p in model.parameters())


def forward_step(model: TransformerModel, token: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             cache: KVCache) -> torch.Tensor:
    """The static step run eagerly (and the function that ``compile`` compiles): the next-token logits [B, V]."""
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
        fn = types.FunctionType(forward_step.__code__.replace(), forward_step.__globals__, "decode_step")
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
