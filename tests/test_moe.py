"""Mixture of experts: routing, token grouping and dropping, the auxiliary losses against HF's, and training.

HF parity of the logits and greedy generation for Mixtral, Qwen3-MoE and
OLMoE are in test_hf_parity.py and test_inference.py (their CASES), TP=2 in
test_parallel.py; this file checks what those cannot: the load-balancing
loss and its gradient against HF's training loss, the grouped computation
against a per-token reference, and what a training run logs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from run_helpers import read_metrics, shakespeare_slice, small_run_config
from test_hf_parity import CASES, _hf_model, _inputs

from ironcore.checkpoints.load import load_model
from ironcore.config.base import from_dict
from ironcore.config.model import ModelConfig
from ironcore.layers.moe import MoE
from ironcore.models import TransformerModel
from ironcore.training.trainer import Trainer

MOE_CASES = ["mixtral_top2", "qwen3_moe_top2", "olmoe_top2_no_renorm"]


def _router_grad(hf_model: torch.nn.Module) -> torch.Tensor:
    (grad,) = [p.grad for n, p in hf_model.named_parameters() if n.startswith("model.layers.0.") and "gate" in n
               and "proj" not in n and p.grad is not None]  # fmt: skip (the router: mlp.gate / block_sparse_moe.gate)
    return grad


@pytest.mark.parametrize("case", MOE_CASES)
def test_aux_loss_equals_hf_on_the_same_batch(case: str, tmp_path) -> None:
    hf_model = _hf_model(CASES[case])
    hf_model.save_pretrained(tmp_path / "hf")
    ids = _inputs(97)
    with torch.no_grad():
        want = hf_model(ids, output_router_logits=True).aux_loss
        ours = load_model(tmp_path / "hf")
        ours(ids)
    assert abs(ours.aux_losses["aux_loss"].item() - want.item()) < 1e-6
    load = ours.aux_losses["expert_load"]  # [layers, experts]: top-2 of 4, unevenly
    assert (load.sum(dim=1) == 2 * ids.numel()).all() and load.max() - load.min() >= 0.4 * load.float().mean()


@pytest.mark.parametrize("case", ["mixtral_top2", "qwen3_moe_top2"])
def test_training_loss_and_router_gradient_equal_hf(case: str, tmp_path) -> None:
    """HF's loss with labels is cross-entropy + router_aux_loss_coef x aux_loss; ours reaches the backward pass
    through the model (the objective sees only logits). Without the aux loss the router gradient differs."""
    hf_model = _hf_model({**CASES[case], "router_aux_loss_coef": 0.5, "output_router_logits": True})
    hf_model.save_pretrained(tmp_path / "hf")
    ids = _inputs(97)
    out = hf_model(ids, labels=ids)
    out.loss.backward()
    want = _router_grad(hf_model)

    def ours_router_grad(coef: float) -> tuple[float, torch.Tensor]:
        model = load_model(tmp_path / "hf")
        model.config.moe_aux_loss_coef = coef
        logits = model(ids)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        ce.backward()
        return (ce + coef * model.aux_losses["aux_loss"]).item(), model.layers[0].mlp.router.weight.grad

    loss, grad = ours_router_grad(0.5)
    assert model_loss_close(loss, out.loss.item())
    assert (grad - want).abs().max() <= 1e-5 * want.abs().max() + 1e-7
    _, without = ours_router_grad(0.0)
    assert (without - want).abs().max() > 1e-3 * want.abs().max()


def model_loss_close(got: float, want: float) -> bool:
    return abs(got - want) <= 1e-5 * abs(want)


def _moe_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, max_position_embeddings=64,
                position_embedding="rope", norm_type="rmsnorm", gated_mlp=True, activation="silu",
                num_experts=4, num_experts_per_token=2, moe_ffn_hidden_size=24)
    return from_dict(ModelConfig, {**base, **overrides}, "model")


def _reference(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Token by token: the top-k experts' outputs, gate-weighted; over capacity an expert skips later tokens."""
    flat = x.reshape(-1, x.shape[-1])
    probs = moe.router(flat).float().softmax(-1)
    weights, experts = probs.topk(moe.top_k, dim=-1)
    if moe.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    taken = [0] * moe.num_experts
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for w, e in zip(weights[t], experts[t].tolist()):
            taken[e] += 1
            if capacity is not None and taken[e] > capacity:
                continue
            gate, up = F.linear(flat[t], moe.up[e]).chunk(2)
            out[t] += w * F.linear(F.silu(gate) * up, moe.down[e])
    if moe.shared is not None:
        out += moe.shared(flat)
    return out.view_as(x)


