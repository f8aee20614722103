"""The output projection and the cross-entropy in one pass over chunks of tokens: the logits never exist whole.

A language model's last step, ``logits = x W^T`` then cross-entropy, holds
[tokens x vocabulary] logits and as many gradients (1.6 GB each for GPT-2
at 8 x 1024 tokens, fp32). Here the forward pass walks over chunks of
tokens: it computes the chunk's logits, its losses and, at once, the
gradient of the weighted loss with respect to those logits (written over
them), which it turns into the chunk's share of the input and weight
gradients before the next chunk; the backward pass only scales the
gradients it kept (Liger-Kernel's fused linear cross-entropy). Peak memory
for the loss drops from the logits to one chunk of them.

The loss is ``sum_i w_i * CE_i``: the token weights ``w`` carry the loss
mask and the normalisation (the LM objective's ``mask / trained tokens of
the global batch``), which the gradients need before the backward pass.
Under tensor parallelism each rank holds its slice of the (padded)
vocabulary; per chunk the maximum, the sum of exponentials and the target
logit are all-reduced over TP (Megatron's vocab-parallel cross-entropy),
and the input's gradient is summed by the column-parallel input mapping.

Two implementations of the per-chunk loss and gradient: ``chunked`` in
PyTorch (any device; on a CPU it is the memory saving) and ``triton`` (two
kernels: the rows' maximum and sum of exponentials in one online pass, then
the gradient written in place).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ironcore.parallel import comm, state
from ironcore.parallel.cross_entropy import softmax_loss_, target_logits
from ironcore.parallel.layers import real_vocab_rows
from ironcore.parallel.mappings import column_input


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    vocab_size: int,
    backend: str = "chunked",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """``sum_i token_weights_i * CE(x_i W^T + b, targets_i)`` over the first ``vocab_size`` classes, a scalar.

    ``x`` [..., H] (this rank's sequence shard under sequence parallelism),
    ``weight`` [V/tp (padded), H] and ``bias`` this rank's vocabulary rows,
    ``targets`` and ``token_weights`` [...]; a negative target weighs
    nothing. ``backend``: ``chunked`` or ``triton``; ``chunk_tokens`` None:
    chunks of about tokens x hidden / vocabulary (Liger's rule).
    """
    x = column_input(x)  # all positions; the input gradient summed over TP ranks
    flat = x.reshape(-1, x.shape[-1])
    targets = targets.reshape(-1)
    token_weights = token_weights.reshape(-1).float() * (targets >= 0)
    real = real_vocab_rows(vocab_size, weight.shape[0])
    if chunk_tokens is None:
        chunk_tokens = 2 ** math.ceil(math.log2(max(1, math.ceil(flat.shape[0] / math.ceil(vocab_size / x.shape[-1])))))
    return _LinearCrossEntropy.apply(flat, weight, bias, targets, token_weights, real, chunk_tokens, backend)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,  # noqa: D102
                token_weights: torch.Tensor, real: int, chunk: int, backend: str) -> torch.Tensor:  # fmt: skip
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_c, w_c = x.to(dtype), weight[:real].to(dtype)
        b_c = None if bias is None else bias[:real].to(dtype)
        grad_x = torch.empty_like(x_c)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=x.device)
        first = state.tp_rank() * weight.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(x_c[rows], w_c, b_c).float()
            local = targets[rows] - first
            mine = (local >= 0) & (local < real)
            local = local.masked_fill(~mine, 0)
            chunk_loss = _CHUNK_LOSS[backend](logits, local, mine, token_weights[rows])  # logits := weighted grads
            total += (chunk_loss * token_weights[rows]).sum()
            grad = logits.to(dtype)
            grad_x[rows] = grad @ w_c
            grad_w[:real] += (grad.t() @ x_c[rows]).float()
            if grad_b is not None:
                grad_b[:real] += grad.float().sum(dim=0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):  # noqa: D102
        grad_x, grad_w, grad_b = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        scale = grad_total.float()  # (out of place: a second backward pass must find the saved gradients unscaled)
        grads = [(grad_x.float() * scale).to(x_dtype), (grad_w * scale).to(w_dtype)]
        grads.append(None if grad_b is None else (grad_b * scale).to(b_dtype))
        return (*grads, None, None, None, None, None)


def _torch_chunk_loss(logits: torch.Tensor, local: torch.Tensor, mine: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The chunk's per-token losses; ``logits`` [n, real] (fp32) becomes ``w * (softmax - one_hot)`` in place."""
    losses, softmax = softmax_loss_(logits, local, mine)
    if softmax.shape[1]:  # (a rank whose slice is all padding has no columns)
        softmax.scatter_add_(-1, local.unsqueeze(-1), -mine.unsqueeze(-1).float())
        softmax.mul_(w.unsqueeze(-1))
    return losses


def _triton_chunk_loss(logits: torch.Tensor, local: torch.Tensor, mine: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """:func:`_torch_chunk_loss` with Triton kernels: one online pass for each row's maximum and sum of
    exponentials, the all-reduces between them, then one pass writing the gradient in place."""
    from ironcore.kernels import cross_entropy_triton

    group = state.tp_group()
    n, cols = logits.shape
    if cols:
        z_max, sum_exp = cross_entropy_triton.row_max_and_sum_exp(logits)
    else:  # a rank whose slice is all padding
        z_max, sum_exp = logits.new_full((n,), -math.inf), logits.new_zeros(n)
    global_max = comm.all_reduce(z_max.clone(), group, op="max")
    target_z = (target_logits(logits, local, mine) - global_max).masked_fill(~mine, 0.0)
    rescaled = torch.where(sum_exp > 0, sum_exp * (z_max - global_max).exp(), 0.0)
    sums = comm.all_reduce(torch.stack([rescaled, target_z]), group)
    sum_exp, target_z = sums
    if cols:
        cross_entropy_triton.write_gradient_(logits, global_max, sum_exp, local.masked_fill(~mine, -1), w)
    return sum_exp.log() - target_z


_CHUNK_LOSS = {"chunked": _torch_chunk_loss, "triton": _triton_chunk_loss}
