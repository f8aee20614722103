"""KV-cache generation: prefill the prompts once, then decode one token per step.

:func:`stream` checks the arguments, picks the decode step once (:func:`decode_mode`) and runs the loop
(:func:`_decode`). The prompts are *left*-padded, so every row's next token lands in the same column; each
row's positions start at 0 at its first real token and padding is masked out as a key, so a prompt generates
the same tokens in a batch as alone (a padding query attends to the padding before it, which keeps its hidden
states finite and is never read by a real token). The running rows (:class:`Rows`) finish at their budget, a
stop token (included in the output) or the caller's ``stop_rows``, and are dropped from the batch as they
finish, so a batch of ragged completions costs about the sum of their lengths; waiting prompts take their
places (:class:`Waiting`). Sampling (:mod:`ironcore.inference.sampling`) stays outside the step, so every path
draws the same tokens for the same seed.

Under tensor parallelism every rank runs this same loop on identical gathered logits with an identically
seeded generator (a ``seed`` of None is drawn once and agreed on over the TP group), so all ranks pick the
same tokens (and drop the same rows) without communicating per step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

from ironcore.inference import steps
from ironcore.inference.sampling import sample_next
from ironcore.inference.steps import DecodeReport
from ironcore.layers.attention import KVCache
from ironcore.models.transformer import TransformerModel
from ironcore.parallel import comm, state
from ironcore.parallel.sharding import grad_free

log = logging.getLogger(__name__)

Prompts = Sequence[Sequence[int]] | torch.Tensor
Decode = Literal["auto", "eager", "static", "graph", "compile"]
DECODES = ("auto", "eager", "static", "graph", "compile")
GRAPH_MIN_TOKENS = 16  # auto: shorter generations do not repay capturing the step
COMPILE_MIN_STEPS = 4096  # auto on a CPU: decode steps of a call that repay a compilation (see decode_mode)
COMPILE_MAX_ROWS = 8  # ... of this many rows at most (wider steps are bound by matmul FLOPs; compiling saves little)
COMPACT_AT = 0.125  # drop the finished rows once this share of the batch has finished
SYNC_EVERY = 4  # on a GPU, look at "all finished?" (a host sync) every this many steps
Pick = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [R, V], the rows' prompts [R]) -> tokens [R]


def generate(
    model: TransformerModel,
    input_ids: Prompts,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    decode: Decode = "auto",
    report: DecodeReport | None = None,
    max_batch: int | None = None,
) -> list[list[int]]:
    """The tokens generated for each prompt (prompt excluded; a stop token ends a row and is included).

    ``input_ids`` is a list of token-id lists of any lengths, or a LongTensor
    [B, T] of equal-length prompts. See :func:`stream` for the arguments.
    """
    steps = list(stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, decode,
                        report, max_batch=max_batch))  # fmt: skip
    if not steps:
        return [[] for _ in range(len(input_ids))]
    rows = torch.stack(steps, dim=1).tolist()
    return [[t for t in row if t >= 0] for row in rows]


def stream(
    model: TransformerModel,
    input_ids: Prompts,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    decode: Decode = "auto",
    report: DecodeReport | None = None,
    stop_rows: torch.Tensor | None = None,
    max_batch: int | None = None,
) -> Iterator[torch.Tensor]:
    """An iterator over the next token of every prompt, one LongTensor [B] per step; -1 for rows not running.

    Stops after ``max_new_tokens`` steps (one number, or one per prompt) or
    when every row has produced one of ``eos_token_id`` (on a GPU up to
    :data:`SYNC_EVERY` - 1 steps of -1 may follow). ``temperature`` 0 is
    greedy; ``top_k`` keeps the k most likely tokens and ``top_p`` the
    smallest set holding that probability mass; ``seed`` makes sampling
    reproducible; ``decode`` picks the decode step (see :func:`decode_mode`);
    ``report`` is filled in as the steps run. ``stop_rows``, a bool tensor [B]
    on the model's device, lets the caller end rows while iterating (a stop
    string found in their text, say): a row set True ends as at a stop token,
    from the step after, and is dropped like one. ``max_batch`` bounds the
    rows decoded at once; the other prompts wait (yielding -1) and, decoding
    eagerly, each takes the place of a finished row as it goes (continuous
    batching: the batch stays full); on the static paths they run in
    consecutive batches. With waiting prompts a sampled row's draw depends on
    the rows beside it (as in any batched sampler); greedy rows do not. The
    arguments are checked here (ValueError), before the first step. The model
    runs in eval mode (dropout off) and is put back in its previous mode
    afterwards.
    """
    device = next(model.parameters()).device
    prompts = _prompt_rows(input_ids)
    budgets = _budgets(max_new_tokens, len(prompts))
    for budget in set(budgets):
        check_sampling(budget, temperature, top_k, top_p)
    limit = model.config.max_position_embeddings
    longest = max(len(p) + n for p, n in zip(prompts, budgets, strict=True))
    if longest - 1 > limit:
        raise ValueError(
            f"a prompt + its new tokens ({longest} tokens) exceeds the model's max_position_embeddings ({limit})"
        )
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    stops = torch.tensor(_as_list(eos_token_id), dtype=torch.long, device=device)
    generator = _generator(seed, device) if temperature > 0 else None
    batch = len(prompts)
    width = batch if max_batch is None else min(batch, max_batch)

    def pick(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if width < batch:  # rows come and go: the draw is the batch's own
            return sample_next(logits, temperature, top_k, top_p, generator)
        return sample_next(logits, temperature, top_k, top_p, generator, rows if len(rows) < batch else None, batch)

    report = report if report is not None else DecodeReport()
    report.path = decode_mode(decode, model, max(len(p) for p in prompts), budgets, width)
    if stop_rows is not None and stop_rows.shape != (batch,):
        raise ValueError(f"stop_rows must be a bool tensor [{batch}], got shape {tuple(stop_rows.shape)}")
    request = Request(prompts, budgets, stops, pick, report, stop_rows, width)
    return _consecutive(model, request) if width < batch and report.path != "eager" else _decode(model, request)


def decode_mode(decode: Decode, model: TransformerModel, prompt: int, budgets: list[int],
                width: int | None = None) -> str:  # fmt: skip
    """The decode step ``decode`` asks for on the model's device, "auto" resolved, for a call whose prompts (the
    longest ``prompt`` tokens) have new-token ``budgets``, decoded ``width`` rows at a time (all when None).

    The steps (:mod:`ironcore.inference.steps`): ``eager`` attends each step to the positions written so far;
    ``static`` has the same shapes at every step (the new position goes to a slot held in a tensor, attention
    covers every slot under a mask); ``graph`` is the static step captured in CUDA graphs, one per batch
    bucket; ``compile`` the static step compiled by inductor on a CPU with the weights frozen (it drops no
    finished rows: every batch size would be another compilation). ``auto`` picks ``graph`` on CUDA without
    tensor parallelism or a mixture of experts (whose blocks are sized by the routing) from
    :data:`GRAPH_MIN_TOKENS` new tokens on. On a CPU ``compile`` when a compiled step for this shape and these
    weights is at hand, or when the call repays a compilation: its decode steps (the longest budget of each
    batch, summed over the batches) reach :data:`COMPILE_MIN_STEPS`, its batches have at most
    :data:`COMPILE_MAX_ROWS` rows (a wider step is bound by its matrix products, which compiling hardly speeds
    up) and the weights have not changed since the model was last compiled (a model in training stays eager:
    frozen weights go stale at every update; docs/inference.md). Else ``eager``.
    """
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    device = next(model.parameters()).device
    # A mixture of experts sizes each expert's block of tokens from the routing: no static shapes to capture.
    graphable = device.type == "cuda" and state.tp_size() == 1 and model.config.num_experts is None
    compilable = device.type == "cpu" and state.tp_size() == 1
    if decode == "graph" and not graphable:
        raise ValueError("decode='graph' needs a CUDA device, no tensor parallelism and no mixture of experts")
    if decode == "compile" and not compilable:
        raise ValueError("decode='compile' needs a CPU and no tensor parallelism (on CUDA decode='graph')")
    if decode != "auto":
        return decode
    width = len(budgets) if width is None else min(width, len(budgets))
    longest = max(budgets[:width])
    if graphable:
        return "graph" if longest >= GRAPH_MIN_TOKENS else "eager"
    if compilable and longest > 0:
        if steps.has_compiled(model, _compile_key(model, width, prompt + longest)):
            return "compile"  # at hand: nothing to pay
        # The work of the whole call: the steps it decodes (its batches' longest budgets) and the rows in each.
        work = sum(max(budgets[i : i + width]) for i in range(0, len(budgets), width))
        # A model whose weights changed since it was compiled is being trained: compiling again every time its
        # weights change would never pay.
        if work >= COMPILE_MIN_STEPS and width <= COMPILE_MAX_ROWS and not steps.weights_changed(model):
            return "compile"
    return "eager"


def _compile_key(model: TransformerModel, batch: int, capacity: int) -> tuple:
    """What a compiled step is specialised to: batch, cache bucket, weight dtype and autocast dtype."""
    return batch, steps.bucket(capacity), *steps.weight_dtypes(model)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the first out-of-range argument of :func:`stream` (nan is out of every range)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@dataclass
class Request:
    """What one :func:`stream` call decodes (or one batch of it, :func:`_consecutive`): the prompts and their
    budgets, how the next tokens are picked, what ends a row, what the call reports, the rows decoded at once."""

    prompts: list[torch.Tensor]
    budgets: list[int]
    stops: torch.Tensor  # stop token ids
    pick: Pick
    report: DecodeReport
    stop_rows: torch.Tensor | None  # [B] bool: rows the caller ended
    width: int


@dataclass
class Rows:
    """The rows being decoded, one entry per row in every field: :meth:`keep` and :meth:`extend` change them all
    at once, so they cannot drift apart."""

    prompt: torch.Tensor  # [R] which prompt of the call (of the batch, under _consecutive) the row continues
    budget: torch.Tensor  # [R] its new-token budget
    produced: torch.Tensor  # [R] the tokens it has produced
    finished: torch.Tensor  # [R] bool: out of budget, at a stop token or ended by the caller
    positions: torch.Tensor  # [R, 1] the position of its next input token
    logits: torch.Tensor  # [R, V] its next token's logits
    token: torch.Tensor  # [R] its last token (-1 once finished): the next step's input

    @classmethod
    def start(cls, prompt: list[int], budgets: list[int], positions: torch.Tensor, logits: torch.Tensor) -> Rows:
        """New rows for the prompts ``prompt`` with their ``budgets``, prefilled: their next ``positions`` and
        ``logits``. A row with no budget is finished from the start (it yields only -1)."""
        budget = torch.tensor(budgets, device=logits.device)
        return cls(torch.tensor(prompt, device=logits.device), budget, torch.zeros_like(budget), budget == 0,
                   positions, logits, torch.full_like(budget, -1))  # fmt: skip

    def __len__(self) -> int:
        return len(self.prompt)

    def keep(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (sorted) only."""
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name)[index])

    def extend(self, new: Rows) -> None:
        """Append the rows ``new``."""
        for field in fields(self):
            setattr(self, field.name, torch.cat([getattr(self, field.name), getattr(new, field.name)]))

    def pick(self, pick: Pick, batch: int) -> torch.Tensor:
        """Each row's next token from its logits (-1 for a finished row), returned as a row of the whole batch
        [batch] (-1 where no row runs)."""
        self.token = pick(self.logits, self.prompt).masked_fill(self.finished, -1)
        if len(self) == batch:
            return self.token
        return torch.full((batch,), -1, device=self.token.device).index_put_((self.prompt,), self.token)

    def advance(self, stops: torch.Tensor, stop_rows: torch.Tensor | None) -> None:
        """Count the token picked; finish the rows out of budget, at a stop token, or ended by the caller."""
        self.produced += 1
        self.finished |= self.produced >= self.budget
        if stop_rows is not None:  # set by the caller while the step's token was out
            self.finished |= stop_rows[self.prompt]
        if stops.numel():
            self.finished |= torch.isin(self.token, stops)


