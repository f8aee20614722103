"""Sampling the next token: HF's filters in HF's order, one uniform per row, no sort of the vocabulary on a CPU.

Temperature 0 is greedy (argmax). Otherwise temperature, then top-k, then
top-p, and a draw: each step draws one float64 uniform per row of the whole
batch (so a row samples the same tokens whether or not finished rows were
dropped around it, and on every decode path) and takes the first kept token,
in vocabulary order, whose cumulative mass exceeds it. Nothing sorts the
vocabulary on a CPU: top-k draws among its k candidates, top-p finds its
threshold with a histogram of the mass and sorts only the tokens of the
bucket it falls in, so sampling 64 rows of a 49k vocabulary costs a few
passes over the logits, not a sort per row. Ties at the top-k or top-p
boundary all stay.
"""

from __future__ import annotations

import torch

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
