"""The in-place Triton RoPE (kernels/rope.py) against the torch form (layers/rope.apply_rotary).

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1); with IRONCORE_TEST_DEVICE=cuda
(benchmarks/gpu_check.sh) compiled, on the GPU. q and k come from a fused qkv
projection as in layers/attention.py, and are rotated at the two call sites the kernel is for: a slice of the
projection's output viewed as heads, and the transposed view of a fresh tensor (the q/k norm's output).
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from run_helpers import DEVICE  # noqa: E402

from ironcore.config.model import ModelConfig, RopeScaling  # noqa: E402
from ironcore.kernels import rope as kernel  # noqa: E402
from ironcore.layers.rope import RotaryEmbedding, apply_rotary  # noqa: E402

# Liger-Kernel's fp32 tolerances for its RoPE kernel against HF's apply_rotary_pos_emb, for the outputs and the
# gradients alike (test/transformers/test_rope.py: torch.allclose(..., atol=1e-5, rtol=1e-5)).
TOL = dict(atol=1e-5, rtol=1e-5)
HIDDEN = 16
pytestmark = pytest.mark.device


@dataclasses.dataclass
class Case:
    B: int = 2
    T: int = 5
    Hq: int = 3
    Hkv: int = 3
    D: int = 12  # half of the rotary dims (6) is not a power of two: the kernel's masks matter
    rotary_percent: float = 1.0
    per_row: bool = False  # position ids [B, T] (packed sequences) instead of [1, T] broadcast over the batch
    longrope: bool = False  # cos and sin scaled by LongRoPE's attention factor, long factors past 4 positions

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = ModelConfig(hidden_size=HIDDEN, num_attention_heads=self.Hq, num_key_value_heads=self.Hkv,
                          head_dim=self.D, position_embedding="rope", rotary_percent=self.rotary_percent,
                          max_position_embeddings=16)
        scaling = None
        if self.longrope:
            half = cfg.rotary_dim // 2
            scaling = RopeScaling(type="longrope", original_max_position_embeddings=4,
                                  short_factor=[1.0 + i / half for i in range(half)],
                                  long_factor=[2.0 + i for i in range(half)])
        if self.per_row:  # each row a different packing of documents: positions restart mid-row
            ends = torch.arange(self.B).unsqueeze(1) + 1
            positions = torch.arange(self.T).repeat(self.B, 1)
            positions = torch.where(positions >= ends, positions - ends, positions + 3)
        else:
            positions = torch.arange(3, 3 + self.T).unsqueeze(0)
        cos, sin = RotaryEmbedding(cfg, scaling=scaling)(positions)
        return cos.to(DEVICE), sin.to(DEVICE)


CASES = {  # the first three: B = 2 rows share cos and sin [1, 1, T, rot] (a 0 stride over the batch)
    "full": Case(),
    "partial": Case(rotary_percent=0.5),
    "gqa": Case(Hq=6, Hkv=2, D=8),
    "gqa_partial_one_row": Case(B=1, Hq=4, Hkv=2, rotary_percent=0.5),
    "per_row": Case(B=3, T=6, Hq=4, Hkv=2, per_row=True),
    "longrope": Case(T=7, D=16, rotary_percent=0.5, per_row=True, longrope=True),
}


def run(case: Case, site: str, dtype: torch.dtype = torch.float32):
    """q, k, v [B, H, T, D] made as in Attention.forward and rotated at ``site``, and the gradients of
    sum(q * gq + k * gk + v * gv) for the projection's input, weight and bias.

    ``torch`` / ``torch_norm``: apply_rotary (after an RMS norm of each head). ``view``: the kernel on
    ``qkv.view(B, T, Hq + 2 Hkv, D)[:, :, : Hq + Hkv]``. ``fresh``: RMS norm, then the kernel on the transposed
    view of the norm's [B, H, T, D] output.
    """
    B, T, Hq, Hkv, D = case.B, case.T, case.Hq, case.Hkv, case.D
    gen = torch.Generator().manual_seed(0)
    proj = torch.nn.Linear(HIDDEN, (Hq + 2 * Hkv) * D)
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    proj.to(DEVICE, dtype)
    x = torch.randn(B, T, HIDDEN, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    cos, sin = (t.to(dtype) for t in case.cos_sin())
    qkv = proj(x)
    if site == "view":
        heads = qkv.view(B, T, Hq + 2 * Hkv, D)
        kernel.rotate_(heads[:, :, : Hq + Hkv], cos, sin)
        q, k, v = (heads[:, :, a:b].transpose(1, 2) for a, b in ((0, Hq), (Hq, Hq + Hkv), (Hq + Hkv, None)))
    else:
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1))
        if site in ("torch_norm", "fresh"):
            q, k = F.rms_norm(q, (D,)), F.rms_norm(k, (D,))
        if site == "fresh":
            kernel.rotate_(q.transpose(1, 2), cos, sin)
            kernel.rotate_(k.transpose(1, 2), cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    outputs = (q, k, v)
    weights = [torch.randn(t.shape, generator=gen).to(DEVICE, dtype) for t in outputs]
    grads = torch.autograd.grad(outputs, (x, proj.weight, proj.bias), weights)
    return [t.detach() for t in outputs], list(grads)


def check(case: Case, site: str, reference: str, grads: bool = True) -> None:
    """q, k, v at ``site`` equal those of ``reference`` (and, with ``grads``, so do the gradients)."""
    (got, got_grads), (want, want_grads) = run(case, site), run(case, reference)
    if grads:
        got, want = got + got_grads, want + want_grads
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


SITES = [("view", "torch"), ("fresh", "torch_norm")]


@pytest.mark.parametrize("site, reference", SITES, ids=[s for s, _ in SITES])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_apply_rotary(case: Case, site: str, reference: str) -> None:
    check(case, site, reference)


def test_bf16_rotates_in_fp32() -> None:
    """bf16 heads are rotated in fp32 and rounded once: apply_rotary on their fp32 values, rounded to bf16."""
    case = CASES["partial"]
    cos, sin = case.cos_sin()
    x = torch.randn(case.B, case.T, case.Hq, case.D, generator=torch.Generator().manual_seed(0))
    x = x.to(DEVICE, torch.bfloat16)
    want = apply_rotary(x.float().transpose(1, 2), cos, sin).transpose(1, 2).bfloat16()
    torch.testing.assert_close(kernel.rotate_(x.clone(), cos, sin), want)  # bf16's default tolerances


def test_backward_leaves_the_incoming_gradient_alone() -> None:
    """The backward rotates a copy: autograd may hand it the caller's grad_outputs tensor itself (x not a view)."""
    case = Case()
    cos, sin = case.cos_sin()
    leaf = torch.randn(case.B, case.T, case.Hq, case.D, device=DEVICE, requires_grad=True)
    out = kernel.rotate_(leaf * 1, cos, sin)
    grad = torch.randn_like(out)
    kept = grad.clone()
    (got,) = torch.autograd.grad(out, leaf, grad)
    assert torch.equal(grad, kept)
    (want,) = torch.autograd.grad(apply_rotary(leaf.transpose(1, 2), cos, sin), leaf, kept.transpose(1, 2))
    torch.testing.assert_close(got, want, **TOL)


