"""The gated activation of the MLP, ``act(gate) * up``, as Triton kernels (SwiGLU, GeGLU).

In eager torch the split, the activation and the product are separate kernels, and autograd keeps
``act(gate)`` for backward. Here one kernel reads ``h = [gate | up]`` once and writes the product; backward
recomputes the activation from the saved ``h`` (as Liger-Kernel does) and writes the gradient of ``h``
straight into its two halves, so there is no ``cat``.

Both activations are ``g * sigmoid(a(g))``: ``a(g) = g`` is SiLU, and
``a(g) = 2 * sqrt(2/pi) * (g + 0.044715 g^3)`` is GELU's tanh approximation, since
``0.5 * (1 + tanh(z)) = sigmoid(2z)``. That needs no ``tanh``, which Triton's interpreter lacks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("silu", "gelu_tanh")
MAX_BLOCK = 1024  # columns per program: rows of any width are covered by a second grid dimension


@triton.jit
def _gate_arg(g, GELU: tl.constexpr):
    """a(g) and a'(g), where act(g) = g * sigmoid(a(g))."""
    if GELU:  # 1.5957691216057308 = 2 * sqrt(2 / pi)
        a = 1.5957691216057308 * (g + 0.044715 * g * g * g)
        da = 1.5957691216057308 * (1.0 + 3 * 0.044715 * g * g)
    else:
        a = g
        da = tl.full(g.shape, 1.0, tl.float32)
    return a, da


@triton.jit
def _glu_fwd(H, Y, n_cols, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = H + row * 2 * n_cols + cols
    g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate + n_cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _gate_arg(g, GELU)
    act = (g * tl.sigmoid(a)).to(Y.dtype.element_ty).to(tl.float32)  # torch rounds act(gate) before the product
    tl.store(Y + row * n_cols + cols, act * u, mask=mask)


@triton.jit
def _glu_bwd(DY, H, DH, n_cols, GELU: tl.constexpr, BLOCK: tl.constexpr):
    """d gate = dy * up * (s + g * s * (1 - s) * a'(g)) with s = sigmoid(a(g)); d up = dy * act(g)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = H + row * 2 * n_cols + cols
    g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate + n_cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _gate_arg(g, GELU)
    s = tl.sigmoid(a)
    d_gate = DH + row * 2 * n_cols + cols
    tl.store(d_gate, dy * u * (s + g * s * (1.0 - s) * da), mask=mask)
    tl.store(d_gate + n_cols, dy * (g * s).to(DH.dtype.element_ty).to(tl.float32), mask=mask)


def _launch(h: torch.Tensor) -> tuple[int, int, int]:
    """(rows, width of one half, block of columns) for h viewed as [rows, 2 * width]."""
    n_cols = h.shape[-1] // 2
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    return h.numel() // h.shape[-1], n_cols, block


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, gelu: bool) -> torch.Tensor:
        h = h.contiguous()
        n_rows, n_cols, block = _launch(h)
        y = torch.empty((*h.shape[:-1], n_cols), dtype=h.dtype, device=h.device)
        _glu_fwd[(n_rows, triton.cdiv(n_cols, block))](h, y, n_cols, GELU=gelu, BLOCK=block)
        ctx.save_for_backward(h)
        ctx.gelu = gelu
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (h,) = ctx.saved_tensors
        n_rows, n_cols, block = _launch(h)
        dh = torch.empty_like(h)
        _glu_bwd[(n_rows, triton.cdiv(n_cols, block))](dy.contiguous(), h, dh, n_cols, GELU=ctx.gelu, BLOCK=block)
        return dh, None


def gated_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` for ``h = [gate | up]`` along the last dim (as ``layers/mlp.py`` splits it), with
    ``activation`` ``silu`` (SwiGLU) or ``gelu_tanh`` (GeGLU, ``F.gelu(approximate="tanh")``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"gated_activation supports {ACTIVATIONS}, got {activation!r}")
    if h.shape[-1] % 2:
        raise ValueError(f"h holds [gate | up] along its last dim, which must be even, got {h.shape[-1]}")
    return _GatedActivation.apply(h, activation == "gelu_tanh")