@pytest.mark.parametrize("variant", ["routed", "shared_experts", "no_renormalize", "token_dropping"])
def test_grouped_experts_equal_the_per_token_reference(variant: str) -> None:
    overrides = {"shared_experts": dict(num_shared_experts=1), "no_renormalize": dict(moe_renormalize=False),
                 "token_dropping": dict(moe_capacity_factor=0.5)}.get(variant, {})
    torch.manual_seed(0)
    model = TransformerModel(_moe_config(**overrides))
    moe = model.layers[0].mlp
    with torch.no_grad():
        moe.router.weight.mul_(20)  # a decided, uneven routing
        x = torch.randn(2, 12, 32)
        got = moe(x)
    capacity = None
    if variant == "token_dropping":  # 0.5 x 24 tokens x 2 / 4 experts
        capacity = 6
        assert moe.stats.dropped > 0
    assert (got - _reference(moe, x, capacity)).abs().max() < 1e-5


def test_z_loss_is_the_mean_squared_logsumexp_and_trains_the_router() -> None:
    torch.manual_seed(0)
    model = TransformerModel(_moe_config(moe_z_loss_coef=0.1, moe_aux_loss_coef=0.0))
    ids = _inputs(97)
    model(ids).sum().backward()
    logits = [block.mlp.router(h) for block, h in zip(model.layers, _mlp_inputs(model, ids))]
    want = torch.cat([torch.logsumexp(lg.reshape(-1, 4), -1) ** 2 for lg in logits]).mean()
    assert abs(model.aux_losses["z_loss"].item() - want.item()) < 1e-5
    with_z = model.layers[0].mlp.router.weight.grad.clone()
    model.zero_grad()
    model.config.moe_z_loss_coef = 0.0
    model(ids).sum().backward()
    assert (model.layers[0].mlp.router.weight.grad - with_z).abs().max() > 1e-6


def _mlp_inputs(model: TransformerModel, ids: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    hooks = [b.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach())) for b in model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def test_moe_training_logs_aux_loss_and_expert_load(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "data").mkdir()
    data = shakespeare_slice(tmp_path / "data", 20_000)
    model = {"name": "moe", "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 64, "position_embedding": "rope", "norm_type": "rmsnorm", "gated_mlp": True,
             "activation": "silu", "ffn_hidden_size": 64, "num_experts": 4, "num_experts_per_token": 2,
             "moe_z_loss_coef": 0.001}
    cfg = small_run_config(model, data, tmp_path / "run", 6, trainer__gradient_accumulation_steps=2,
                           utils__tracking=True, utils__experiment_name="moe", operation__log_interval=3)
    Trainer(cfg).train()
    lines = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert all(m["aux_loss"] >= 1.0 - 1e-6 for m in lines)  # E x sum f P >= 1, equal when balanced
    assert all(m["z_loss"] > 0 and m["expert_load_max"] >= 1.0 for m in lines)
    assert (tmp_path / "run" / "expert_load.png").stat().st_size > 1000
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("moe").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/aux_loss")] == [3, 6]
    assert "expert_load.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # Without tracking the heatmap is still written, and no missing tracker is asked to store it.
    Trainer(small_run_config(model, data, tmp_path / "untracked", 2, operation__log_interval=1)).train()
    assert (tmp_path / "untracked" / "expert_load.png").stat().st_size > 1000
