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
  position per layer and builds no [T, T] mask.
- Sampling follows HF's order: temperature, then top-k, then top-p, from a
  ``torch.Generator`` seeded with ``seed``. Temperature 0 is greedy (argmax).
- A stop token (``eos_token_id``) ends its row; it is included in the output.
- Decoding is ``eager`` (each step attends to the positions written so far),
  ``static`` (each step has the same shapes: it writes its position at a slot
  held in a tensor and attends to every slot of the cache under a mask) or
  ``graph``: the static step captured once in a CUDA graph and replayed for
  every token, which removes the per-kernel launch cost that dominates small
  and medium models on a GPU (on a CPU there is no launch cost to remove).
  ``auto`` picks ``graph`` on CUDA without tensor parallelism for
  ``max_new_tokens`` >= 16, else ``eager``; sampling stays outside the graph,
  so every path draws the same tokens for the same seed, and greedy decoding
  agrees up to the rounding of attention over a longer (masked) key range.
- Under tensor parallelism every rank runs this same loop on identical
  gathered logits with an identically seeded generator (a ``seed`` of None is
  drawn once and agreed on over the TP group), so all ranks pick the same
  tokens without communicating per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch

from ironcore.layers.attention import KVCache
from ironcore.models.transformer import TransformerModel
from ironcore.parallel import comm, state

Prompts = Sequence[Sequence[int]] | torch.Tensor
Decode = Literal["auto", "eager", "static", "graph"]
GRAPH_MIN_TOKENS = 16  # auto: shorter generations do not repay capturing the step


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token of each row of ``logits`` [B, V]: argmax at temperature 0, else a draw from the filtered softmax."""
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
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def generate(
    model: TransformerModel,
    input_ids: Prompts,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    decode: Decode = "auto",
) -> list[list[int]]:
    """The tokens generated for each prompt (prompt excluded; a stop token ends a row and is included).

    ``input_ids`` is a list of token-id lists of any lengths, or a LongTensor
    [B, T] of equal-length prompts. See :func:`stream` for the arguments.
    """
    steps = list(stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, decode))
    if not steps:
        return [[] for _ in range(len(input_ids))]
    rows = torch.stack(steps, dim=1).tolist()
    return [[t for t in row if t >= 0] for row in rows]


def stream(
    model: TransformerModel,
    input_ids: Prompts,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    decode: Decode = "auto",
) -> Iterator[torch.Tensor]:
    """An iterator over the next token of every prompt, one LongTensor [B] per step; -1 for rows already stopped.

    Stops after ``max_new_tokens`` steps or when every row has produced one of
    ``eos_token_id``. ``temperature`` 0 is greedy; ``top_k`` keeps the k most
    likely tokens and ``top_p`` the smallest set holding that probability
    mass; ``seed`` makes sampling reproducible; ``decode`` picks the decode
    step (see the module doc). The arguments are checked
    here (ValueError), before the first step. The model runs in eval mode
    (dropout off) and is put back in its previous mode afterwards.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    tokens, lengths = _left_pad(input_ids, device)
    limit = model.config.max_position_embeddings
    if int(lengths.max()) + max_new_tokens - 1 > limit:
        raise ValueError(
            f"longest prompt ({int(lengths.max())} tokens) + {max_new_tokens} new tokens exceeds the model's "
            f"max_position_embeddings ({limit})"
        )
    stops = torch.tensor(_as_list(eos_token_id), dtype=torch.long, device=device)
    generator = _generator(seed, device) if temperature > 0 else None
    return _decode(
        model, tokens, lengths, max_new_tokens, stops, lambda x: sample_next(x, temperature, top_k, top_p, generator),
        decode_mode(decode, device, max_new_tokens),
    )


