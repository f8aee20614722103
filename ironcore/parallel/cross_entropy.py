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
    group, vocab_local = state.tp_group(), logits.shape[-1]
    z = logits.float()
    z_max = z.max(dim=-1).values
    comm.all_reduce(z_max, group, op="max")
    z = z - z_max.unsqueeze(-1)

    local_target = targets - state.tp_rank() * vocab_local
    mine = (local_target >= 0) & (local_target < vocab_local)
    local_target = local_target.masked_fill(~mine, 0)
    target_z = z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)

    exp = z.exp_()  # z is ours (a fresh tensor); reuse its memory for the softmax
    sums = torch.stack([exp.sum(dim=-1), target_z])
    comm.all_reduce(sums, group)
    sum_exp, target_z = sums
    return sum_exp.log() - target_z, exp.div_(sum_exp.unsqueeze(-1)), local_target, mine


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
