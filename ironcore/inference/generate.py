"""KV-cache generation: prefill the prompts once, then decode one token per step.

The model computes every token's keys and values exactly once: the prompts go
through one forward pass that fills a :class:`~ironcore.layers.attention.KVCache`,
and each decode step feeds only the newest token, which attends to the cache.

Decisions worth knowing:

- Ragged prompts are *left*-padded to a common length, so every row's next
  token lands in the same column. Each row's positions start at 0 at its first
  real token and padding is masked out as a key, so a prompt generates the same
  tokens in a batch as alone. (A padding query attends to the padding before
  it, which keeps its hidden states finite and is never read by a real token.)
- The cache is allocated once for prompt + new tokens; a decode step writes one
  position per layer and builds no [T, T] mask. A prompt that appears several
  times in the batch (the G completions of a prompt in RL) is prefilled once
  and its cache rows copied.
- Sampling follows HF's order: temperature, then top-k, then top-p, from a
  ``torch.Generator`` seeded with ``seed``. Temperature 0 is greedy (argmax).
  Each step draws one float64 uniform per row of the whole batch (so a row
  samples the same tokens whether or not finished rows were dropped around
  it) and takes the first kept token, in vocabulary order, whose cumulative
  mass exceeds it. Nothing sorts the vocabulary on a CPU: top-k draws among
  its k candidates, top-p finds its threshold with a histogram of the mass
  and sorts only the tokens of the bucket it falls in (:func:`sample_next`),
  so sampling 64 rows of a 49k vocabulary costs a few passes over the
  logits, not a sort per row. Ties at the top-k or top-p boundary all stay.
- A stop token (``eos_token_id``) ends its row and is included in the output;
  ``max_new_tokens`` may be one budget per prompt (a rollout engine's
  per-request limit).
- **Rows that finish stop costing compute**: once an eighth of the batch has
  finished (with CUDA graphs: once the rest fit a smaller captured bucket),
  the finished rows are dropped (the cache, positions and masks are
  compacted), so a batch of ragged completions costs about the sum of their
  lengths, not batch x the longest. The host checks "all finished?" every
  step on a CPU and every :data:`SYNC_EVERY` steps on a GPU (a check is a
  device sync).
- The decode step (:mod:`ironcore.inference.steps`) is ``eager`` (each step
  attends to the positions written so far), ``static`` (the same shapes at
  every step: the new position goes to a slot held in a tensor, attention
  covers every slot under a mask), ``graph`` (the static step captured in
  CUDA graphs, one per batch bucket, replayed by this call and later ones) or
  ``compile`` (the static step compiled by inductor on the CPU with the
  weights frozen; no compaction, since every batch size is another
  compilation). ``auto`` picks ``graph`` on CUDA without tensor parallelism
  (nor a mixture of experts, whose blocks are sized by the routing)
  for ``max_new_tokens`` >= :data:`GRAPH_MIN_TOKENS`. On a CPU it chooses by
  the work of the whole call: ``compile`` when a compiled step for this
  shape (batch, cache bucket, dtypes) and these weights is at hand (nothing
  to pay), or when the call repays a compilation (tens of seconds to two
  minutes): its decode steps -- the longest budget of each batch of
  ``max_batch`` rows, summed over the batches, so a long evaluation of many
  prompts a few at a time counts them all -- reach
  :data:`COMPILE_MIN_STEPS`, its batches have at most
  :data:`COMPILE_MAX_ROWS` rows, and the weights have not changed since the
  model was last compiled. The saving is per step (the frozen, packed
  weights are read faster), so it is counted in steps; a wider step is
  bound by its matrix products, which compiling hardly speeds up, and a
  compiled step drops no finished rows; a model in training stays eager
  (frozen weights go stale at every update; why a step compiled with the
  weights as inputs does not pay on a CPU either: docs/inference.md).
  Else ``eager``. Sampling
  stays outside the compiled or captured step, so every path draws the same
  tokens for the same seed, and greedy decoding agrees up to the rounding of
  attention over a longer (masked) key range. A :class:`DecodeReport`
  passed as ``report`` says which path ran and what the compilation cost.
- Under tensor parallelism every rank runs this same loop on identical
  gathered logits with an identically seeded generator (a ``seed`` of None is
  drawn once and agreed on over the TP group), so all ranks pick the same
  tokens (and drop the same rows) without communicating per step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch

from ironcore.inference import steps
from ironcore.inference.steps import DecodeReport
from ironcore.layers.attention import KVCache
from ironcore.models.transformer import TransformerModel
from ironcore.parallel import comm, state

log = logging.getLogger(__name__)

Prompts = Sequence[Sequence[int]] | torch.Tensor
Decode = Literal["auto", "eager", "static", "graph", "compile"]
DECODES = ("auto", "eager", "static", "graph", "compile")
GRAPH_MIN_TOKENS = 16  # auto: shorter generations do not repay capturing the step
COMPILE_MIN_STEPS = 4096  # auto on a CPU: decode steps of a call that repay a compilation (see the module doc)
COMPILE_MAX_ROWS = 8  # ... of this many rows at most (wider steps are bound by matmul FLOPs; compiling saves little)
COMPACT_AT = 0.125  # drop the finished rows once this share of the batch has finished
SYNC_EVERY = 4  # on a GPU, look at "all finished?" (a host sync) every this many steps
SAMPLE_CANDIDATES = 1024  # top_k up to this draws among the k candidates alone (on a CPU)
NUCLEUS_BUCKETS = 1024  # top-p on a CPU: buckets per row of the histogram that finds the threshold
NUCLEUS_SORTED = 1024  # ... and the tokens of its boundary bucket sorted (more: split into buckets again)
NUCLEUS_ROUNDS = 3  # ... splits at most (then the boundary bucket is sorted whatever its size)
NUCLEUS_DEPTH = 104.0  # ... logits further than this below a row's largest have no float32 mass (e^-104)
DRAW_CHUNK = 256  # the draw: tokens per chunk (chunk sums, then a search within one chunk)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    rows: torch.Tensor | None = None,
    batch: int | None = None,
) -> torch.Tensor:
    """Next token of each row of ``logits`` [B, V]: argmax at temperature 0, else a draw from the filtered softmax.

    HF's filters in HF's order: temperature, then top-k (the k most likely tokens and every token tied with the
    k-th), then top-p (a token stays while the tokens more likely than it hold less than ``top_p`` of the
    mass: the most likely token always stays, and so does every token tied with the last one kept). The draw
    is one uniform ``u`` per row, mapped through the kept tokens' cumulative mass in vocabulary order (the
    first token whose cumulative mass exceeds ``u`` x their total). No step sorts the vocabulary on a CPU (see
    :func:`_nucleus_by_histogram`). ``rows`` (indices into a batch of ``batch`` rows) says which rows of a
    larger batch ``logits`` holds: the uniforms are drawn for the whole batch and each row takes its own, so
    dropping rows does not change what the others sample.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    B, V = logits.shape
    u = torch.rand(batch or B, generator=generator, dtype=torch.float64, device=logits.device)
    if rows is not None:
        u = u[rows]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    cpu = logits.device.type == "cpu"  # (a check of the values is a host sync on a GPU, where a sort is cheap)
    if top_k is not None and top_k < V:
        values, index = logits.topk(top_k, dim=-1)
        kth = values[:, -1:]
        if cpu and top_k <= SAMPLE_CANDIDATES and bool(((logits >= kth).sum(dim=-1) == top_k).all()):
            return _draw_among(values, index, top_p, u)  # no token outside the k ties with the k-th
        logits = logits.masked_fill(logits < kth, float("-inf"))
    mass = logits.softmax(dim=-1)
    if top_p is not None:
        nucleus = _nucleus_by_histogram if cpu else _nucleus_by_sort
        mass = mass.masked_fill_(logits < nucleus(logits, mass, top_p), 0.0)
    return _draw(mass, u)