class StepBackend:
    """How a call's decode steps run, chosen once before the loop (:func:`_backend`): :class:`EagerBackend` or
    :class:`ArenaBackend`. Holds the KV cache (``cache``) the prefill fills (:meth:`load`), runs a step
    (``__call__``) and drops rows (:meth:`keep`) when :meth:`compacts` says so."""

    def __init__(self, model: TransformerModel, capacity: int) -> None:
        self.model, self.capacity = model, capacity
        self.cache: KVCache | None = None

    def compacts(self, running: int, done: int) -> bool:
        """Whether to drop the ``done`` finished rows of the ``running`` ones now: once :data:`COMPACT_AT` of
        them have finished."""
        return done >= COMPACT_AT * running

    def close(self) -> None:
        """The call is over."""


class EagerBackend(StepBackend):
    """The eager step: the cache grows a position per step and each step attends to the positions written so
    far (padding masked). The prefill fills the cache itself; waiting prompts can join it (:meth:`join`).
    Chosen for ``eager``, and for one new token on any path (no step to repay an arena)."""

    def prefill_cache(self, prompt: int) -> KVCache:
        """The cache the prefill of ``prompt`` positions fills: this step's own, with room for every new token."""
        return KVCache(len(self.model.layers), self.capacity)

    def load(self, cache: KVCache, copies: torch.Tensor | None, key_valid: torch.Tensor, padded: bool,
             report: DecodeReport) -> None:  # fmt: skip
        """Decode from the prefilled ``cache`` (its row ``copies[i]`` as row i); ``key_valid`` [B, capacity]
        marks the slots that are real tokens, ``padded`` says whether any before them is not."""
        if copies is not None:
            cache.keep(copies)
        self.cache, self.key_valid, self.padded = cache, key_valid, padded
        report.kv_cache_shape = (len(key_valid), self.capacity)

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, step: int) -> torch.Tensor:
        """The next logits [R, V] after feeding ``token`` [R] (-1 for a finished row) at ``positions`` [R, 1]."""
        mask = self.key_valid[:, None, None, : self.cache.length + 1] if self.padded else None
        return self.model(token.clamp(min=0)[:, None], positions, mask, kv_cache=self.cache)[:, -1]

    def keep(self, index: torch.Tensor) -> None:
        """Keep the cache rows ``index`` (sorted) only."""
        self.cache.keep(index)
        self.key_valid = self.key_valid[index]

    def join(self, prompts: list[torch.Tensor], budgets: list[int], remaining: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Prefill ``prompts`` and splice their cache rows below the running ones (whose rows still need
        ``remaining`` new tokens), every row ending at the same position; the columns before the oldest running
        row's first token go. Returns the new rows' logits and their next positions."""
        device = self.key_valid.device
        tokens, lengths = _left_pad(prompts, device)
        P = tokens.shape[1]
        valid, positions, mask = _prefill_inputs(tokens, lengths, P)
        part = KVCache(len(self.model.layers), P)
        logits = self.model(tokens, positions, mask, kv_cache=part, logits_to_keep=1)[:, -1]
        key_valid, end = self.key_valid, self.cache.length
        start = int(key_valid[:, :end].int().argmax(dim=1).min()) if len(key_valid) else end  # first real column
        length = max(end - start, P)
        capacity = length + max([*remaining.tolist(), *budgets])
        self.cache.splice(start, part, length, capacity)
        joined = torch.ones(len(key_valid) + len(prompts), capacity, dtype=torch.bool, device=device)
        joined[:, :length] = False
        joined[: len(key_valid), length - (end - start) : length] = key_valid[:, start:end]
        joined[len(key_valid) :, length - P : length] = valid[:, :P]
        self.key_valid, self.padded = joined, True
        return logits, lengths[:, None]


class ArenaBackend(StepBackend):
    """A fixed-shape step (``static``, ``graph``, ``compile``) on the model's decode arena
    (:class:`~ironcore.inference.steps.DecodeArena`), held for the call: the prefill fills a cache of its own,
    copied into the arena; step k writes the slot after the prompt's k."""

    def __init__(self, model: TransformerModel, mode: str, width: int, capacity: int,
                 report: DecodeReport) -> None:  # fmt: skip
        super().__init__(model, capacity)
        self.mode = mode
        self.arena = steps.arena(model, width, capacity, graphs=mode == "graph")
        self.arena.busy = True  # static and compiled calls may share an arena: each sets the step it runs
        self.arena.run = (steps.timed(steps.compiled_step(model, _compile_key(model, width, capacity)), report)
                          if mode == "compile" else steps.forward_step)  # fmt: skip
        self.cache = self.arena.cache

    def prefill_cache(self, prompt: int) -> KVCache:
        return KVCache(len(self.model.layers), prompt)

    def load(self, cache: KVCache, copies: torch.Tensor | None, key_valid: torch.Tensor, padded: bool,
             report: DecodeReport) -> None:  # fmt: skip
        self.written = cache.length  # the prompt's positions
        self.arena.load(cache, copies, key_valid, self.written, report)
        report.kv_cache_shape = (self.arena.rows, self.capacity)

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, step: int) -> torch.Tensor:
        return self.arena(token.clamp(min=0)[:, None], positions, self.written + step)

    def keep(self, index: torch.Tensor) -> None:
        self.arena.keep(index)

    def compacts(self, running: int, done: int) -> bool:
        """With CUDA graphs when the rows left fit a smaller captured bucket (a step costs about the same for any
        rows in one); never when compiled (every batch size would be a compilation); else as eager."""
        if self.mode == "compile":
            return False
        if self.mode == "graph":
            return self.arena.bucket(running - done) < self.arena.bucket(running)
        return super().compacts(running, done)

    def close(self) -> None:
        self.arena.busy = False


