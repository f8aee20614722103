"""RoPE on queries and keys in one Triton kernel, in place (the torch form is ``layers/rope.apply_rotary``).

The torch form reads q and k and writes rotated copies through several
temporaries (the halves, ``rotate_half``, the products, a ``cat`` for partial
rotation), once for q and once for k. Here one program per (batch, position)
loads its cos and sin once and rotates every head of q and k where they lie:
in the fused qkv projection's output, with no copy and no new tensor. The
backward is the same kernel with sin negated (the inverse rotation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_kernel(
    x_ptr, cos_ptr, sin_ptr,
    T, H,
    stride_xb, stride_xt, stride_xh,
    stride_cb, stride_ct,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr,
):
    """Rotate the first 2 * HALF features of each of the H heads at position (b, t) = divmod(program id, T)."""
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    cols = tl.arange(0, BLOCK_HALF)
    heads = tl.arange(0, BLOCK_H)
    # cos and sin repeat their first half (cat(freqs, freqs)): the first half serves both halves of x.
    angle = b * stride_cb + t * stride_ct + cols
    cos = tl.load(cos_ptr + angle, mask=cols < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + angle, mask=cols < HALF, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    first = x_ptr + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    mask = (heads[:, None] < H) & (cols[None, :] < HALF)
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    # rotate half: [x1, x2] * cos + [-x2, x1] * sin
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    """Rotate x [B, T, H, D] (stride 1 along D) in place by cos, sin [B or 1, 1, T, rot] (inverse: by -angle)."""
    B, T, H, D = x.shape
    rot = cos.shape[-1]
    if x.stride(-1) != 1:
        raise ValueError(f"rotate_ needs stride 1 along the head dimension, got strides {tuple(x.stride())}")
    if cos.shape != sin.shape or cos.shape[0] not in (1, B) or cos.shape[1:3] != (1, T) or rot % 2 or rot > D:
        raise ValueError(f"cos, sin {tuple(cos.shape)}, {tuple(sin.shape)} do not fit x [B, T, H, D] "
                         f"{tuple(x.shape)}: they must be [B or 1, 1, T, rot] with rot even and <= D")
    cos, sin = cos.contiguous(), sin.contiguous()
    _rotate_kernel[(B * T,)](
        x, cos, sin,
        T, H,
        x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(2),
        HALF=rot // 2, BLOCK_H=triton.next_power_of_2(H), BLOCK_HALF=triton.next_power_of_2(rot // 2),
        INVERSE=inverse,
    )


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        _launch(x, cos, sin, inverse=False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        # The incoming gradient may be the caller's (autograd.grad's grad_outputs) or another branch's: rotate a copy.
        grad = grad.clone(memory_format=torch.contiguous_format)
        _launch(grad, cos, sin, inverse=True)
        return grad, None, None


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rot = cos.shape[-1]`` features of each head of x [B, T, H, D] in place; return x.

    The same rotation as ``layers/rope.apply_rotary`` ("rotate half"), computed in fp32 and stored in x's
    dtype; the features past ``rot`` are left as they are. cos and sin are ``RotaryEmbedding``'s
    [B or 1, 1, T, rot] (rot even, <= D; a batch of 1 serves every row); only their first halves are read,
    since the second halves repeat them. They get no gradient.

    x may have any strides over B, T and H, but stride 1 over D. Inputs that autograd lets us modify:

    - the heads of the fused qkv projection, a slice of a ``view`` of it:
      ``qkv.view(B, T, Hq + 2 * Hkv, D)[:, :, : Hq + Hkv]`` rotates q and k together; take q, k and v
      from that view by slicing (also after the call), not with ``split``;
    - a transposed view of a fresh tensor [B, H, T, D] (e.g. the q/k norm's output): ``q.transpose(1, 2)``;
      ``q`` itself then holds the rotated values.

    Not allowed (autograd raises): an output of ``split``/``chunk``/``unbind`` (views from a function that
    returns several views can not be modified in place), a view of a tensor whose ``split`` outputs are used
    afterwards, a leaf that requires grad, and a tensor an earlier op saved for its backward.
    """
    return _Rotate.apply(x, cos, sin)
