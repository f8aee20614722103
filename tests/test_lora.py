"""LoRA equals PEFT's on HF models: logits, every adapter gradient, AdamW steps; PEFT folders both ways; merging.

Each case builds a small random HF model (weights redrawn wide, as in test_hf_parity) and PEFT adapters with
non-zero B, saves both as folders, and loads the PEFT folder into IronCore (``load_model``), so the same
adapter weights sit on the same base on both sides.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ironcore.checkpoints.load import load_model  # noqa: E402
from ironcore.checkpoints.peft import _tensor_names, write_peft_adapter  # noqa: E402
from ironcore.config.model import LoRAConfig, ModelConfig  # noqa: E402
from ironcore.models.lora import adapters_disabled, merge_adapters, trainable_names  # noqa: E402
from ironcore.models.transformer import TransformerModel  # noqa: E402
from ironcore.parallel.sharding import full_state_dict  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)
CASES = {
    "llama": (dict(model_type="llama", **BASE, num_key_value_heads=2, tie_word_embeddings=False),
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": (dict(model_type="gpt2", vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), ["c_attn", "c_proj", "c_fc"]),
}
RANK, ALPHA = 4, 8.0


def _hf_base(spec: dict, folder) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**spec)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _peft_model(case: str, tmp_path, rslora: bool = False, spec: dict | None = None):
    """(HF + PEFT model with random non-zero adapters, the PEFT folder); the base is saved in tmp_path/base."""
    spec, targets = spec or CASES[case][0], CASES[case][1]
    base = _hf_base(spec, tmp_path / "base")
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                             use_rslora=rslora, fan_in_fan_out=case == "gpt2")
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Largest difference relative to the largest magnitude (the issue's "relative" for whole tensors)."""
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


def _tokens(vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _peft_grads(model, ours: TransformerModel) -> dict[str, torch.Tensor]:
    """PEFT's adapter gradients in our full-form tensor layout (through the same name map as export)."""
    grads = {n.replace(".default.", "."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    pieces: dict[str, list] = {}
    for key, (name, rows) in _tensor_names(ours).items():
        pieces.setdefault(name, []).append((rows.start, grads[key]))
    return {name: torch.cat([g for _, g in sorted(parts, key=lambda p: p[0])]) for name, parts in pieces.items()}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_every_adapter_gradient_equal_peft(case: str, rslora: bool, tmp_path) -> None:
    theirs, folder = _peft_model(case, tmp_path, rslora)
    ours = load_model(folder).train()
    assert ours.config.lora.use_rslora == rslora and ours.config.lora.rank == RANK
    tokens = _tokens()
    weights = torch.randn(2, 12, 97, generator=torch.Generator().manual_seed(2))
    expected = theirs(tokens).logits
    got = ours(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    their_grads = _peft_grads(theirs, ours)
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(their_grads) and len(our_grads) == 4 * 2 * 2  # 4 layers x 2 blocks x (A, B)
    for name, grad in our_grads.items():
        _close(grad, their_grads[name], 1e-5, name)
    # The base is frozen: no gradient reaches it.
    assert all(p.grad is None for n, p in ours.named_parameters() if ".lora." not in n)
    # Switched off, the adapters leave the base's logits.
    with adapters_disabled(ours), theirs.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-5, atol=1e-5)


def test_adamw_steps_track_a_peft_and_hf_loop(tmp_path) -> None:
    theirs, folder = _peft_model("llama", tmp_path)
    ours = load_model(folder).train()
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    their_params = [p for n, p in theirs.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in their_params)
    base_before = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_ours, opt_theirs = torch.optim.AdamW(ours_params, **settings), torch.optim.AdamW(their_params, **settings)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        tokens = torch.randint(0, 97, (2, 13), generator=generator)
        for opt, logits in ((opt_ours, lambda t: ours(t)), (opt_theirs, lambda t: theirs(t).logits)):
            loss = F.cross_entropy(logits(tokens[:, :-1]).reshape(-1, 97), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    ours_full = {n: p.detach() for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for param in theirs.parameters():
            param.grad = param.detach().clone() if param.requires_grad else None
    theirs_full = _peft_grads(theirs, ours)  # their adapter values, in our layout
    for name, tensor in ours_full.items():
        _close(tensor, theirs_full[name], 1e-4, name)
    # The base is bit-identical after training.
    assert all(torch.equal(p, base_before[n]) for n, p in ours.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_adapters_load_in_peft_and_merge_like_merge_and_unload(case: str, tmp_path) -> None:
    theirs, folder = _peft_model(case, tmp_path)
    ours = load_model(folder)
    trained = {n: t for n, t in full_state_dict(ours).items() if n in set(trainable_names(ours))}
    out = write_peft_adapter(ours, trained, tmp_path / "exported", base=str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
        merged_theirs = theirs.merge_and_unload()(tokens).logits
        merge_adapters(ours)
        assert not any(".lora." in n for n in ours.state_dict())
        torch.testing.assert_close(ours(tokens), merged_theirs, rtol=1e-5, atol=1e-5)


def test_targets_modules_to_save_and_errors() -> None:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=4, gated_mlp=True,
                      ffn_hidden_size=48, lora=LoRAConfig(targets=["q", "v", "down"], modules_to_save=["norm"]))
    model = TransformerModel(cfg)
    names = trainable_names(model)
    assert any("attn.qkv.lora" in n for n in names) and any("mlp.down.lora" in n for n in names)
    assert not any("attn.out.lora" in n or "mlp.up.lora" in n for n in names)
    assert any(n.endswith("norm.weight") for n in names) and "embed.weight" not in names
    with pytest.raises(Exception, match="lora.targets"):
        ModelConfig(gated_mlp=False, lora=LoRAConfig(targets=["gate"])).validate()
    with pytest.raises(Exception, match="lora.targets.*unknown projection 'qq'"):
        ModelConfig(lora=LoRAConfig(targets=["qq"])).validate()


def test_a_peft_folder_is_a_starting_point_for_training(tmp_path) -> None:
    """init.init_from: a PEFT folder (with model: {from: its HF base, lora: ...}): the run starts from the
    folder's adapters on its base, and trains on."""
    from run_helpers import read_metrics, shakespeare_slice

    from ironcore.checkpoints.hf_families import model_config_from_folder
    from ironcore.config import build_config
    from ironcore.training.trainer import Trainer

    spec, targets = CASES["llama"]
    _, folder = _peft_model("llama", tmp_path, spec={**spec, "vocab_size": 512})
    (tmp_path / "data").mkdir()
    data = shakespeare_slice(tmp_path / "data", 20_000)
    raw = {"model": {"from": str(tmp_path / "base"), "lora": {"rank": RANK, "alpha": ALPHA, "targets": targets}},
           "data": {"config_path": str(data)}, "init": {"init_from": str(folder), "seed": 1},
           "trainer": {"micro_batch_size": 2, "output_dir": str(tmp_path / "run"), "save_interval": 0},
           "operation": {"train_steps": 2, "eval_interval": 0, "log_interval": 1}, "utils": {"tracking": False}}
    trainer = Trainer(build_config(raw, world_size=1, read_folder=model_config_from_folder))
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(tokens), load_model(folder)(tokens), rtol=1e-6, atol=1e-6)
    trainer.model.train()
    trainer.train()
    assert len([m for m in read_metrics(tmp_path / "run") if "loss" in m]) == 2
