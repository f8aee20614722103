"""Our TransformerModel is the same network as HF Transformers', for every supported family.

Each case builds a small randomly initialised HF model, redraws every weight
wide (norm gains away from 1, non-zero biases) so that a wrongly wired
parameter changes the logits, and compares fp32 logits both ways:
HF -> load_model -> ours, and ours -> save_hf_model -> AutoModelForCausalLM.
"""

from __future__ import annotations

import pytest
import torch
from run_helpers import DEVICE

transformers = pytest.importorskip("transformers")

from ironcore.checkpoints.hf import save_hf_model  # noqa: E402
from ironcore.checkpoints.load import load_model  # noqa: E402

TOL = 1e-4
SEQ = 24

BASE = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)

CASES = {
    "gpt2": dict(model_type="gpt2", vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "openai_gpt_post_norm": dict(model_type="openai-gpt", vocab_size=97, n_embd=32, n_layer=2, n_head=4,
                                 n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(model_type="llama", **BASE, num_key_value_heads=2, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # Llama-3 scaling with a short "original" context so that all three frequency bands occur.
    "llama3_rope_scaling": dict(model_type="llama", **BASE, num_key_value_heads=2,
                                rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 16}),
    "llama_bias": dict(model_type="llama", **BASE, attention_bias=True, mlp_bias=True),
    "mistral_sliding_window": dict(model_type="mistral", **BASE, num_key_value_heads=2, sliding_window=5),
    "qwen2_qkv_bias": dict(model_type="qwen2", **BASE, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3_qk_norm": dict(model_type="qwen3", **BASE, num_key_value_heads=2, head_dim=16),
    "gemma_mqa": dict(model_type="gemma", **BASE, num_key_value_heads=1, head_dim=16),
    "phi_partial_rotary": dict(model_type="phi", **BASE, partial_rotary_factor=0.5, resid_pdrop=0.0,
                               embd_pdrop=0.0, attention_dropout=0.0),
}


def _hf_model(spec: dict) -> torch.nn.Module:
    spec = dict(spec)
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    _redraw(model, unit_offset=config.model_type == "gemma")
    return model


@torch.no_grad()
def _redraw(model: torch.nn.Module, unit_offset: bool) -> None:
    """Weights wide enough that every parameter matters: gains far from 1, biases far from 0."""
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() == 1 and "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.copy_((0.0 if unit_offset else 1.0) + 0.5 * noise)
        elif p.dim() == 1:
            p.copy_(0.2 * noise)
        else:
            p.copy_(0.15 * noise)


def _inputs(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(2))


@pytest.mark.device
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf_both_ways(case: str, tmp_path) -> None:
    hf_model = _hf_model(CASES[case])
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    hf_model.to(DEVICE)
    ids = _inputs(hf_model.config.vocab_size).to(DEVICE)
    with torch.no_grad():
        expected = hf_model(ids).logits

    ours = load_model(hf_dir, device=DEVICE)
    with torch.no_grad():
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL
    assert expected.std() > 0.5  # the comparison is not between two near-constant outputs

    out_dir = save_hf_model(ours, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").float().eval()
    with torch.no_grad():
        again = reloaded.to(DEVICE)(ids).logits
    assert (again - expected).abs().max().item() < TOL


def test_sliding_window_matters() -> None:
    """The Mistral case only proves the window if a full causal mask would give different logits."""
    spec = CASES["mistral_sliding_window"]
    windowed = _hf_model(spec)
    full = _hf_model({**spec, "sliding_window": None})
    ids = _inputs(97)
    with torch.no_grad():
        assert (windowed(ids).logits - full(ids).logits).abs().max() > 1e-2


def test_sharded_checkpoint_round_trip(tmp_path) -> None:
    hf_model = _hf_model(CASES["llama"])
    ids = _inputs(97)
    with torch.no_grad():
        expected = hf_model(ids).logits
    ours = load_model(hf_model.save_pretrained(tmp_path / "hf") or tmp_path / "hf")
    out = save_hf_model(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 2
    again = load_model(out)
    with torch.no_grad():
        assert (again(ids) - expected).abs().max().item() < TOL
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        assert (reloaded(ids).logits - expected).abs().max().item() < TOL
