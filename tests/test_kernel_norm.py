"""The Triton norms (kernels/norm.py) against the torch ones: layers.norm.RMSNorm (plain and Gemma's ``1 + w``)
and torch.nn.LayerNorm.

On CPU the kernels run in Triton's interpreter. Outputs and the gradients of the input, weight (and bias) are
compared for a 3-D input of a non-power-of-two width and a 2-D one, for strided inputs, and the same comparison
is shown to catch a kernel that is wrong on purpose.
"""

from __future__ import annotations

import os
from functools import partial

import pytest

if os.environ.get("IRONCORE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (conftest.py does it too)
pytest.importorskip("triton")

import torch  # noqa: E402
from run_helpers import DEVICE  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from ironcore.kernels.norm import layer_norm, rms_norm  # noqa: E402
from ironcore.layers.norm import RMSNorm  # noqa: E402

# Liger-Kernel's fp32 tolerances, for outputs and gradients alike: test/transformers/test_rms_norm.py
# (atol 1e-4, rtol 1e-6) and test/transformers/test_layer_norm.py (atol 1e-5, rtol 1e-5).
RMS_TOL = dict(atol=1e-4, rtol=1e-6)
LN_TOL = dict(atol=1e-5, rtol=1e-5)
EPS = 1e-6
# 10 rows of 123 features (the masked tail of a 128 block; 4 backward programs of 3, 3, 3 and 1 rows on CPU),
# and 7 rows of 64.
SHAPES = [(2, 5, 123), (7, 64)]


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _rms_reference(unit_offset: bool):
    def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        norm = RMSNorm(weight.shape[0], EPS, unit_offset).to(DEVICE, weight.dtype)
        return functional_call(norm, {"weight": weight}, (x,))

    return forward


def _layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    norm = nn.LayerNorm(weight.shape[0], eps=EPS).to(DEVICE, weight.dtype)
    return functional_call(norm, {"weight": weight, "bias": bias}, (x,))


def _mismatches(kernel, reference, inputs: list[torch.Tensor], tol: dict) -> list[str]:
    """Which of the output and the gradients of each input differ between ``kernel(*inputs)`` and
    ``reference(*inputs)`` beyond ``tol`` (``[]``: none)."""
    got_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    want_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    got, want = kernel(*got_in), reference(*want_in)
    assert got.dtype == want.dtype and got.shape == want.shape
    dy = _randn(*got.shape, seed=1, dtype=got.dtype)
    got_all = [got, *torch.autograd.grad(got, got_in, dy)]
    want_all = [want, *torch.autograd.grad(want, want_in, dy)]
    names = ["output"] + [f"grad of input {i}" for i in range(len(inputs))]
    return [n for n, g, w in zip(names, got_all, want_all, strict=True) if not torch.allclose(g, w, **tol)]


@pytest.mark.device
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_equals_the_layer(shape: tuple[int, ...], unit_offset: bool) -> None:
    x, weight = _randn(*shape), _randn(shape[-1], seed=2) * 0.5 + 1
    kernel = partial(rms_norm, eps=EPS, unit_offset=unit_offset)
    assert _mismatches(kernel, _rms_reference(unit_offset), [x, weight], RMS_TOL) == []


@pytest.mark.device
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_equals_torch(shape: tuple[int, ...]) -> None:
    x = _randn(*shape) * 2 + 0.5  # rows with a mean to take out
    weight, bias = _randn(shape[-1], seed=2) * 0.5 + 1, _randn(shape[-1], seed=3)
    assert _mismatches(partial(layer_norm, eps=EPS), _layer_norm_reference, [x, weight, bias], LN_TOL) == []


def test_strided_inputs() -> None:
    """A slice of wider rows (row stride 130, read in place) and a transposed tensor (copied to unit stride)."""
    weight, bias = _randn(123, seed=2) * 0.5 + 1, _randn(123, seed=3)
    for x in (_randn(2, 5, 130)[..., :123], _randn(123, 6).t()):
        assert _mismatches(partial(rms_norm, eps=EPS), _rms_reference(False), [x, weight], RMS_TOL) == []
        assert _mismatches(partial(layer_norm, eps=EPS), _layer_norm_reference, [x, weight, bias], LN_TOL) == []


def test_bfloat16_keeps_the_input_dtype() -> None:
    """bf16 in, bf16 out (and bf16 gradients), at Liger's bf16 tolerance for RMSNorm (atol 2e-1, rtol 2e-2).
    Only approximately: Triton's interpreter truncates fp32 to bf16 where a GPU rounds to nearest."""
    x, weight = _randn(2, 5, 123, dtype=torch.bfloat16), _randn(123, seed=2, dtype=torch.bfloat16)
    tol = dict(atol=2e-1, rtol=2e-2)
    for unit_offset in (False, True):
        kernel = partial(rms_norm, eps=EPS, unit_offset=unit_offset)
        assert _mismatches(kernel, _rms_reference(unit_offset), [x, weight], tol) == []


def test_a_wrong_kernel_is_caught() -> None:
    """The comparisons above fail for a kernel that drops Gemma's offset, or a LayerNorm that does not centre."""
    x, weight, bias = _randn(2, 5, 123) + 0.5, _randn(123, seed=2) * 0.5, _randn(123, seed=3)
    no_offset = partial(rms_norm, eps=EPS, unit_offset=False)
    assert "output" in _mismatches(no_offset, _rms_reference(True), [x, weight], RMS_TOL)
    # ... while the plain kernel with the weight shifted by one is Gemma's norm, gradients included
    shifted = lambda x, w: rms_norm(x, w + 1, EPS)  # noqa: E731
    assert _mismatches(shifted, _rms_reference(True), [x, weight], RMS_TOL) == []

    not_centred = lambda x, w, b: rms_norm(x, w, EPS) + b  # noqa: E731
    assert "output" in _mismatches(not_centred, _layer_norm_reference, [x, weight, bias], LN_TOL)


def test_too_wide_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 65536"):
        rms_norm(torch.zeros(1, 65537, device=DEVICE), torch.ones(65537, device=DEVICE), EPS)
