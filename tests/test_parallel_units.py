"""Single-process checks of the parallel machinery: layouts, padding, sharding maths, loss, clipping, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ironcore.config import load_model_config
from ironcore.errors import CheckpointError, ConfigError
from ironcore.models import TransformerModel
from ironcore.parallel import comm
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy
from ironcore.parallel.grad import all_reduce_data_parallel_grads, finalize_grads, grad_norm
from ironcore.parallel.layers import padded_vocab_size
from ironcore.parallel.setup import ParallelContext, init_parallel
from ironcore.parallel.sharding import (
    TPSplit,
    full_optimizer_state,
    full_shapes,
    full_state_dict,
    load_full_optimizer_state,
    load_full_state_dict,
)


def small(name: str, **overrides) -> TransformerModel:
    torch.manual_seed(0)
    return TransformerModel(dataclasses.replace(load_model_config(name), num_layers=2, **overrides))


# ---- layout and errors --------------------------------------------------------------------------------------
def test_single_process_context_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_parallel(1, load_model_config("llama-tiny"), device="cpu")
    assert ctx == ParallelContext() and ctx.is_main
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("tp", "world", "model", "message"),
    [
        (4, 2, {}, "trainer.tensor_model_parallel_size 4 is larger than the world size 2"),
        (2, 3, {}, "world size 3 is not a multiple of trainer.tensor_model_parallel_size 2"),
        (8, 8, {}, "model.num_attention_heads 4 is not divisible by trainer.tensor_model_parallel_size 8"),
        (
            2, 2, {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 192},
            "model.num_key_value_heads 3 must divide or be divisible by trainer.tensor_model_parallel_size 2",
        ),
        (2, 2, {"ffn_hidden_size": 351}, "model.ffn_hidden_size 351 is not divisible by"),
    ],
)  # fmt: skip
def test_bad_layouts_fail_in_one_line_before_any_process_group(monkeypatch, tp, world, model, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    cfg = dataclasses.replace(load_model_config("llama-tiny"), **model)
    with pytest.raises(ConfigError) as err:
        init_parallel(tp, cfg, device="cpu")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not dist.is_initialized()


# ---- vocabulary padding ---------------------------------------------------------------------------------------
def test_padded_vocab_size():
    assert padded_vocab_size(4096, 1) == 4096 and padded_vocab_size(4096, 4) == 4096
    assert padded_vocab_size(50257, 1) == 50304 and padded_vocab_size(50257, 8) == 51200
    assert padded_vocab_size(97, 1) == 128 and padded_vocab_size(97, 2) == 256


@pytest.mark.parametrize("tied", [True, False])
def test_padding_never_leaves_the_model(tied):
    model = small("llama-tiny", vocab_size=300, tie_word_embeddings=tied)
    assert model.embed.weight.shape[0] == 384
    assert model.embed.weight[300:].abs().sum() == 0  # padding rows start at zero
    ids = torch.randint(0, 300, (2, 8))
    assert model(ids).shape == (2, 8, 300)
    sharded = model(ids, parallel_output=True)
    assert sharded.shape == (2, 8, 384) and torch.isinf(sharded[..., 300:]).all()
    assert torch.isfinite(sharded[..., :300]).all()
    loss = vocab_parallel_cross_entropy(sharded, torch.randint(0, 300, (2, 8))).mean()
    loss.backward()
    assert model.embed.weight.grad[300:].abs().sum() == 0
    # Even a loss that does send gradient to the -inf columns leaves the padding rows without one.
    model.zero_grad()
    model(ids, parallel_output=True).sum().backward()
    head = model.embed.weight if tied else model.lm_head.weight
    assert head.grad[300:].abs().sum() == 0 and head.grad[:300].abs().sum() > 0


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_vocab_projection_matches_masked_linear(tied, autocast):
    """The output projection's own autograd gives what F.linear + a -inf padding mask give, under bf16 autocast too,
    with a gradient arriving on every column (the padding ones included)."""
    model = small("llama-tiny", vocab_size=300, tie_word_embeddings=tied, lm_head_bias=not tied)
    head = model.embed if tied else model.lm_head
    with torch.no_grad():
        for p in head.parameters():
            p[300:] = torch.randn_like(p[300:])  # would leak into the input gradient if padding columns were read
    x = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    padding = torch.arange(384) >= 300
    grad_out = torch.randn(2, 5, 384)
    results = []
    for project in (
        model.embed.project if tied else model.lm_head,
        lambda h: F.linear(h, head.weight, None if tied else head.bias).masked_fill(padding, float("-inf")),
    ):
        model.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = project(x)
        out.backward(grad_out.to(out.dtype))
        results.append((out, x.grad, *(p.grad for p in head.parameters())))
    (out, *grads), (ref, *ref_grads) = results
    assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert all(g.dtype == torch.float32 and g.is_contiguous() for g in grads)
    assert all(g[300:].abs().sum() == 0 for g in grads[1:])  # padding rows get no gradient
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(a, b)


def test_same_seed_same_network_whatever_the_padding():
    """The real rows are drawn from the RNG first, padding is zeros: init does not depend on the padded size."""
    a = full_state_dict(small("gpt2-tiny", vocab_size=300))
    b = full_state_dict(small("gpt2-tiny", vocab_size=300))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["embed.weight"].shape == (300, 128)


# ---- sharding maths (simulated ranks) -------------------------------------------------------------------------
SPLITS = {
    "column": TPSplit(0, (8,)),
    "row": TPSplit(1, (8,)),
    "fused": TPSplit(0, (8, 4, 4)),
    "kv_replicated": TPSplit(0, (8, 2, 2), replicas=(1, 2, 2)),  # tp=4: 2 kv heads, each on 2 ranks
    "mqa": TPSplit(0, (8, 1, 1), replicas=(1, 4, 4)),
    "vocab": TPSplit(0, (300,), padded=512),
}


@pytest.mark.parametrize("kind", SPLITS)
def test_shard_then_assemble_is_identity(kind):
    split, tp = SPLITS[kind], 4
    full = torch.randn(split.full_shape((1, 1)) if split.dim == 0 else (3, 8))
    shards = [split.shard(full, tp, rank) for rank in range(tp)]
    assert all(s.shape == split.local_shape(full.shape, tp) for s in shards)
    assert torch.equal(split.assemble(shards), full)
    # every element is owned exactly once (what the grad norm counts)
    owned = sum(sum(p.numel() for p in split.owned_pieces(s, tp, r)) for r, s in enumerate(shards))
    padding = (split.padded or 0) - sum(split.parts) if split.padded else 0
    assert owned == full.numel() + padding * full.shape[1]


def test_kv_heads_replicated_to_the_ranks_whose_queries_read_them():
    split, tp = SPLITS["kv_replicated"], 4
    full = torch.arange(12.0).unsqueeze(1)  # q rows 0-7, k rows 8-9, v rows 10-11; each rank: 2 q, 1 k, 1 v
    k_of_rank = [split.shard(full, tp, r)[2].item() for r in range(tp)]
    assert k_of_rank == [8.0, 8.0, 9.0, 9.0]


# ---- state dicts at TP=1 --------------------------------------------------------------------------------------
def test_full_state_dict_round_trip_strips_and_restores_padding():
    model = small("phi-tiny", vocab_size=300)  # untied head with a bias: both padded
    full = full_state_dict(model)
    assert full["lm_head.weight"].shape == (300, 128) and full["lm_head.bias"].shape == (300,)
    assert full_shapes(model) == {k: v.shape for k, v in full.items()}
    with torch.device("meta"):
        fresh = TransformerModel(model.config)
    load_full_state_dict(fresh, full)
    fresh.rope.reset_parameters("cpu")
    ids = torch.randint(0, 300, (1, 8))
    assert torch.equal(fresh(ids), model(ids))
    with pytest.raises(CheckpointError, match="missing"):
        load_full_state_dict(fresh, {k: v for k, v in full.items() if k != "lm_head.bias"})
    with pytest.raises(CheckpointError, match="shapes"):
        load_full_state_dict(fresh, {**full, "embed.weight": torch.zeros(384, 128)})


def test_optimizer_state_round_trip_by_parameter_name():
    model = small("gpt2-tiny", vocab_size=300)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 300, (1, 8))).sum().backward()
    opt.step()
    full = full_optimizer_state(model, opt)
    assert full["state"]["embed.weight"]["exp_avg"].shape == (300, 128)
    other = small("gpt2-tiny", vocab_size=300)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    load_full_optimizer_state(other, other_opt, full)
    a, b = opt.state_dict(), other_opt.state_dict()
    for i, values in a["state"].items():
        assert all(torch.equal(v, b["state"][i][k]) for k, v in values.items())


# ---- loss, gradients ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_torch_in_one_process(dtype):
    logits = torch.randn(3, 5, 50, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (3, 5))
    targets[0, 0] = -100
    ours = vocab_parallel_cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    assert ours.dtype == torch.float32 and ours[0, 0] == 0
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert g_ours.dtype == dtype
    torch.testing.assert_close(g_ours, g_ref)


def test_grad_norm_in_one_process_is_exact():
    model = small("gemma-tiny")  # its embedding gradient trips torch's fp32 CPU norm (5e-5 off)
    model(torch.randint(0, 4096, (2, 8))).logsumexp(-1).sum().backward()
    finalize_grads(model)  # no groups: nothing to do
    exact = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
    assert abs(grad_norm(model).item() / exact.item() - 1) < 1e-6


def test_dp_reduction_is_sum_or_mean():
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        all_reduce_data_parallel_grads(small("gpt2-tiny"), reduction="avg")


def test_coalesced_buckets_group_by_dtype_and_size():
    tensors = [torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4), torch.zeros(8)]
    buckets = comm._buckets(tensors, bucket_bytes=32)
    assert [[t.numel() for t in b] for b in buckets] == [[4, 4], [4], [8]]
    assert [b[0].dtype for b in buckets] == [torch.float32, torch.bfloat16, torch.float32]


def test_single_process_collectives_move_nothing():
    comm.reset_traffic()
    x = torch.ones(3)
    assert comm.all_reduce(x, None) is x and comm.all_gather(x, None) == [x]
    assert comm.traffic() == {}