def _backend(model: TransformerModel, mode: str, width: int, prompt: int, num_steps: int,
             report: DecodeReport) -> EagerBackend | ArenaBackend:  # fmt: skip
    """The step backend of a call (``mode``, ``width`` rows, prompts of ``prompt`` positions, up to
    ``num_steps`` tokens), its cache capacity rounded up to the bucket its path compiles or keeps an arena for."""
    capacity = prompt + num_steps
    if mode == "compile":
        capacity = _compile_key(model, width, capacity)[1]
    elif mode != "eager":
        capacity = steps.ARENA_BUCKET * math.ceil(capacity / steps.ARENA_BUCKET)
    if mode == "eager" or num_steps <= 1:
        return EagerBackend(model, capacity)
    return ArenaBackend(model, mode, width, capacity, report)


class Waiting:
    """Continuous batching: the prompts not started yet, each joining the batch in a finished row's place
    (eager decoding only; the static paths' fixed rows run consecutive batches instead, :func:`_consecutive`)."""

    def __init__(self, prompts: list[torch.Tensor], budgets: list[int], width: int) -> None:
        self.prompts, self.budgets, self.width = prompts, budgets, width
        self.ids = list(range(width, len(prompts)))

    def __bool__(self) -> bool:
        return bool(self.ids)

    def admits(self, running: int, done: int) -> bool:
        """Whether to fill the places of the ``done`` finished rows of the ``running`` ones now: when all have
        finished or :data:`COMPACT_AT` of them."""
        return bool(self.ids) and done > 0 and (done == running or done >= COMPACT_AT * running)

    def admit(self, rows: Rows, backend: EagerBackend, report: DecodeReport) -> int:
        """Prefill the next waiting prompts into the free rows of ``rows`` (compacted) and ``backend``'s cache;
        returns their largest budget."""
        new, self.ids = self.ids[: self.width - len(rows)], self.ids[self.width - len(rows) :]
        prompts, budgets = [self.prompts[i] for i in new], [self.budgets[i] for i in new]
        started = time.perf_counter()
        logits, positions = backend.join(prompts, budgets, rows.budget - rows.produced)
        rows.extend(Rows.start(new, budgets, positions, logits))
        report.prefill_seconds += time.perf_counter() - started
        report.prefill_tokens += len(new) * max(len(p) for p in prompts)
        report.kv_cache_bytes = max(report.kv_cache_bytes, backend.cache.nbytes)
        return max(budgets)


