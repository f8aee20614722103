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
  The draw is ``torch.multinomial``'s own (argmax of p / q with q ~ Exp(1)),
  with q drawn for the whole batch every step, so a row samples the same
  tokens whether or not finished rows were dropped around it.
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
  for ``max_new_tokens`` >= :data:`GRAPH_MIN_TOKENS`; on a CPU ``compile``
  when a compiled step for this shape and these weights exists already, or
  the generation is long enough to repay a compilation
  (:data:`COMPILE_MIN_TOKENS` new tokens) and the weights have not changed
  since the model was last compiled (a model in training stays eager);
  else ``eager``. Sampling
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
COMPILE_MIN_TOKENS = 2048  # auto on a CPU: new tokens that repay a compilation (tens of seconds; ~20 ms a token saved)
COMPACT_AT = 0.125  # drop the finished rows once this share of the batch has finished
SYNC_EVERY = 4  # on a GPU, look at "all finished?" (a host sync) every this many steps


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

    The draw equals ``torch.multinomial(probs, 1, generator=generator)``. ``rows`` (indices into a batch of
    ``batch`` rows) says which rows of a larger batch ``logits`` holds: the noise is drawn for the whole batch
    and each row takes its own, so dropping rows does not change what the others sample.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the more likely ones already hold top_p of the mass (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    noise = torch.empty(batch or probs.shape[0], probs.shape[1], device=probs.device).exponential_(1, generator=generator)
    if rows is not None:
        noise = noise[rows]
    return (probs / noise).argmax(dim=-1)


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
) -> list[list[int]]:
    """The tokens generated for each prompt (prompt excluded; a stop token ends a row and is included).

    ``input_ids`` is a list of token-id lists of any lengths, or a LongTensor
    [B, T] of equal-length prompts. See :func:`stream` for the arguments.
    """
    steps = list(stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, decode,
                        report))  # fmt: skip
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
) -> Iterator[torch.Tensor]:
    """An iterator over the next token of every prompt, one LongTensor [B] per step; -1 for rows already stopped.

    Stops after ``max_new_tokens`` steps (one number, or one per prompt) or
    when every row has produced one of ``eos_token_id`` (on a GPU up to
    :data:`SYNC_EVERY` - 1 steps of -1 may follow). ``temperature`` 0 is
    greedy; ``top_k`` keeps the k most likely tokens and ``top_p`` the
    smallest set holding that probability mass; ``seed`` makes sampling
    reproducible; ``decode`` picks the decode step (see the module doc);
    ``report`` is filled in as the steps run. ``stop_rows``, a bool tensor [B]
    on the model's device, lets the caller end rows while iterating (a stop
    string found in their text, say): a row set True ends as at a stop token,
    from the step after, and is dropped like one. The arguments are checked here
    (ValueError), before the first step. The model runs in eval mode (dropout
    off) and is put back in its previous mode afterwards.
    """
    device = next(model.parameters()).device
    tokens, lengths = _left_pad(input_ids, device)
    budgets = _budgets(max_new_tokens, tokens.shape[0])
    for budget in set(budgets):
        check_sampling(budget, temperature, top_k, top_p)
    limit, longest = model.config.max_position_embeddings, int((lengths + torch.tensor(budgets, device=device)).max())
    if longest - 1 > limit:
        raise ValueError(
            f"a prompt + its new tokens ({longest} tokens) exceeds the model's max_position_embeddings ({limit})"
        )
    stops = torch.tensor(_as_list(eos_token_id), dtype=torch.long, device=device)
    generator = _generator(seed, device) if temperature > 0 else None
    batch = tokens.shape[0]

    def pick(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, temperature, top_k, top_p, generator, rows if len(rows) < batch else None, batch)

    report = report if report is not None else DecodeReport()
    report.path = decode_mode(decode, model, tokens.shape[1], budgets)
    if stop_rows is not None and stop_rows.shape != (batch,):
        raise ValueError(f"stop_rows must be a bool tensor [{batch}], got shape {tuple(stop_rows.shape)}")
    return _decode(model, tokens, lengths, budgets, stops, pick, report, stop_rows)


