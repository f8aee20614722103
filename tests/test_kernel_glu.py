"""The Triton gated activation (kernels/glu.py) against the gated branch of layers/mlp.py: ``act(gate) * up``
for ``h = [gate | up]``, SwiGLU (``silu``) and GeGLU (``gelu_tanh``).

On CPU the kernels run in Triton's interpreter. The output and the gradient of ``h`` are compared for a 3-D
input of a non-power-of-two width and a 2-D one wider than a block of columns, and the same comparison is shown
to catch a kernel that is wrong on purpose.
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

from ironcore.kernels.glu import gated_activation  # noqa: E402
from ironcore.layers.mlp import ACTIVATIONS  # noqa: E402

# Liger-Kernel's fp32 tolerance for its functional GeGLU test (test/transformers/test_geglu.py,
# test_correctness_functional: atol 1e-5, rtol 1e-5), for outputs and gradients alike, and for SwiGLU too:
# Liger's SwiGLU tests use atol 1e0 (rtol 1e-5), loose enough to pass SiLU for GELU on unit-scale inputs.
TOL = dict(atol=1e-5, rtol=1e-5)
# width of one half: 41 (the masked tail of a 64 block) on a 3-D input, 1500 (two blocks of 1024 columns)
SHAPES = [(2, 5, 2 * 41), (3, 2 * 1500)]


def _reference(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The gated branch of layers/mlp.MLP.forward."""
    gate, up = h.split(h.shape[-1] // 2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


def _mismatches(kernel, reference, h: torch.Tensor) -> list[str]:
    """Which of the output and the gradient of h differ between ``kernel(h)`` and ``reference(h)`` beyond TOL
    (``[]``: none)."""
    got_h, want_h = h.detach().clone().requires_grad_(True), h.detach().clone().requires_grad_(True)
    got, want = kernel(got_h), reference(want_h)
    assert got.dtype == want.dtype and got.shape == want.shape
    dy = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (got_grad,), (want_grad,) = torch.autograd.grad(got, got_h, dy), torch.autograd.grad(want, want_h, dy)
    pairs = {"output": (got, want), "grad of h": (got_grad, want_grad)}
    return [name for name, (g, w) in pairs.items() if not torch.allclose(g, w, **TOL)]


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def _kernel(activation: str):
    return partial(gated_activation, activation=activation)


def _torch(activation: str):
    return partial(_reference, activation=activation)


@pytest.mark.device
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation_equals_the_mlp(shape: tuple[int, ...], activation: str) -> None:
    assert _mismatches(_kernel(activation), _torch(activation), _randn(*shape)) == []


def test_a_wrong_activation_is_caught() -> None:
    """The comparison above fails for the other activation, and for the halves swapped (act(up) * gate)."""
    h = _randn(2, 5, 2 * 41)
    assert _mismatches(_kernel("gelu_tanh"), _torch("silu"), h) == ["output", "grad of h"]
    assert _mismatches(_kernel("silu"), _torch("gelu_tanh"), h) == ["output", "grad of h"]
    swapped = lambda h: gated_activation(torch.cat(h.chunk(2, dim=-1)[::-1], dim=-1), "silu")  # noqa: E731
    assert _mismatches(swapped, _torch("silu"), h) == ["output", "grad of h"]


def test_unknown_activation_and_odd_width_are_refused() -> None:
    with pytest.raises(ValueError, match="supports"):
        gated_activation(_randn(2, 8), "gelu")  # exact GELU: the kernel has only the tanh approximation
    with pytest.raises(ValueError, match="even"):
        gated_activation(_randn(2, 7), "silu")