def test_split_outputs_are_refused() -> None:
    """Autograd does not let a function modify the views ``split`` returns in place: the docstring's rule."""
    qkv = torch.nn.Linear(HIDDEN, 3 * 2 * 12, device=DEVICE)(torch.randn(2, 5, HIDDEN, device=DEVICE))
    q, _, _ = qkv.split(2 * 12, dim=-1)
    cos, sin = Case().cos_sin()
    with pytest.raises(RuntimeError, match="returns multiple views"):
        kernel.rotate_(q.view(2, 5, 2, 12), cos, sin)


# A deliberately wrong kernel must fail the same comparison: each mutation wraps the launcher.
def _wrong_sign(launch):
    return lambda x, cos, sin, inverse: launch(x, cos, sin, not inverse)


def _backward_not_inverted(launch):
    return lambda x, cos, sin, inverse: launch(x, cos, sin, False)


def _wrong_features(launch):  # rotates the last rot features of each head instead of the first
    return lambda x, cos, sin, inverse: launch(x[..., -cos.shape[-1]:], cos, sin, inverse)


def _first_row_angles(launch):  # every batch row gets row 0's positions
    return lambda x, cos, sin, inverse: launch(x, cos[:1], sin[:1], inverse)


MUTATIONS = {
    "wrong_sign": (_wrong_sign, CASES["gqa"]),
    "backward_not_inverted": (_backward_not_inverted, CASES["gqa"]),
    "wrong_features": (_wrong_features, CASES["partial"]),
    "first_row_angles": (_first_row_angles, CASES["per_row"]),
}


@pytest.mark.parametrize("mutate, case", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_a_wrong_kernel_fails(monkeypatch, mutate, case: Case) -> None:
    monkeypatch.setattr(kernel, "_launch", mutate(kernel._launch))
    if mutate is _backward_not_inverted:
        check(case, "view", "torch", grads=False)  # the outputs are right: only the gradients can catch it
    with pytest.raises(AssertionError, match="not close"):
        check(case, "view", "torch")