def decode_mode(decode: Decode, device: torch.device, max_new_tokens: int) -> str:
    """The decode step ``decode`` asks for on ``device`` ("auto" resolved; see the module doc)."""
    if decode not in ("auto", "eager", "static", "graph"):
        raise ValueError(f"decode must be auto, eager, static or graph, got {decode!r}")
    graphable = device.type == "cuda" and state.tp_size() == 1
    if decode == "graph" and not graphable:
        raise ValueError("decode='graph' needs a CUDA device and no tensor parallelism")
    if decode == "auto":
        return "graph" if graphable and max_new_tokens >= GRAPH_MIN_TOKENS else "eager"
    return decode


@torch.inference_mode()
def _decode(
    model: TransformerModel,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    max_new_tokens: int,
    stops: torch.Tensor,
    pick: Callable[[torch.Tensor], torch.Tensor],
    mode: str = "eager",
) -> Iterator[torch.Tensor]:
    """The prefill + decode loop of :func:`stream` over left-padded ``tokens`` [B, P]."""
    if max_new_tokens == 0:
        return
    B, P = tokens.shape
    device = tokens.device
    # Positions count from each row's first real token; key_valid marks the slots that are real tokens.
    pads = P - lengths
    capacity = P + max_new_tokens
    key_valid = torch.arange(capacity, device=device)[None, :] >= pads[:, None]
    padded = bool((pads > 0).any())
    positions = (torch.arange(P, device=device)[None, :] - pads[:, None]).clamp(min=0)
    prefill_mask = None
    if padded:
        valid = key_valid[:, :P]
        prefill_mask = (valid[:, None, :] | ~valid[:, :, None]).unsqueeze(1)  # padding queries see padding

    static = mode != "eager"
    cache = KVCache(len(model.layers), capacity, torch.zeros(1, dtype=torch.long, device=device) if static else None)
    was_training = model.training
    model.eval()
    try:
        logits = model(tokens, positions, prefill_mask, kv_cache=cache, logits_to_keep=1)[:, -1]
        next_positions = lengths[:, None].clone()
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        step_fn = _StaticStep(model, cache, key_valid, P, mode == "graph") if static else None
        for step in range(max_new_tokens):
            token = pick(logits).masked_fill(finished, -1)
            yield token
            if stops.numel():
                finished |= torch.isin(token, stops)
                if bool(finished.all()):
                    return
            if step == max_new_tokens - 1:
                return
            if step_fn is not None:
                logits = step_fn(token.clamp(min=0)[:, None], next_positions, P + step)
            else:
                mask = key_valid[:, None, None, : cache.length + 1] if padded else None
                logits = model(token.clamp(min=0)[:, None], next_positions, mask, kv_cache=cache)[:, -1]
            next_positions += 1
    finally:
        model.train(was_training)


class _StaticStep:
    """A decode step with fixed shapes over a static cache, run eagerly or replayed from a CUDA graph.

    Its inputs live in fixed buffers (token, positions, the mask over all cache
    slots, the slot to write); each call updates them in place, then runs the
    model (or replays the captured graph) and returns the fixed logits buffer.
    """

    def __init__(self, model: TransformerModel, cache: KVCache, key_valid: torch.Tensor, prompt: int,
                 graph: bool) -> None:
        B, capacity = key_valid.shape
        self.model, self.cache, self.window = model, cache, model.config.sliding_window
        self.token = torch.zeros(B, 1, dtype=torch.long, device=key_valid.device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=key_valid.device)
        self.mask = torch.zeros(B, 1, 1, capacity, dtype=torch.bool, device=key_valid.device)
        self.mask[:, 0, 0, :prompt] = key_valid[:, :prompt]
        if self.window is not None:  # the slots before the first query's window
            self.mask[:, 0, 0, : max(prompt - self.window + 1, 0)] = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if graph:
            self._capture(prompt)

    def _run(self) -> torch.Tensor:
        return self.model(self.token, self.positions, self.mask, kv_cache=self.cache)[:, -1]

    def _capture(self, slot: int) -> None:
        """Warm up on a side stream (as CUDA graphs require), then capture one step. The warm-up steps write
        the first decode slot, which the first real step overwrites before any query reads it."""
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