def _decode(model: TransformerModel, request: Request) -> Iterator[torch.Tensor]:
    """The prefill + decode loop of :func:`stream`: the first ``width`` prompts start; the others (eager only)
    join as rows finish. Without autograd between the generator's yields, not beyond them (torch's decorator
    form re-enters the mode each time the generator resumes)."""
    return grad_free(model)(_decode_loop)(model, request)


def _decode_loop(model: TransformerModel, request: Request) -> Iterator[torch.Tensor]:
    """:func:`_decode`'s body."""
    prompts, budgets, report = request.prompts, request.budgets, request.report
    B = len(prompts)
    width = min(request.width, B)
    num_steps = max(budgets[:width])
    if max(budgets) == 0:
        return
    device = next(model.parameters()).device
    tokens, lengths = _left_pad(prompts[:width], device)
    backend = _backend(model, report.path, width, tokens.shape[1], num_steps, report)
    was_training = model.training
    model.eval()
    try:
        logits = _prefill(backend, tokens, lengths, report)
        rows = Rows.start(list(range(width)), budgets[:width], lengths[:, None].clone(), logits)
        log.info("decode: %s, batch %d of %d prompts, %d steps at most", report.path, width, B, num_steps)
        sync_every = 1 if device.type == "cpu" else SYNC_EVERY
        yield from _loop(request, rows, backend, Waiting(prompts, budgets, width), num_steps - 1, sync_every)
    finally:
        model.train(was_training)
        backend.close()