def decode_mode(decode: Decode, model: TransformerModel, prompt: int, budgets: list[int]) -> str:
    """The decode step ``decode`` asks for on the model's device ("auto" resolved; see the module doc)."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    device = next(model.parameters()).device
    graphable = device.type == "cuda" and state.tp_size() == 1
    compilable = device.type == "cpu" and state.tp_size() == 1
    if decode == "graph" and not graphable:
        raise ValueError("decode='graph' needs a CUDA device and no tensor parallelism")
    if decode == "compile" and not compilable:
        raise ValueError("decode='compile' needs a CPU and no tensor parallelism (on CUDA decode='graph')")
    if decode != "auto":
        return decode
    longest = max(budgets)
    if graphable:
        return "graph" if longest >= GRAPH_MIN_TOKENS else "eager"
    if compilable and longest > 0:
        # A model whose weights changed since it was compiled is being trained: compiling again every time
        # its weights change would never pay.
        if steps.has_compiled(model, _compile_key(model, len(budgets), prompt + longest)):
            return "compile"
        if longest >= COMPILE_MIN_TOKENS and not steps.weights_changed(model):
            return "compile"
    return "eager"


def _compile_key(model: TransformerModel, batch: int, capacity: int) -> tuple:
    """What a compiled step is specialised to: batch, cache bucket, weight dtype and autocast dtype."""
    return batch, steps.bucket(capacity), *steps.weight_dtypes(model)


@torch.inference_mode()
def _decode(
    model: TransformerModel,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    budgets: list[int],
    stops: torch.Tensor,
    pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    report: DecodeReport,
    stop_rows: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """The prefill + decode loop of :func:`stream` over left-padded ``tokens`` [B, P]."""
    num_steps = max(budgets)
    if num_steps == 0:
        return
    B, P = tokens.shape
    device = tokens.device
    mode = report.path
    # Positions count from each row's first real token; key_valid marks the slots that are real tokens.
    pads = P - lengths
    capacity = P + num_steps
    if mode == "compile":
        capacity = _compile_key(model, B, capacity)[1]
    elif mode != "eager":
        capacity = steps.ARENA_BUCKET * math.ceil(capacity / steps.ARENA_BUCKET)
    key_valid = torch.arange(capacity, device=device)[None, :] >= pads[:, None]
    padded = bool((pads > 0).any())
    positions = (torch.arange(P, device=device)[None, :] - pads[:, None]).clamp(min=0)
    prefill_mask = None
    if padded:
        valid = key_valid[:, :P]
        prefill_mask = (valid[:, None, :] | ~valid[:, :, None]).unsqueeze(1)  # padding queries see padding

    # The static steps decode in an arena kept from call to call (one new token needs no step, nor an arena);
    # the prefill fills a cache of its own first.
    static = mode != "eager" and num_steps > 1
    arena = steps.arena(model, B, capacity, graphs=mode == "graph") if static else None
    cache = KVCache(len(model.layers), capacity if arena is None else P)
    was_training = model.training
    model.eval()
    try:
        if arena is not None:  # static and compiled calls may share an arena: each sets the step it runs
            arena.busy = True
            arena.run = (steps.timed(steps.compiled_step(model, _compile_key(model, B, capacity)), report)
                         if mode == "compile" else steps.forward_step)  # fmt: skip
        # A prompt repeated in the batch (G completions of each prompt in RL) is computed once: its row of the
        # cache is copied to its repeats.
        rows_key = torch.cat([tokens, lengths[:, None]], dim=1)  # padding (0) may look like a real token 0
        unique, repeat = rows_key.unique(dim=0, return_inverse=True)
        started = time.perf_counter()
        if len(unique) < B:
            first = torch.full((len(unique),), B, device=device).scatter_reduce_(
                0, repeat, torch.arange(B, device=device), "amin")  # fmt: skip
            mask = None if prefill_mask is None else prefill_mask[first]
            logits = model(tokens[first], positions[first], mask, kv_cache=cache, logits_to_keep=1)[:, -1][repeat]
        else:
            logits = model(tokens, positions, prefill_mask, kv_cache=cache, logits_to_keep=1)[:, -1]
        copies = repeat if len(unique) < B else None
        if arena is not None:
            arena.load(cache, copies, key_valid, P, report)
            cache = arena.cache
        elif copies is not None:
            cache.keep(copies)
        _sync(device)
        report.prefill_seconds += time.perf_counter() - started
        report.prefill_tokens += len(unique) * P
        report.kv_cache_bytes = cache.nbytes
        report.kv_cache_shape = (arena.rows if arena is not None else B, capacity)
        next_positions = lengths[:, None].clone()
        budget = torch.tensor(budgets, device=device)
        rows = torch.arange(B, device=device)  # the prompts still in the batch
        finished = budget == 0  # a row with no budget yields only -1
        log.info("decode: %s, batch %d, %d steps at most", mode, B, num_steps)
        sync_every = 1 if device.type == "cpu" else SYNC_EVERY
        for step in range(num_steps):
            token = pick(logits, rows).masked_fill(finished, -1)
            yield token if len(rows) == B else torch.full((B,), -1, device=device).index_put_((rows,), token)
            finished |= budget <= step + 1
            if stop_rows is not None:  # set by the caller while the step's token was out
                finished |= stop_rows[rows]
            if stops.numel():
                finished |= torch.isin(token, stops)
            if step == num_steps - 1:
                return
            if (step + 1) % sync_every == 0:
                done = int(finished.sum())
                if done == len(rows):
                    return
                if _compacts(mode, arena, len(rows), done):
                    keep = (~finished).nonzero().squeeze(1)
                    rows, token, budget, finished = rows[keep], token[keep], budget[keep], finished[keep]
                    next_positions, key_valid = next_positions[keep], key_valid[keep]
                    (arena or cache).keep(keep)
                    report.compactions += 1
            report.steps += 1
            report.row_steps += len(rows)
            if arena is not None:
                logits = arena(token.clamp(min=0)[:, None], next_positions, P + step)
            else:
                mask = key_valid[:, None, None, : cache.length + 1] if padded else None
                logits = model(token.clamp(min=0)[:, None], next_positions, mask, kv_cache=cache)[:, -1]
            next_positions += 1
    finally:
        model.train(was_training)
        if arena is not None:
            arena.busy = False


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


def _left_pad(input_ids: Prompts, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, P] left-padded with 0, lengths [B]) of ragged prompts or a [B, T] tensor."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids tensor must be [batch, length], got shape {tuple(input_ids.shape)}")
        rows = [input_ids[i] for i in range(input_ids.shape[0])]
    else:
        rows = [torch.as_tensor(list(p), dtype=torch.long) for p in input_ids]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
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
