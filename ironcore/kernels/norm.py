"""RMSNorm and LayerNorm as Triton kernels: one pass over each row forward, one backward.

Eager torch norms launch several kernels and keep the fp32 intermediates for backward; here one program
normalises a whole row in registers and saves only the per-row statistics (rstd, and the mean for
LayerNorm). The weight (and bias) gradients are summed over rows without atomics, as in Liger-Kernel: each
backward program accumulates fp32 partial sums over its slice of rows, and torch adds the partials up.
The arithmetic is fp32 whatever the input dtype, and the rounding follows ``layers/norm.py``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_BLOCK = 65536  # one row lives in registers: past 64K features the kernels would spill (Liger's limit too)


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    h = x * rstd
    if UNIT_OFFSET:
        y = h * (1.0 + w)
    else:  # layers/norm.py multiplies `weight * h.type_as(x)`: round h to the input dtype first
        y = h.to(Y.dtype.element_ty).to(tl.float32) * w
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, y, mask=mask)


@triton.jit
def _rms_norm_bwd(
    DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
    UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    """dx = rstd * (dy*s - h * mean(dy*s*h)) with h = x*rstd and s the scale; dw = sum over rows of dy*h."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    scale = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        scale += 1.0
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for row in range(row_start, tl.minimum(row_start + rows_per_program, n_rows)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        h = x * rstd
        m = dy * scale
        dx = rstd * (m - h * (tl.sum(m * h, axis=0) / n_cols))
        tl.store(DX + row * stride_dx + cols, dx, mask=mask)
        if UNIT_OFFSET:
            dw += dy * h
        else:  # the forward multiplied the weight by h rounded to the input dtype
            dw += dy * h.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


@triton.jit
def _layer_norm_fwd(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, xc * rstd * w + b, mask=mask)


@triton.jit
def _layer_norm_bwd(
    DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols,
    rows_per_program, BLOCK: tl.constexpr,
):
    """dx = rstd * (dy*w - mean(dy*w) - h * mean(dy*w*h)) with h = (x - mean) * rstd; dw = sum dy*h, db = sum dy."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for row in range(row_start, tl.minimum(row_start + rows_per_program, n_rows)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        h = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        m = dy * w
        dx = rstd * (m - tl.sum(m, axis=0) / n_cols - h * (tl.sum(m * h, axis=0) / n_cols))
        tl.store(DX + row * stride_dx + cols, dx, mask=mask)
        dw += dy * h
        db += dy
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)
    tl.store(DB_PARTIAL + pid * n_cols + cols, db, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, features] with unit stride along the features (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _block(n_cols: int) -> tuple[int, int]:
    """The block (a power of two >= n_cols, the tail masked) and a warp count that grows with it (Liger's)."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_BLOCK:
        raise ValueError(f"the Triton norms fit rows of at most {MAX_BLOCK} features, got {n_cols}")
    return block, 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32


def _backward_grid(x: torch.Tensor) -> tuple[int, int]:
    """(programs, rows each) for a backward pass: one program per SM, so there are few weight partials to sum
    (on CPU, in the interpreter, a few programs, so the tests cover the partial sums)."""
    n_rows = x.shape[0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    programs = max(min(sms, n_rows), 1)
    return programs, math.ceil(n_rows / programs)


def _output(x: torch.Tensor, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The output, shaped like ``x``, and its [rows, features] view for the kernel. The output is returned as
    allocated, not as a view: the RoPE kernel rotates q/k norms' outputs in place, which autograd forbids on a
    view made inside a custom Function."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, y.view(n_rows, n_cols)


def _gradient_buffers(x2: torch.Tensor, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input gradient [rows, features] and one row of fp32 weight-gradient partials per program."""
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    return dx, torch.empty((programs, x2.shape[1]), dtype=torch.float32, device=x2.device)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
        x2 = _rows(x)
        n_rows, n_cols = x2.shape
        block, warps = _block(n_cols)
        y, y2 = _output(x, n_rows, n_cols)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        _rms_norm_fwd[(n_rows,)](
            x2, weight, y2, rstd, x2.stride(0), y2.stride(0), n_cols, eps,
            UNIT_OFFSET=unit_offset, BLOCK=block, num_warps=warps,
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.unit_offset = unit_offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        n_rows, n_cols = x2.shape
        block, warps = _block(n_cols)
        programs, rows_each = _backward_grid(x2)
        dx, dw = _gradient_buffers(x2, programs)
        _rms_norm_bwd[(programs,)](
            dy2, x2, weight, rstd, dx, dw, dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, rows_each,
            UNIT_OFFSET=ctx.unit_offset, BLOCK=block, num_warps=warps,
        )
        return dx.view(dy.shape), dw.sum(0).to(weight.dtype), None, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        n_rows, n_cols = x2.shape
        block, warps = _block(n_cols)
        y, y2 = _output(x, n_rows, n_cols)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        _layer_norm_fwd[(n_rows,)](
            x2, weight, bias, y2, mean, rstd, x2.stride(0), y2.stride(0), n_cols, eps, BLOCK=block, num_warps=warps,
        )
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        n_rows, n_cols = x2.shape
        block, warps = _block(n_cols)
        programs, rows_each = _backward_grid(x2)
        dx, dw = _gradient_buffers(x2, programs)
        db = torch.empty_like(dw)
        _layer_norm_bwd[(programs,)](
            dy2, x2, weight, mean, rstd, dx, dw, db, dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
            rows_each, BLOCK=block, num_warps=warps,
        )
        return dx.view(dy.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(ctx.bias_dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """``x * rsqrt(mean(x**2) + eps) * w`` over the last dim (scale ``1 + w`` with ``unit_offset``, as Gemma),
    computed in fp32 and returned in ``x.dtype``, like ``layers.norm.RMSNorm``."""
    return _RMSNorm.apply(x, weight, eps, unit_offset)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps) * w + b`` over the last dim, computed in fp32 and returned in
    ``x.dtype``, like ``torch.nn.LayerNorm``."""
    return _LayerNorm.apply(x, weight, bias, eps)
