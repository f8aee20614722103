"""Cross-entropy over vocab-parallel logits, without ever gathering the full logits (Megatron's algorithm).

Each rank holds the logits of its slice of the vocabulary. The loss of a
token is ``log(sum_v exp(z_v)) - z_target``; both terms are sums over the
vocabulary, so each rank computes its share and one all-reduce adds them:

1. all-reduce MAX of the per-token max logit (for a stable exp),
2. all-reduce SUM of [sum of exp(z - max), z_target - max] (the target
   logit is contributed by the one rank whose slice holds the target).

The backward pass is local: ``softmax - one_hot(target)`` on this rank's
slice. Communication per token: three floats, versus the vocabulary size
for gathering the logits. Vocabulary padding columns arrive as -inf (see
``ironcore.parallel.layers.vocab_logits``) and drop out of both sums. With one rank the
vocabulary is whole and a fused ``log_softmax`` does the same in one pass.
"""

from __future__ import annotations

import math

import torch

from ironcore.parallel import comm, state
from ironcore.parallel.mappings import reduce_from_tp


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:  # noqa: D102
        ignored = targets == ignore_index
        if state.tp_size() == 1:
            # The whole vocabulary is here: one fused log-softmax kernel instead of five passes over the logits.
            mine = ~ignored
            local_target = targets.masked_fill(ignored, 0)
            log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            loss = -log_probs.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
            saved, ctx.saved_log_probs = log_probs, True
        else:
            loss, saved, local_target, mine = _partial_sums_loss(logits, targets)
            ctx.saved_log_probs = False
        ctx.save_for_backward(saved, local_target, mine, ignored)
        ctx.input_dtype = logits.dtype
        return loss.masked_fill(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: D102
        saved, local_target, mine, ignored = ctx.saved_tensors
        # softmax - one_hot(target), in place: the saved tensor is not needed again
        grad = saved.exp_() if ctx.saved_log_probs else saved
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -mine.unsqueeze(-1).to(grad.dtype))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None