def _draw_among(values: torch.Tensor, index: torch.Tensor, top_p: float | None, u: torch.Tensor) -> torch.Tensor:
    """:func:`sample_next`'s draw among the top-k candidates only (``values`` [B, k] sorted descending, their
    vocabulary ``index``): the same tokens as the draw over the whole vocabulary, for k passes instead of V."""
    mass = values.sub(values[:, :1]).exp_()
    if top_p is not None:
        target = top_p * mass.sum(dim=-1, dtype=torch.float64)
        mass.masked_fill_(values < _last_kept(values, mass, torch.zeros_like(target), target), 0.0)
    index, order = index.sort(dim=-1)  # vocabulary order, as the draw over the whole vocabulary goes
    cumulative = mass.gather(1, order).double().cumsum(dim=-1)
    return index.gather(1, _search(cumulative, u[:, None] * cumulative[:, -1:])).squeeze(1)


def _last_kept(values: torch.Tensor, mass: torch.Tensor, above: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The logit of the last token top-p keeps, [B, 1], given candidates ``values`` [B, n] sorted descending
    (-inf pads a row), their ``mass`` and the mass ``above`` [B] of the tokens ranked before them: the tokens
    are kept while the mass before them is below ``target`` [B] (so at least the first)."""
    before = above[:, None] + mass.double().cumsum(dim=-1) - mass
    kept = (before < target[:, None]).sum(dim=-1, keepdim=True)
    real = (values > float("-inf")).sum(dim=-1, keepdim=True)
    return values.gather(1, (torch.minimum(kept, real) - 1).clamp(min=0))


def _nucleus_by_sort(logits: torch.Tensor, mass: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p threshold (see :func:`_last_kept`) by sorting each row: the reference, and the GPU's way."""
    values, order = logits.sort(dim=-1, descending=True)
    target = top_p * mass.sum(dim=-1, dtype=torch.float64)
    return _last_kept(values, mass.gather(1, order), torch.zeros_like(target), target)


def _nucleus_by_histogram(logits: torch.Tensor, mass: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p threshold without a sort: the same as :func:`_nucleus_by_sort`'s.

    Each row's logits fall into :data:`NUCLEUS_BUCKETS` buckets by their distance from the row's largest one
    (a monotone map, so a bucket holds a range of the ranking and ties share one) and one histogram pass sums
    the mass per bucket; the bucket where the cumulative mass reaches ``top_p`` holds the last token kept.
    Only its members (tens to hundreds on a 49k vocabulary) are sorted; a bucket with more than
    :data:`NUCLEUS_SORTED` is split into buckets again. A dozen passes over the logits in all.
    """
    B, _ = logits.shape
    n = NUCLEUS_BUCKETS
    top, bottom = logits.amax(dim=-1, keepdim=True), logits.amin(dim=-1, keepdim=True)
    if bool(top.isnan().any()):
        raise ValueError("sampling: the logits hold NaN")
    start = torch.zeros_like(top)  # the distance from the top where the buckets start
    width = (top - bottom).clamp_(min=1e-6, max=NUCLEUS_DEPTH)  # that they cover (closer logits share a bucket)
    first = torch.arange(B, device=logits.device, dtype=torch.int32)[:, None] * n  # each row's first bucket
    above = torch.zeros(B, dtype=torch.float64, device=logits.device)  # the mass ranked before the buckets
    inside: torch.Tensor | None = None  # the tokens in the buckets (all at first)
    target: torch.Tensor | None = None
    for _ in range(NUCLEUS_ROUNDS):
        scale = n / width
        bucket = torch.addcmul((top - start) * scale, logits, scale, value=-1.0).clamp_(0, n - 1).int().add_(first)
        weights = mass if inside is None else mass * inside
        hist = torch.bincount(bucket.view(-1), weights=weights.view(-1), minlength=B * n).view(B, n).double()
        if target is None:
            target = top_p * hist.sum(dim=-1)
        cumulative = above[:, None] + hist.cumsum(dim=-1)
        last = (cumulative < target[:, None]).sum(dim=-1, keepdim=True).clamp_(max=n - 1)
        above = (cumulative - hist).gather(1, last).squeeze(1)
        here = bucket == last.int() + first
        inside = here if inside is None else inside & here
        counts = inside.sum(dim=-1)
        if int(counts.max()) <= NUCLEUS_SORTED:
            break
        start = start + last * (width / n)
        width = width / n
    # The boundary bucket's tokens, each row's in a row of its own (-inf after them), sorted.
    row, column = inside.nonzero(as_tuple=True)
    slot = torch.arange(len(row), device=logits.device) - (counts.cumsum(dim=0) - counts)[row]
    values = torch.full((B, int(counts.max())), float("-inf"), device=logits.device)
    values[row, slot] = logits[row, column]
    masses = torch.zeros_like(values)
    masses[row, slot] = mass[row, column]
    values, order = values.sort(dim=-1, descending=True)
    return _last_kept(values, masses.gather(1, order), above, target)


def _search(cumulative: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """[B, 1]: the first column whose ``cumulative`` mass [B, n] exceeds ``point`` [B, 1], so never a column
    without mass (a point at or past the total, by rounding, finds the last column with mass)."""
    found = torch.searchsorted(cumulative, point, right=True)
    return torch.minimum(found, (cumulative < cumulative[:, -1:]).sum(dim=-1, keepdim=True))


def _draw(mass: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token at ``u`` [B] x the total of each row's cumulative ``mass`` [B, V] (unnormalised): a search
    over the sums of chunks of :data:`DRAW_CHUNK` tokens, then one within the chunk found (in float64)."""
    B, V = mass.shape
    chunks = -(-V // DRAW_CHUNK)
    if chunks * DRAW_CHUNK != V:
        mass = torch.nn.functional.pad(mass, (0, chunks * DRAW_CHUNK - V))
    mass = mass.view(B, chunks, DRAW_CHUNK)
    sums = mass.sum(dim=-1).double().cumsum(dim=-1)
    point = u[:, None] * sums[:, -1:]
    chunk = _search(sums, point)
    rest = point - torch.where(chunk > 0, sums.gather(1, (chunk - 1).clamp(min=0)), 0.0)
    within = mass[torch.arange(B, device=mass.device), chunk.squeeze(1)].double().cumsum(dim=-1)
    return (chunk * DRAW_CHUNK + _search(within, rest)).squeeze(1)


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
    reproducible; ``decode`` picks the decode step (see the module doc);
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
    prompts = _rows(input_ids)
    budgets = _budgets(max_new_tokens, len(prompts))
    for budget in set(budgets):
        check_sampling(budget, temperature, top_k, top_p)
    limit, longest = model.config.max_position_embeddings, max(len(p) + n for p, n in zip(prompts, budgets, strict=True))
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
    if width < batch and report.path != "eager":
        return _consecutive(model, prompts, budgets, stops, pick, report, stop_rows, width)
    return _decode(model, prompts, budgets, stops, pick, report, stop_rows, width)


def decode_mode(decode: Decode, model: TransformerModel, prompt: int, budgets: list[int],
                width: int | None = None) -> str:  # fmt: skip
    """The decode step ``decode`` asks for on the model's device ("auto" resolved; see the module doc) for a call
    whose prompts (the longest ``prompt`` tokens) have new-token ``budgets``, decoded ``width`` rows at a time
    (all at once when None)."""
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


def _consecutive(
    model: TransformerModel,
    prompts: list[torch.Tensor],
    budgets: list[int],
    stops: torch.Tensor,
    pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    report: DecodeReport,
    stop_rows: torch.Tensor | None,
    width: int,
) -> Iterator[torch.Tensor]:
    """:func:`_decode` over consecutive batches of ``width`` prompts (the static paths' fixed rows cannot take
    new prompts), each batch's tokens yielded as rows of the whole [B]."""
    B = len(prompts)
    for start in range(0, B, width):
        part = slice(start, start + width)
        rows = None if stop_rows is None else stop_rows[part]  # a view: the caller's writes reach it
        for token in _decode(model, prompts[part], budgets[part], stops, pick, report, rows, width):
            out = torch.full((B,), -1, device=token.device)
            out[start : start + len(token)] = token
            yield out


@torch.inference_mode()
def _decode(
    model: TransformerModel,
    prompts: list[torch.Tensor],
    budgets: list[int],
    stops: torch.Tensor,
    pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    report: DecodeReport,
    stop_rows: torch.Tensor | None,
    width: int,
) -> Iterator[torch.Tensor]:
    """The prefill + decode loop of :func:`stream`: the first ``width`` prompts start; the others (eager only)
    join as rows finish."""
    B = len(prompts)
    width = min(width, B)
    num_steps = max(budgets[:width])
    if max(budgets) == 0:
        return
    device = next(model.parameters()).device
    tokens, lengths = _left_pad(prompts[:width], device)
    P = tokens.shape[1]
    mode = report.path
    capacity = P + num_steps
    if mode == "compile":
        capacity = _compile_key(model, width, capacity)[1]
    elif mode != "eager":
        capacity = steps.ARENA_BUCKET * math.ceil(capacity / steps.ARENA_BUCKET)
    # Positions count from each row's first real token; key_valid marks the slots that are real tokens.
    key_valid, positions, prefill_mask = _prefill_inputs(tokens, lengths, capacity)
    padded = prefill_mask is not None

    # The static steps decode in an arena kept from call to call (one new token needs no step, nor an arena);
    # the prefill fills a cache of its own first.
    static = mode != "eager" and num_steps > 1
    arena = steps.arena(model, width, capacity, graphs=mode == "graph") if static else None
    cache = KVCache(len(model.layers), capacity if arena is None else P)
    was_training = model.training
    model.eval()
    try:
        if arena is not None:  # static and compiled calls may share an arena: each sets the step it runs
            arena.busy = True
            arena.run = (steps.timed(steps.compiled_step(model, _compile_key(model, width, capacity)), report)
                         if mode == "compile" else steps.forward_step)  # fmt: skip
        # A prompt repeated in the batch (G completions of each prompt in RL) is computed once: its row of the
        # cache is copied to its repeats.
        rows_key = torch.cat([tokens, lengths[:, None]], dim=1)  # padding (0) may look like a real token 0
        unique, repeat = rows_key.unique(dim=0, return_inverse=True)
        started = time.perf_counter()
        if len(unique) < width:
            first = torch.full((len(unique),), width, device=device).scatter_reduce_(
                0, repeat, torch.arange(width, device=device), "amin")  # fmt: skip
            mask = None if prefill_mask is None else prefill_mask[first]
            logits = model(tokens[first], positions[first], mask, kv_cache=cache, logits_to_keep=1)[:, -1][repeat]
        else:
            logits = model(tokens, positions, prefill_mask, kv_cache=cache, logits_to_keep=1)[:, -1]
        copies = repeat if len(unique) < width else None
        if arena is not None:
            arena.load(cache, copies, key_valid, P, report)
            cache = arena.cache
        elif copies is not None:
            cache.keep(copies)
        _sync(device)
        report.prefill_seconds += time.perf_counter() - started
        report.prefill_tokens += len(unique) * P
        report.kv_cache_bytes = max(report.kv_cache_bytes, cache.nbytes)
        report.kv_cache_shape = (arena.rows if arena is not None else width, capacity)
        next_positions = lengths[:, None].clone()
        budget = torch.tensor(budgets[:width], device=device)
        produced = torch.zeros_like(budget)
        rows = torch.arange(width, device=device)  # the prompts in the batch
        finished = budget == 0  # a row with no budget yields only -1
        waiting = list(range(width, B))  # prompts not started (eager decoding only)
        last = num_steps - 1  # the step by which every row started so far has run out of budget
        log.info("decode: %s, batch %d of %d prompts, %d steps at most", mode, width, B, num_steps)
        sync_every = 1 if device.type == "cpu" else SYNC_EVERY
        step = 0
        while True:
            token = pick(logits, rows).masked_fill(finished, -1)
            yield token if len(rows) == B else torch.full((B,), -1, device=device).index_put_((rows,), token)
            produced += 1
            finished |= produced >= budget
            if stop_rows is not None:  # set by the caller while the step's token was out
                finished |= stop_rows[rows]
            if stops.numel():
                finished |= torch.isin(token, stops)
            if step == last and not waiting:
                return
            admit = False
            if (step + 1) % sync_every == 0:
                done = int(finished.sum())
                if done == len(rows) and not waiting:
                    return
                admit = bool(waiting) and done > 0 and (done == len(rows) or done >= COMPACT_AT * len(rows))
                if admit or _compacts(mode, arena, len(rows), done):
                    keep = (~finished).nonzero().squeeze(1)
                    rows, token, budget, produced = rows[keep], token[keep], budget[keep], produced[keep]
                    finished, next_positions, key_valid = finished[keep], next_positions[keep], key_valid[keep]
                    (arena or cache).keep(keep)
                    report.compactions += 1
            if len(rows):
                report.steps += 1
                report.row_steps += len(rows)
                if arena is not None:
                    logits = arena(token.clamp(min=0)[:, None], next_positions, P + step)
                else:
                    mask = key_valid[:, None, None, : cache.length + 1] if padded else None
                    logits = model(token.clamp(min=0)[:, None], next_positions, mask, kv_cache=cache)[:, -1]
                next_positions += 1
            if admit:  # waiting prompts take the finished rows' places
                new, waiting = waiting[: width - len(rows)], waiting[width - len(rows) :]
                started = time.perf_counter()
                joined = _join(model, [prompts[i] for i in new], [budgets[i] for i in new], cache, key_valid,
                               budget - produced)  # fmt: skip
                key_valid, new_logits, new_positions = joined
                padded = True
                rows = torch.cat([rows, torch.tensor(new, device=device)])
                budget = torch.cat([budget, torch.tensor([budgets[i] for i in new], device=device)])
                produced = torch.cat([produced, torch.zeros(len(new), dtype=produced.dtype, device=device)])
                finished = torch.cat([finished, budget[len(finished) :] == 0])
                next_positions = torch.cat([next_positions, new_positions])
                logits = torch.cat([logits[: len(rows) - len(new)], new_logits])
                last = max(last, step + max(budgets[i] for i in new))
                report.prefill_seconds += time.perf_counter() - started
                report.prefill_tokens += len(new) * max(len(prompts[i]) for i in new)
                report.kv_cache_bytes = max(report.kv_cache_bytes, cache.nbytes)
            step += 1
    finally:
        model.train(was_training)
        if arena is not None:
            arena.busy = False


def _join(model: TransformerModel, prompts: list[torch.Tensor], budgets: list[int], cache: KVCache,
          key_valid: torch.Tensor, remaining: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Prefill ``prompts`` and splice their cache rows below the running ones (``cache``, whose rows still need
    ``remaining`` new tokens), every row ending at the same position; the columns before the oldest running
    row's first token go. Returns the new key_valid, the new rows' logits and their next positions."""
    device = key_valid.device
    tokens, lengths = _left_pad(prompts, device)
    P = tokens.shape[1]
    valid, positions, mask = _prefill_inputs(tokens, lengths, P)
    part = KVCache(len(model.layers), P)
    logits = model(tokens, positions, mask, kv_cache=part, logits_to_keep=1)[:, -1]
    end = cache.length
    start = int(key_valid[:, :end].int().argmax(dim=1).min()) if len(key_valid) else end  # first real column
    length = max(end - start, P)
    capacity = length + max([*remaining.tolist(), *budgets])
    cache.splice(start, part, length, capacity)
    joined = torch.ones(len(key_valid) + len(prompts), capacity, dtype=torch.bool, device=device)
    joined[:, :length] = False
    joined[: len(key_valid), length - (end - start) : length] = key_valid[:, start:end]
    joined[len(key_valid) :, length - P : length] = valid[:, :P]
    return joined, logits, lengths[:, None]


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


def _compacts(mode: str, arena: steps.DecodeArena | None, running: int, done: int) -> bool:
    """Whether to drop the ``done`` finished rows of the ``running`` ones now: with CUDA graphs when the rest fit a
    smaller captured bucket (a step costs about the same for any rows in one), on the other paths once
    :data:`COMPACT_AT` of them have finished; never when compiled (every batch size would be a compilation)."""
    if mode == "compile":
        return False
    if mode == "graph":
        return arena.bucket(running - done) < arena.bucket(running)
    return done >= COMPACT_AT * running


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _rows(input_ids: Prompts) -> list[torch.Tensor]:
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
