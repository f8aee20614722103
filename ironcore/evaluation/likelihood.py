"""Log-likelihoods of continuations given contexts: what multiple choice and lm-evaluation-harness score.

``loglikelihoods`` returns, per (context, continuation) pair of token ids, the
summed log-probability of the continuation and whether greedy decoding would
have produced it, the numbers lm-eval's ``loglikelihood`` requests expect.
Pairs that share a context (a question and its choices) are computed with one
encoding of the context: the context goes through the model once into a KV
cache, whose rows are copied to its continuations, which then run on top of it.
So a four-choice question costs one context and four short continuations
instead of four full sequences.

``encode_pair`` tokenizes a pair the way lm-eval does, so both give the same
tokens and the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ironcore.layers.attention import KVCache
from ironcore.models.transformer import TransformerModel
from ironcore.parallel.sharding import grad_free

BATCH_CONTEXTS = 32  # distinct contexts encoded together


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_token: int) -> tuple[list[int], list[int]]:  # fmt: skip
    """(context ids, continuation ids) as lm-eval's causal models make them: the context's trailing spaces move
    to the continuation, the whole text is encoded and split after the context's tokens; an empty context is
    ``[prefix_token]`` (the end-of-text or beginning-of-sequence token)."""
    if not context:
        return [prefix_token], encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode(context + continuation), encode(context)
    return head, whole[len(head) :]


def loglikelihoods(model: TransformerModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   batch_contexts: int = BATCH_CONTEXTS) -> list[tuple[float, bool]]:  # fmt: skip
    """(log p(continuation | context), greedy?) per request, in order; each distinct context is encoded once.

    A context longer than the model's window with its continuation loses tokens on the left, as lm-eval's do.
    """
    return grad_free(model)(_loglikelihoods)(model, requests, batch_contexts)


def _loglikelihoods(model: TransformerModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                    batch_contexts: int) -> list[tuple[float, bool]]:  # fmt: skip
    """:func:`loglikelihoods`' body."""
    limit = model.config.max_position_embeddings
    pairs = []
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError(f"request {i}: the context and the continuation each need at least one token")
        if len(continuation) > limit:
            raise ValueError(f"request {i}: a continuation of {len(continuation)} tokens exceeds the model's "
                             f"max_position_embeddings ({limit})")  # fmt: skip
        excess = len(context) + len(continuation) - 1 - limit
        pairs.append((tuple(context[max(excess, 0) :]), continuation))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        groups.setdefault(context, []).append(i)
    contexts = sorted(groups, key=len, reverse=True)  # similar lengths together: less padding
    was_training = model.training
    model.eval()
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    try:
        for start in range(0, len(contexts), batch_contexts):
            chunk = contexts[start : start + batch_contexts]
            members = [i for context in chunk for i in groups[context]]
            owner = torch.tensor([u for u, context in enumerate(chunk) for _ in groups[context]])
            scored = _score(model, chunk, [pairs[i][1] for i in members], owner)
            for i, result in zip(members, scored, strict=True):
                results[i] = result
    finally:
        model.train(was_training)
    return results


def _score(model: TransformerModel, contexts: list[tuple[int, ...]], continuations: list[list[int]],
           owner: torch.Tensor) -> list[tuple[float, bool]]:  # fmt: skip
    """The requests of one batch: ``contexts`` (distinct), ``continuations`` with ``owner`` (their context)."""
    device = next(model.parameters()).device
    owner = owner.to(device)
    lengths = torch.tensor([len(c) for c in contexts], device=device)
    P = int(lengths.max())
    tokens = torch.zeros(len(contexts), P, dtype=torch.long, device=device)
    for u, context in enumerate(contexts):  # left-padded, as in generation: every context ends in the last column
        tokens[u, P - len(context) :] = torch.tensor(context, device=device)
    pads = P - lengths
    valid = torch.arange(P, device=device)[None, :] >= pads[:, None]
    positions = (torch.arange(P, device=device)[None, :] - pads[:, None]).clamp(min=0)
    mask = (valid[:, None, :] | ~valid[:, :, None]).unsqueeze(1)  # padding queries see padding: finite numbers
    L = max(len(c) for c in continuations)
    cache = KVCache(len(model.layers), P + L - 1)
    first = model(tokens, positions, mask, kv_cache=cache, logits_to_keep=1)[:, -1].float().log_softmax(-1)
    rest = None  # [R, L - 1, V]: logits after each continuation's tokens but the last
    if L > 1:  # the continuations run on top of their context's cache rows
        cache.keep(owner)
        ids = torch.zeros(len(continuations), L - 1, dtype=torch.long, device=device)
        for r, continuation in enumerate(continuations):
            ids[r, : len(continuation) - 1] = torch.tensor(continuation[:-1], device=device)
        keys = torch.cat([valid[owner], torch.ones(len(continuations), L - 1, dtype=torch.bool, device=device)], 1)
        rest = model(ids, lengths[owner][:, None] + torch.arange(L - 1, device=device),
                     keys[:, None, None, :].expand(-1, 1, L - 1, -1), kv_cache=cache)  # fmt: skip
    results = []
    for r, continuation in enumerate(continuations):
        rows = first[owner[r]][None]
        if len(continuation) > 1:
            rows = torch.cat([rows, rest[r, : len(continuation) - 1].float().log_softmax(-1)])
        target = torch.tensor(continuation, device=device)
        results.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
    return results
