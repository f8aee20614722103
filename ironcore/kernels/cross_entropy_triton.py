"""Triton kernels of the fused cross-entropy (``cross_entropy.py``): row statistics, then the gradient in place.

Two kernels instead of Liger's one because under tensor parallelism the
rows' maximum and sum of exponentials must be all-reduced over the ranks
between them; with one rank the all-reduces are no-ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # vocabulary columns per step of a row's loop


@triton.jit
def _row_stats_kernel(z_ptr, stride, cols, max_ptr, sum_ptr, BLOCK: tl.constexpr):
    """Online softmax statistics of one row: its maximum and the sum of exp(z - maximum)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride
    m = float("-inf")
    d = 0.0
    for start in range(0, cols, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + offsets, mask=offsets < cols, other=float("-inf"))
        new_m = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
        m = new_m
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, d)


@triton.jit
def _gradient_kernel(z_ptr, stride, cols, max_ptr, sum_ptr, target_ptr, weight_ptr, BLOCK: tl.constexpr):
    """One row's ``w * (softmax - one_hot(target))`` over its logits, in place (target -1: not in this slice)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride
    m = tl.load(max_ptr + row)
    d = tl.load(sum_ptr + row)
    target = tl.load(target_ptr + row)
    w = tl.load(weight_ptr + row)
    for start in range(0, cols, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < cols
        z = tl.load(z_row + offsets, mask=inside, other=0.0)
        grad = tl.exp(z - m) / d - tl.where(offsets == target, 1.0, 0.0)
        tl.store(z_row + offsets, grad * w, mask=inside)


def row_max_and_sum_exp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` [n, V] (fp32, last dim contiguous): the maximum and the sum of exp(z - maximum)."""
    n, cols = logits.shape
    z_max = torch.empty(n, dtype=torch.float32, device=logits.device)
    sum_exp = torch.empty_like(z_max)
    _row_stats_kernel[(n,)](logits, logits.stride(0), cols, z_max, sum_exp, BLOCK=min(BLOCK, triton.next_power_of_2(cols)))
    return z_max, sum_exp


def write_gradient_(logits: torch.Tensor, z_max: torch.Tensor, sum_exp: torch.Tensor, targets: torch.Tensor,
                    token_weights: torch.Tensor) -> None:  # fmt: skip
    """Overwrite ``logits`` with ``token_weights * (softmax - one_hot(targets))``, the softmax from the (global)
    row statistics; ``targets`` are column indices, -1 where the target is another rank's."""
    n, cols = logits.shape
    _gradient_kernel[(n,)](logits, logits.stride(0), cols, z_max, sum_exp, targets.contiguous(),
                           token_weights.contiguous(), BLOCK=min(BLOCK, triton.next_power_of_2(cols)))  # fmt: skip