def _partial_sums_loss(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Losses from this rank's vocab slice (steps 1-2 of the module doc); also the softmax for the backward,
    the local target indices and whether each target is in this rank's slice."""
    vocab_local = logits.shape[-1]
    local_target = targets - state.tp_rank() * vocab_local
    mine = (local_target >= 0) & (local_target < vocab_local)
    local_target = local_target.masked_fill(~mine, 0)
    loss, softmax = softmax_loss_(logits.to(torch.float32, copy=True), local_target, mine)
    return loss, softmax, local_target, mine


def softmax_loss_(
    z: torch.Tensor, local_target: torch.Tensor, mine: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2 of the module doc on fp32 logits ``z`` [..., V/tp] of this rank's vocabulary columns: the losses,
    and ``z`` overwritten by the softmax. ``local_target`` is each target's column where ``mine`` (it is in this
    rank's slice). A slice without columns (all vocabulary padding, cut off) contributes nothing."""
    group = state.tp_group()
    z_max = z.max(dim=-1).values if z.shape[-1] else z.new_full(z.shape[:-1], -math.inf)
    comm.all_reduce(z_max, group, op="max")
    z.sub_(z_max.unsqueeze(-1))
    target_z = target_logits(z, local_target, mine)
    sums = torch.stack([z.exp_().sum(dim=-1), target_z])
    comm.all_reduce(sums, group)
    sum_exp, target_z = sums
    return sum_exp.log() - target_z, z.div_(sum_exp.unsqueeze(-1))


def target_logits(z: torch.Tensor, local_target: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """Each token's logit of its target where this rank holds it, else 0 (the all-reduce adds the owner's)."""
    if not z.shape[-1]:
        return z.new_zeros(z.shape[:-1])
    return z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token losses [...] (fp32) from this rank's vocab slice of the logits [..., V/tp] and targets [...].

    The caller applies loss masks and the normalisation (token-weighted over
    the global batch in IronCore's trainer). Tokens whose target is
    ``ignore_index`` get loss 0 and no gradient. With one rank this is
    ``F.cross_entropy(logits, targets, reduction="none")``. Call it on the
    model's ``parallel_output=True`` logits.
    """
    return _VocabParallelCrossEntropy.apply(logits, targets, ignore_index)


LOGPS_CHUNK_BYTES = 32 * 2**20  # fp32 logits of one chunk of :func:`vocab_parallel_token_logps`


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float,  # noqa: D102
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        flat = logits.reshape(-1, logits.shape[-1])
        local = targets.reshape(-1) - state.tp_rank() * flat.shape[-1]
        mine = (local >= 0) & (local < flat.shape[-1])
        local = local.masked_fill(~mine, 0)
        logps, entropy, lse = (torch.empty(flat.shape[0], device=flat.device) for _ in range(3))
        group = state.tp_group()
        for start in range(0, flat.shape[0], chunk):
            rows = slice(start, start + chunk)
            z = flat[rows].float().div(temperature)  # a fresh fp32 chunk: the logits stay as they are
            z_max = z.max(dim=-1).values if z.shape[-1] else z.new_full(z.shape[:-1], -math.inf)
            comm.all_reduce(z_max, group, op="max")
            z.sub_(z_max.unsqueeze(-1))
            target_z = target_logits(z, local[rows], mine[rows])
            e = z.exp()
            sum_exp = e.sum(dim=-1)
            expected = e.mul_(z).nan_to_num_(nan=0.0).sum(dim=-1)  # sum of exp(z) z; padding's 0 x -inf is 0
            sums = comm.all_reduce(torch.stack([sum_exp, target_z, expected]), group)
            log_sum = sums[0].log()
            logps[rows] = sums[1] - log_sum
            entropy[rows] = log_sum - sums[2] / sums[0]
            lse[rows] = log_sum + z_max
        ctx.save_for_backward(logits, lse, local, mine)
        ctx.temperature, ctx.chunk, ctx.leaf = temperature, chunk, logits.is_leaf
        logps, entropy = logps.view(targets.shape), entropy.view(targets.shape)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, _grad_entropy: torch.Tensor):  # noqa: D102
        logits, lse, local, mine = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        out = torch.empty_like(flat) if ctx.leaf else flat  # a leaf's values are the caller's: not overwritten
        g = grad_logps.reshape(-1).float()
        for start in range(0, flat.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            # d logp / d z = one_hot(target) - softmax, and z = logits / temperature
            grad = flat[rows].float().div(ctx.temperature).sub_(lse[rows].unsqueeze(-1)).exp_()
            grad.mul_(-g[rows].unsqueeze(-1))
            if grad.shape[-1]:
                grad.scatter_add_(-1, local[rows].unsqueeze(-1), (g[rows] * mine[rows]).unsqueeze(-1))
            out[rows] = grad.div_(ctx.temperature)  # over the logits, chunk by chunk: no second [tokens x V]
        return out.view(logits.shape), None, None, None


def vocab_parallel_token_logps(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, chunk_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``[...]`` (fp32) of ``targets`` under ``softmax(logits / temperature)``, and the
    entropies of those distributions (a metric, no gradient), from this rank's vocab slice [..., V/tp].

    What ``-vocab_parallel_cross_entropy(logits / temperature, targets)`` and
    :func:`vocab_parallel_entropy` give, in less memory: the forward pass works on
    chunks of ``chunk_tokens`` tokens (default: :data:`LOGPS_CHUNK_BYTES` of fp32
    logits) and keeps one float per token beside the logits, where the two
    functions hold fp32 copies of all the logits at once (log-softmax, scaled
    logits, probabilities). The backward pass recomputes each chunk's softmax and
    writes the gradient over ``logits`` unless they are a leaf tensor (as the
    cross-entropy overwrites its saved softmax): read a model's logits before the
    backward pass, not after. RL's and DPO's log-probs of whole rollouts and
    response pairs are what this is for.
    """
    if chunk_tokens is None:
        chunk_tokens = max(1, LOGPS_CHUNK_BYTES // (4 * max(1, logits.shape[-1])))
    return _TokenLogps.apply(logits, targets, temperature, chunk_tokens)


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``log(sum_v exp(z_v))`` per token [...] (fp32) over the whole vocabulary, from this rank's slice [..., V/tp].

    Differentiable (the gradient is this rank's slice of the softmax), so an
    objective can add a term on the softmax normaliser, such as PaLM's z-loss,
    under any TP layout. Vocabulary padding (-inf) adds nothing.
    """
    z = logits.float()
    if state.tp_size() == 1:
        return torch.logsumexp(z, dim=-1)
    z_max = z.detach().max(dim=-1).values
    comm.all_reduce(z_max, state.tp_group(), op="max")
    # The sum over ranks of each rank's sum: forward all-reduce, backward identity (each rank's own part).
    sum_exp = reduce_from_tp((z - z_max.unsqueeze(-1)).exp().sum(dim=-1))
    return sum_exp.log() + z_max


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per token [...] (fp32), from this rank's vocab slice [..., V/tp].

    ``H = logsumexp(z) - sum_v p_v z_v``: the second term is a sum over the
    vocabulary, so each rank adds its slice and one all-reduce completes it.
    A metric (RL's ``entropy``), so no gradient. Vocabulary padding (-inf,
    probability 0) adds nothing.
    """
    z = logits.float()
    lse = vocab_parallel_logsumexp(z)
    p = (z - lse.unsqueeze(-1)).exp()
    expected = torch.where(p > 0, p * z, 0.0).sum(dim=-1)
    if state.tp_size() > 1:
        comm.all_reduce(expected, state.tp_group())
    return lse - expected
