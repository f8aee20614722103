"""Whole models with ``model.kernels: triton`` equal their torch path: logits, loss and every gradient.

Each family's small config switches on the kernels where it uses them
(RMSNorm with and without Gemma's offset, LayerNorm, RoPE in the fused q/k/v
projection or after per-head and whole-projection q/k norms, partial
rotation, SwiGLU and GeGLU, experts, the fused linear + cross-entropy of the
loss), in Triton's interpreter on a CPU. And the LM objective trains the
same with the fused loss as without.
"""

from __future__ import annotations

import pytest
import torch
from run_helpers import DEVICE, read_metrics, shakespeare_slice, small_run_config

from ironcore import kernels
from ironcore.config.base import from_dict
from ironcore.config.model import ModelConfig
from ironcore.models import TransformerModel
from ironcore.training.trainer import Trainer

pytest.importorskip("triton")

BASE = dict(vocab_size=200, hidden_size=32, num_layers=2, num_attention_heads=4, max_position_embeddings=32,
            position_embedding="rope", norm_type="rmsnorm", gated_mlp=True, activation="silu", ffn_hidden_size=48)
FAMILIES = {
    "llama": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "gemma": dict(num_key_value_heads=1, head_dim=16, norm_unit_offset=True, activation="gelu_tanh",
                  embedding_multiplier=5.66),
    "qwen3": dict(num_key_value_heads=2, qk_norm=True, attention_bias=True),
    "olmo2": dict(num_key_value_heads=2, qk_norm=True, qk_norm_per_head=False, norm_position="output",
                  tie_word_embeddings=False),
    "gpt2": dict(position_embedding="learned", norm_type="layernorm", gated_mlp=False, activation="gelu_tanh",
                 attention_bias=True, attention_out_bias=True, mlp_bias=True),
    "phi": dict(norm_type="layernorm", gated_mlp=False, activation="gelu_tanh", parallel_attn_mlp=True,
                rotary_percent=0.5, attention_bias=True, attention_out_bias=True, mlp_bias=True, lm_head_bias=True,
                tie_word_embeddings=False),
    "mixtral": dict(num_key_value_heads=2, num_experts=4, num_experts_per_token=2, moe_aux_loss_coef=0.1),
}
TOL = 1e-5


def _model(family: str, kernels_choice: str) -> TransformerModel:
    cfg = from_dict(ModelConfig, {**BASE, **FAMILIES[family], "kernels": kernels_choice}, "model")
    torch.manual_seed(0)
    model = TransformerModel(cfg).to(DEVICE)
    with torch.no_grad():  # norm gains and biases away from their initial 1 and 0, so that every one matters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).to(DEVICE))
    return model


def _run(model: TransformerModel, labels: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    if labels:
        weights = (torch.arange(16, device=DEVICE) % 5 != 0).float().expand(2, 16) / 26
        out = model(ids[:, :-1], labels=ids[:, 1:], loss_weights=weights)
        out.backward()
    else:
        out = model(ids[:, :-1])
        (out * torch.linspace(-1, 1, out.shape[-1], device=DEVICE)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.device
@pytest.mark.parametrize("labels", [False, True], ids=["logits", "fused_loss"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_triton_kernels_equal_the_torch_path(family: str, labels: bool) -> None:
    ours = _model(family, "triton")
    assert all(kernels.choice(ours.config, k, torch.device(DEVICE)) == "triton" for k in kernels.KERNELS)
    got, got_grads = _run(ours, labels)
    want, want_grads = _run(_model(family, "torch"), labels)
    assert (got - want).abs().max() <= TOL * want.abs().max()
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).abs().max() <= TOL * grad.abs().max() + 1e-9, name


def test_lm_objective_trains_the_same_with_the_fused_loss(tmp_path) -> None:
    """Three steps with gradient accumulation and a loss mask (SFT-like weights come from the data's mask):
    the chunked fused loss gives the torch path's losses and gradient norms."""
    (tmp_path / "data").mkdir()
    data = shakespeare_slice(tmp_path / "data", 20_000)
    model = {**BASE, **FAMILIES["llama"], "vocab_size": 512, "max_position_embeddings": 64, "name": "tiny"}
    logs = {}
    for ce in ("torch", "chunked"):
        cfg = small_run_config({**model, "kernel_options": {"cross_entropy": ce, "chunk_tokens": 24}}, data,
                               tmp_path / ce, 3, trainer__gradient_accumulation_steps=2)  # fmt: skip
        Trainer(cfg).train()
        logs[ce] = [(m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / ce) if "loss" in m]
    for (loss, norm), (want_loss, want_norm) in zip(logs["chunked"], logs["torch"], strict=True):
        assert abs(loss / want_loss - 1) < 1e-5 and abs(norm / want_norm - 1) < 1e-4


def test_triton_on_a_cpu_without_the_interpreter_runs_the_torch_code(monkeypatch) -> None:
    """A checkpoint trained with ``kernels: triton`` still runs on a CPU: without Triton's interpreter the layers
    take their torch code and the loss its chunked form."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = from_dict(ModelConfig, {**BASE, "kernels": "triton"}, "model")
    cpu = torch.device("cpu")
    assert [kernels.choice(cfg, k, cpu) for k in kernels.KERNELS] == ["torch", "torch", "torch", "chunked"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert [kernels.choice(cfg, k, cpu) for k in kernels.KERNELS] == ["triton"] * 4