def _consecutive(model: TransformerModel, request: Request) -> Iterator[torch.Tensor]:
    """:func:`_decode` over consecutive batches of ``width`` prompts (the static paths' fixed rows cannot take
    new prompts), each batch's tokens yielded as rows of the whole [B]."""
    B, width, stop_rows = len(request.prompts), request.width, request.stop_rows
    for start in range(0, B, width):
        part = slice(start, start + width)
        rows = None if stop_rows is None else stop_rows[part]  # a view: the caller's writes reach it
        batch = replace(request, prompts=request.prompts[part], budgets=request.budgets[part], stop_rows=rows)
        for token in _decode(model, batch):
            out = torch.full((B,), -1, device=token.device)
            out[start : start + len(token)] = token
            yield out


def _prefill(backend: EagerBackend | ArenaBackend, tokens: torch.Tensor, lengths: torch.Tensor,
             report: DecodeReport) -> torch.Tensor:  # fmt: skip
    """Fill ``backend``'s cache with the left-padded prompts ``tokens`` [B, P]; the logits [B, V] of their next
    tokens. A prompt repeated in the batch (the G completions of a prompt in RL) is computed once: its row of
    the cache is copied to its repeats."""
    model, (B, P) = backend.model, tokens.shape
    # Positions count from each row's first real token; key_valid marks the slots that are real tokens.
    key_valid, positions, mask = _prefill_inputs(tokens, lengths, backend.capacity)
    padded = mask is not None
    cache = backend.prefill_cache(P)
    started = time.perf_counter()
    rows_key = torch.cat([tokens, lengths[:, None]], dim=1)  # padding (0) may look like a real token 0
    unique, repeat = rows_key.unique(dim=0, return_inverse=True)
    copies = repeat if len(unique) < B else None
    if copies is not None:
        first = torch.full((len(unique),), B, device=tokens.device).scatter_reduce_(
            0, repeat, torch.arange(B, device=tokens.device), "amin")  # fmt: skip
        tokens, positions, mask = tokens[first], positions[first], None if mask is None else mask[first]
    logits = model(tokens, positions, mask, kv_cache=cache, logits_to_keep=1)[:, -1]
    logits = logits if copies is None else logits[copies]
    backend.load(cache, copies, key_valid, padded, report)
    _sync(tokens.device)
    report.prefill_seconds += time.perf_counter() - started
    report.prefill_tokens += len(unique) * P
    report.kv_cache_bytes = max(report.kv_cache_bytes, backend.cache.nbytes)
    return logits


