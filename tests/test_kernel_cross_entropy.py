"""The fused linear + cross-entropy equals the output projection followed by the plain loss.

Both implementations (``chunked`` in PyTorch, ``triton``; on a CPU through
Triton's interpreter) against ``vocab_logits`` + ``vocab_parallel_cross_entropy``:
loss and the gradients of input, weight and bias, with a loss mask and the
global-batch normalisation in the token weights, a vocabulary padded to 128
rows, chunks that do not divide the tokens, at Liger-Kernel's fp32
tolerances (test_fused_linear_cross_entropy.py: atol 1e-5, rtol 5e-4). The
TP=2 (vocab-parallel) case runs in tests/test_parallel.py; the memory saving
of a training step is measured in a fresh process for each variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import DEVICE

from ironcore.kernels.cross_entropy import linear_cross_entropy
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy
from ironcore.parallel.layers import vocab_logits

ATOL, RTOL = 1e-5, 5e-4  # Liger-Kernel's fp32 tolerances for its fused linear cross-entropy
ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["chunked", pytest.param("triton", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton is not installed"))]


def _problem(tokens: int = 45, hidden: int = 24, vocab: int = 300, bias: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g, device="cpu").to(DEVICE).requires_grad_(True)
    weight = torch.randn(384, hidden, generator=g) * 0.3  # 300 classes padded to 384 rows
    weight[vocab:] = 0
    weight = weight.to(DEVICE).requires_grad_(True)
    b = (torch.randn(384, generator=g) * 0.1).to(DEVICE).requires_grad_(True) if bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(DEVICE)
    mask = (torch.rand(tokens, generator=g) > 0.25).float().to(DEVICE)
    return x, weight, b, targets, mask / 97.0  # the loss mask over the global batch's trained tokens


def _grads(loss: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [g for g in torch.autograd.grad(loss, [t for t in tensors if t is not None])]


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.device
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("chunk", "bias"), [(8, True), (None, False), (1000, True)])
def test_fused_loss_and_gradients_equal_the_plain_loss(backend: str, chunk: int | None, bias: bool) -> None:
    x, weight, b, targets, weights = _problem(bias=bias)
    want = (vocab_parallel_cross_entropy(vocab_logits(x, weight, b, 300), targets) * weights).sum()
    got = linear_cross_entropy(x, weight, b, targets, weights, 300, backend, chunk)
    assert _close(got, want)
    grads = _grads(got, x, weight, b)
    for g, w in zip(grads, _grads(want, x, weight, b), strict=True):
        assert _close(g, w)
    assert grads[1][300:].abs().max() == 0  # the padding rows learn nothing


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_and_ignored_tokens_weigh_nothing(backend: str) -> None:
    x, weight, b, targets, weights = _problem()
    targets = targets.clone()
    targets[::3] = -100  # ignored targets, whatever their weight
    got = linear_cross_entropy(x, weight, b, targets, weights, 300, backend, 16)
    keep = (targets >= 0).float() * weights
    want = (vocab_parallel_cross_entropy(vocab_logits(x, weight, b, 300), targets) * keep).sum()
    assert _close(got, want)
    assert _grads(got, x)[0][::3].abs().max() == 0


def test_a_wrong_gradient_kernel_is_caught(monkeypatch) -> None:
    """The same comparison fails when the Triton kernel drops the target's -1 (softmax instead of its gradient)."""
    pytest.importorskip("triton")
    from ironcore.kernels import cross_entropy_triton

    right = cross_entropy_triton.write_gradient_

    def no_one_hot(logits, z_max, sum_exp, targets, token_weights):
        right(logits, z_max, sum_exp, torch.full_like(targets, -1), token_weights)

    monkeypatch.setattr(cross_entropy_triton, "write_gradient_", no_one_hot)
    x, weight, b, targets, weights = _problem()
    want = (vocab_parallel_cross_entropy(vocab_logits(x, weight, b, 300), targets) * weights).sum()
    got = linear_cross_entropy(x, weight, b, targets, weights, 300, "triton", 16)
    assert _close(got, want)  # the loss is computed before the gradient ...
    assert not _close(_grads(got, x)[0], _grads(want, x)[0])  # ... which is wrong, and seen


MEASURE = r"""
import json, re, sys, torch
from ironcore.config.base import from_dict
from ironcore.config.model import ModelConfig
from ironcore.models import TransformerModel
torch.manual_seed(0)
cfg = from_dict(ModelConfig, dict(vocab_size=50257, hidden_size=64, num_layers=1, num_attention_heads=4,
                                  max_position_embeddings=512, kernel_options={"cross_entropy": sys.argv[1]}), "model")
model = TransformerModel(cfg)
ids = torch.randint(0, 50257, (4, 513))
model(ids[:, :8], labels=ids[:, 1:9]).backward()  # warm up: the allocator's and autograd's fixed costs
model.zero_grad(set_to_none=False)
def peak_rss():  # the process's high-water mark of resident memory, bytes
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from what is resident now
before = peak_rss()
loss = model(ids[:, :-1], labels=ids[:, 1:], loss_weights=torch.full((4, 512), 1 / 2048))
loss.backward()
peak = peak_rss()
print(json.dumps({"loss": loss.item(), "step_peak": peak - before,
                  "grad": model.embed.weight.grad.abs().sum().item()}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the process's peak memory from /proc")
def test_chunked_loss_saves_at_least_the_logits_in_a_training_step() -> None:
    """A step of a one-layer model with GPT-2's vocabulary (4 x 512 tokens: fp32 logits of 412 MB), each variant in
    a fresh process: the chunked loss's peak is lower by at least the logits' size, with the same loss."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    runs = {}
    for backend in ("torch", "chunked"):
        done = subprocess.run([sys.executable, "-c", MEASURE, backend], env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        runs[backend] = json.loads(done.stdout.splitlines()[-1])
    logits_bytes = 4 * 512 * 50257 * 4
    assert runs["torch"]["step_peak"] - runs["chunked"]["step_peak"] >= logits_bytes, runs
    assert abs(runs["torch"]["loss"] - runs["chunked"]["loss"]) < 1e-4
    assert abs(runs["torch"]["grad"] / runs["chunked"]["grad"] - 1) < 1e-4
