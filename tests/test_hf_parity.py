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
    # Layer 0 local (window 5), layer 1 global; both soft-caps bind; a query scale other than head_dim's.
    "gemma2_softcap_local_global": dict(model_type="gemma2", **BASE, num_key_value_heads=2, head_dim=16,
                                        sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=3.0),
    # q/k norms with Gemma's (1 + w); the local layer rotates with its own base, the global one with linear scaling.
    "gemma3_qk_norm_local_rope": dict(model_type="gemma3_text", **BASE, num_key_value_heads=2, head_dim=16,
                                      sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                                      query_pre_attn_scalar=16,
                                      rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 500.0,
                                                                          "factor": 4.0},
                                                       "sliding_attention": {"rope_type": "default",
                                                                             "rope_theta": 50.0}}),
    # Fused qkv_proj/gate_up_proj; LongRoPE past its original context (2): long factors and attention scaling.
    "phi3_fused_longrope": dict(model_type="phi3", **BASE, num_key_value_heads=2, pad_token_id=0,
                                original_max_position_embeddings=2,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 100.0,
                                                 "partial_rotary_factor": 0.5, "short_factor": [1.0, 1.5],
                                                 "long_factor": [2.0, 7.0]}),
    # Phi-4-mini's 3/4 rotation, LongRoPE inside its original context: the short factors.
    "phi4_mini_short_rope": dict(model_type="phi3", **BASE, num_key_value_heads=2, pad_token_id=0,
                                 original_max_position_embeddings=64,
                                 rope_parameters={"rope_type": "longrope", "rope_theta": 100.0,
                                                  "partial_rotary_factor": 0.75, "short_factor": [1.0, 3.0, 5.0],
                                                  "long_factor": [2.0, 7.0, 9.0]}),
    "olmo2_output_norms": dict(model_type="olmo2", **BASE, num_key_value_heads=2, pad_token_id=0),
    # Layer 1 of 2 without RoPE.
    "smollm3_nope": dict(model_type="smollm3", **BASE, num_key_value_heads=2, pad_token_id=0,
                         no_rope_layer_interval=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "mixtral_top2": dict(model_type="mixtral", **BASE, num_key_value_heads=2, num_local_experts=4,
                         num_experts_per_tok=2),
    "qwen3_moe_top2": dict(model_type="qwen3_moe", **BASE, num_key_value_heads=2, head_dim=16, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True),
    "olmoe_top2_no_renorm": dict(model_type="olmoe", **BASE, num_key_value_heads=2, num_experts=4,
                                 num_experts_per_tok=2, pad_token_id=0),
}
UNIT_OFFSET = ("gemma", "gemma2", "gemma3_text")
# A case's feature, switched off: HF's own logits must change, so the parity above cannot pass without it.
FEATURE_OFF = {
    "gemma2_softcap_local_global": [dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
                                    dict(layer_types=["full_attention"] * 2), dict(query_pre_attn_scalar=16)],
    "gemma3_qk_norm_local_rope": [
        dict(rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}),
        dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
    ],
    "phi3_fused_longrope": [dict(original_max_position_embeddings=64)],
    "phi4_mini_short_rope": [dict(rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                                   "partial_rotary_factor": 0.75})],
    "smollm3_nope": [dict(no_rope_layer_interval=4)],
    "mixtral_top2": [dict(num_experts_per_tok=1)],
    "qwen3_moe_top2": [dict(norm_topk_prob=False)],
    "olmoe_top2_no_renorm": [dict(norm_topk_prob=True)],
}


def _hf_model(spec: dict) -> torch.nn.Module:
    spec = dict(spec)
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    _redraw(model, unit_offset=config.model_type in UNIT_OFFSET)
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
    # Nothing left on the meta device it was built on, non-persistent buffers included: `.to()` must work.
    assert not [name for name, t in [*ours.named_parameters(), *ours.named_buffers()] if t.is_meta]
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


@pytest.mark.parametrize(("case", "off"), [(c, o) for c, offs in FEATURE_OFF.items() for o in offs],
                         ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_feature_changes_the_logits(case: str, off: dict) -> None:
    """Each new family's parity case exercises its feature: without it HF's logits differ."""
    ids = _inputs(97)
    with torch.no_grad():
        on, without = _hf_model(CASES[case])(ids).logits, _hf_model({**CASES[case], **off})(ids).logits
    assert (on - without).abs().max() > 1e-2


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