def _loop(request: Request, rows: Rows, backend: EagerBackend | ArenaBackend, waiting: Waiting, last: int,
          sync_every: int) -> Iterator[torch.Tensor]:  # fmt: skip
    """Each step: yield the rows' tokens (as a row of the whole batch), finish rows, drop the finished ones,
    run the step, let waiting prompts take their places; until no row runs and none waits. ``last`` is the step
    by which every row started so far has run out of budget; "all finished?", a host sync on a GPU, is asked
    every ``sync_every`` steps."""
    step = 0
    while True:
        yield rows.pick(request.pick, len(request.prompts))
        rows.advance(request.stops, request.stop_rows)
        if step == last and not waiting:
            return
        admit = False
        if (step + 1) % sync_every == 0:
            done = int(rows.finished.sum())
            if done == len(rows) and not waiting:
                return
            admit = waiting.admits(len(rows), done)
            if admit or backend.compacts(len(rows), done):
                keep = (~rows.finished).nonzero().squeeze(1)
                rows.keep(keep)
                backend.keep(keep)
                request.report.compactions += 1
        if len(rows):
            request.report.steps += 1
            request.report.row_steps += len(rows)
            rows.logits = backend(rows.token, rows.positions, step)
            rows.positions += 1
        if admit:  # waiting prompts take the finished rows' places
            last = max(last, step + waiting.admit(rows, backend, request.report))
        step += 1


