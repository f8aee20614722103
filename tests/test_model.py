"""TransformerModel behaviour that HF parity does not cover: init, packing masks, limits."""

from __future__ import annotations

import math

import pytest
import torch

from ironcore.config import load_model_config
from ironcore.models import TransformerModel

TINY = ["gpt2-tiny", "llama-tiny", "gemma-tiny", "qwen3-tiny", "phi-tiny", "mistral-tiny"]


@pytest.mark.parametrize("name", TINY)
def test_forward_shape_and_finite(name: str) -> None:
    model = TransformerModel(load_model_config(name))
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    logits = model(ids)
    assert logits.shape == (2, 40, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights_and_megatron_init() -> None:
    cfg = load_model_config("llama-tiny")
    torch.manual_seed(7)
    a = TransformerModel(cfg).state_dict()
    torch.manual_seed(7)
    b = TransformerModel(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(8)
    assert not torch.equal(TransformerModel(cfg).state_dict()["embed.weight"], a["embed.weight"])
    assert a["layers.0.attn.qkv.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * cfg.num_layers)
    assert a["layers.0.mlp.down.weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert torch.equal(a["layers.0.attn_norm.weight"], torch.ones(cfg.hidden_size))


def test_gemma_norm_starts_at_zero_for_unit_scale() -> None:
    model = TransformerModel(load_model_config("gemma-tiny"))
    assert torch.equal(model.layers[0].attn_norm.weight, torch.zeros(model.config.hidden_size))


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "mistral-tiny"])
def test_packed_documents_do_not_see_each_other(name: str) -> None:
    """A document packed after another gives the same logits as the document alone."""
    torch.manual_seed(0)
    model = TransformerModel(load_model_config(name)).eval()
    first, second = torch.randint(0, 4096, (1, 11)), torch.randint(0, 4096, (1, 50))
    packed = torch.cat([first, second], dim=1)
    doc = torch.tensor([0] * 11 + [1] * 50)
    positions = torch.cat([torch.arange(11), torch.arange(50)]).unsqueeze(0)
    same_doc = (doc[:, None] == doc[None, :]).view(1, 1, 61, 61)
    with torch.no_grad():
        alone = model(second)
        together = model(packed, position_ids=positions, attention_mask=same_doc)
        leaky = model(packed, position_ids=positions)
    assert (together[:, 11:] - alone).abs().max() < 1e-5
    assert (leaky[:, 11:] - alone).abs().max() > 1e-3  # without the mask the first document leaks in


def test_post_norm_block_runs_and_differs_from_pre_norm() -> None:
    cfg = load_model_config("gpt2-tiny")
    torch.manual_seed(0)
    pre = TransformerModel(cfg)
    cfg.norm_position, cfg.final_norm = "post", False
    post = TransformerModel(cfg)
    post.load_state_dict(pre.state_dict(), strict=False)
    ids = torch.randint(0, 4096, (1, 8))
    assert not torch.allclose(pre(ids), post(ids))


def test_sequence_longer_than_positions_is_refused() -> None:
    model = TransformerModel(load_model_config("gpt2-tiny"))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 256"):
        model(torch.zeros(1, 257, dtype=torch.long))