def _prefill_inputs(tokens: torch.Tensor, lengths: torch.Tensor, capacity: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """For left-padded ``tokens`` [B, P]: key_valid [B, capacity] (True from each row's first real token on),
    positions [B, P] counting from it, and the prefill mask (None without padding)."""
    P = tokens.shape[1]
    pads = P - lengths
    key_valid = torch.arange(capacity, device=tokens.device)[None, :] >= pads[:, None]
    positions = (torch.arange(P, device=tokens.device)[None, :] - pads[:, None]).clamp(min=0)
    if not bool((pads > 0).any()):
        return key_valid, positions, None
    valid = key_valid[:, :P]
    return key_valid, positions, (valid[:, None, :] | ~valid[:, :, None]).unsqueeze(1)  # padding sees padding


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt_rows(input_ids: Prompts) -> list[torch.Tensor]:
    """The prompts of ragged lists or a [B, T] tensor, one 1-D LongTensor each (ValueError on an empty one)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids tensor must be [batch, length], got shape {tuple(input_ids.shape)}")
        rows = [input_ids[i] for i in range(input_ids.shape[0])]
    else:
        rows = [torch.as_tensor(list(p), dtype=torch.long) for p in input_ids]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    return rows


def _left_pad(rows: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, P] left-padded with 0, lengths [B]) of the prompts ``rows``."""
    lengths = torch.tensor([r.numel() for r in rows], device=device)
    tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, tokens.shape[1] - r.numel() :] = r.to(device)
    return tokens, lengths


def _budgets(max_new_tokens: int | Sequence[int], batch: int) -> list[int]:
    """One new-token budget per prompt."""
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * batch
    budgets = [int(n) for n in max_new_tokens]
    if len(budgets) != batch:
        raise ValueError(f"max_new_tokens has {len(budgets)} budgets for {batch} prompts")
    return budgets


def _as_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator seeded with ``seed``, or with a fresh seed that all TP ranks agree on."""
    if seed is None:
        drawn = torch.randint(0, 2**62, (), device=device)
        seed = int(comm.all_reduce(drawn, state.tp_group(), op="max"))
    return torch.Generator(device=device).manual_seed(seed)
