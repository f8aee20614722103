"""LoRA in the trainer: adapters-only checkpoints that resume exactly on a bit-identical base, optimizer state
for the adapters only, the base's record checked, and DPO's reference as the base with adapters off."""

from __future__ import annotations

import json
import os

import pytest
import torch
from run_helpers import TINY_MODEL, read_metrics, shakespeare_slice, small_run_config

from ironcore.checkpoints import native
from ironcore.checkpoints.load import load_model, load_weights
from ironcore.errors import CheckpointError
from ironcore.models import TransformerModel
from ironcore.models.lora import trainable_names
from ironcore.training.trainer import Trainer

MODEL = {**TINY_MODEL, "max_position_embeddings": 128}  # room for the DPO pairs' 96 positions
LORA = {"rank": 4, "alpha": 8.0, "targets": ["q", "k", "v", "o", "gate", "up", "down"]}


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    return shakespeare_slice(tmp_path_factory.mktemp("lora-data"), 40_000)


@pytest.fixture(scope="module")
def base(tmp_path_factory, pretrain_data):
    torch.manual_seed(11)
    return native.save_model(TransformerModel(small_run_config(MODEL, pretrain_data, tmp_path_factory.mktemp(
        "unused"), 1).model), tmp_path_factory.mktemp("base") / "ckpt")


def _config(data, out, base, **overrides):
    return small_run_config({**MODEL, "lora": LORA}, data, out, 8, init__init_from=str(base),
                            trainer__save_interval=4, **overrides)


def _losses(out) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def test_adapters_only_checkpoints_resume_exactly_on_a_frozen_base(pretrain_data, base, tmp_path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer = Trainer(_config(pretrain_data, straight, base))
    trainer.train()
    losses = _losses(straight)
    assert losses[8] < losses[1]  # the adapters learn
    step4 = straight / "checkpoints" / "step_0000004"
    saved = native.read_safetensors(step4 / native.WEIGHTS)
    assert set(saved) == set(trainable_names(trainer.model)) and all(".lora." in n for n in saved)
    record = json.loads((step4 / native.ADAPTER_BASE).read_text())
    assert record["base"] == str(base) and record["fingerprint"]
    # Optimizer state for the adapters only: AdamW's two moments per adapter element, nothing for the base.
    adapter_numel = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    state = trainer.optimizer.full_state_dict()["state"]
    assert set(state) == set(saved)
    moments = sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if v.dim() > 0)
    assert moments == 2 * 4 * adapter_numel
    # The base is bit-identical after training.
    start = load_weights(base)
    assert all(torch.equal(p.detach(), start[n]) for n, p in trainer.model.named_parameters() if not p.requires_grad)
    # A crash after step 4: the resumed run loads the base, then the adapters, and continues exactly.
    (resumed / "checkpoints").mkdir(parents=True)
    os.system(f"cp -r {step4} {resumed}/checkpoints/")
    native.update_latest(resumed / "checkpoints", resumed / "checkpoints" / "step_0000004")
    Trainer(_config(pretrain_data, resumed, base)).train()
    again = _losses(resumed)
    assert sorted(again) == [5, 6, 7, 8] and all(abs(again[s] - losses[s]) <= 1e-6 for s in again)
    # Loading the run gives base + adapters; the final adapters are those of the straight run.
    model = load_model(straight)
    with torch.no_grad():
        tokens = torch.randint(0, 512, (1, 16))
        torch.testing.assert_close(model(tokens), trainer.model.eval()(tokens))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_run_from_a_file_draws_only_what_the_file_lacks(pretrain_data, base, tmp_path, monkeypatch, lora) -> None:
    """``init.init_from``: the model is built on the meta device and assigned the file's tensors, with no
    random copy of every weight drawn first (an 8B base: 32 GB of host memory and a minute); only what the
    file lacks is drawn: the adapters, with PEFT's init."""
    drawn_on = []
    reset = TransformerModel.reset_parameters
    monkeypatch.setattr(TransformerModel, "reset_parameters",
                        lambda self: drawn_on.append(self.embed.weight.device.type) or reset(self))  # fmt: skip
    cfg = small_run_config({**MODEL, "lora": LORA} if lora else MODEL, pretrain_data, tmp_path / "run", 1,
                           init__init_from=str(base))  # fmt: skip
    model = Trainer(cfg).model
    assert drawn_on and set(drawn_on) == {"meta"}  # the planner builds meta models too
    loaded, params = load_weights(base), dict(model.named_parameters())
    assert all(torch.equal(params[name], tensor) for name, tensor in loaded.items())
    fresh = {name: param for name, param in params.items() if name not in loaded}
    assert set(fresh) == (set(trainable_names(model)) if lora else set())
    for name, param in fresh.items():
        assert param.requires_grad and (param.abs().sum() > 0) == name.endswith("A.weight")  # B starts at zero


def test_a_run_from_a_bf16_checkpoint_holds_the_weights_in_the_models_dtype(pretrain_data, base, tmp_path) -> None:
    """The file's tensors are assigned, but in the model's dtype: a bf16 checkpoint starts an fp32 run (a LoRA
    base left in bf16 would meet fp32 activations and adapters), as it did when it was copied into a drawn model."""
    bf16 = native.save_model(load_model(base).to(torch.bfloat16), tmp_path / "bf16")
    trainer = Trainer(_config(pretrain_data, tmp_path / "run", bf16, operation__train_steps=1))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    trainer.train()


def test_a_checkpoint_on_another_base_is_one_line(pretrain_data, base, tmp_path) -> None:
    Trainer(_config(pretrain_data, tmp_path / "run", base, operation__train_steps=4)).train()
    other = native.save_model(TransformerModel(load_model(base).config), tmp_path / "other")
    record = tmp_path / "run" / "checkpoints" / "step_0000004" / native.ADAPTER_BASE
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "base": str(other), "base_path": str(other)}))
    with pytest.raises(CheckpointError, match="the adapters were trained on .* is other weights"):
        load_model(tmp_path / "run")


def test_dpo_reference_is_the_base_with_adapters_off_and_no_second_copy(base, tmp_path) -> None:
    import test_dpo  # the DPO tests' data: 100 HH-RLHF pairs

    data = test_dpo.dpo_data.__wrapped__(_Factory(tmp_path))
    cfg = small_run_config({**MODEL, "lora": LORA}, data, tmp_path / "dpo", 2, init__init_from=str(base),
                           trainer__objective="dpo")
    trainer = Trainer(cfg)
    reference = trainer.objective.reference
    policy_storage = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    assert {p.untyped_storage().data_ptr() for p in reference.parameters()} <= policy_storage  # no second copy
    with torch.no_grad():  # adapters with non-zero B: the policy differs from the base, the reference does not
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1)
    frozen = load_model(base)
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reference(tokens), frozen(tokens), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(trainer.model(tokens), frozen(tokens), atol=1e-3)
    assert trainer.model.training  # switching the adapters off for the reference left the policy as it was
    trainer.train()
    assert _losses(tmp_path / "dpo")


class _Factory:
    """The one call of ``tmp_path_factory`` the DPO data fixture makes."""

    def __init__(self, root) -> None:
        self.root = root

    def mktemp(self, name: str):
        path = self.root / name
        path.mkdir(parents=True)
        return path


def test_convert_exports_adapters_for_peft_and_a_merged_hf_model(pretrain_data, base, tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from ironcore.cli import main

    trainer = Trainer(_config(pretrain_data, tmp_path / "run", base, operation__train_steps=4))
    trainer.train()
    run = str(tmp_path / "run")
    assert main(["convert", "--to-hf", "--checkpoint", run, "--output", str(tmp_path / "plain")]) != 0
    assert "a LoRA checkpoint: export its adapters as a PEFT folder" in capsys.readouterr().err
    assert main(["convert", "--to-hf", "--checkpoint", str(base), "--output", str(tmp_path / "hf_base")]) == 0
    assert main(["convert", "--to-hf", "--checkpoint", run, "--adapter-only", "--output", str(tmp_path / "peft")]) == 0
    assert main(["convert", "--to-hf", "--checkpoint", run, "--merge", "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size < 200_000  # adapters only
    tokens = torch.randint(0, 512, (2, 16))
    ours = load_model(tmp_path / "run")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base").eval()
    with torch.no_grad():
        expected = ours(tokens)
        adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
        torch.testing.assert_close(adapted(tokens).logits, expected, rtol=1e-5, atol=1e-5)
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    # The PEFT folder (with the HF base it names) loads back into IronCore with the same logits.
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": str(tmp_path / "hf_base")}))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "peft")(tokens), expected, rtol=1e-5, atol=1e-5)


def test_grpo_and_reward_model_train_adapters_on_a_frozen_base(tmp_path) -> None:
    """GRPO samples from the adapted policy and takes its KL (beta > 0) against the base with adapters off; a
    reward model trains its adapters and its score head. Both leave the base bit-identical."""
    import test_dpo
    import test_grpo

    from ironcore.models.lora import AdaptersOff

    rl = test_grpo.rl_data.__wrapped__(_Factory(tmp_path))
    options = test_grpo.grpo_config(rl, tmp_path / "unused", 2, options={"beta": 0.05}).trainer.objective_options
    cfg = small_run_config({**TINY_MODEL, "lora": LORA}, rl, tmp_path / "grpo", 2, trainer__micro_batch_size=2,
                           trainer__gradient_accumulation_steps=2, trainer__objective_options=options,
                           optim__max_lr=1e-2)
    trainer = Trainer(cfg)
    assert isinstance(trainer.objective.reference, AdaptersOff)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    lines = [m for m in read_metrics(tmp_path / "grpo") if "loss" in m]
    assert len(lines) == 2 and all("kl" in m for m in lines)
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if not p.requires_grad)

    pairs = test_dpo.dpo_data.__wrapped__(_Factory(tmp_path / "rm"))
    rm = small_run_config({**MODEL, "score_head": True, "lora": LORA}, pairs, tmp_path / "rm_run", 2,
                          trainer__objective="reward_model")
    trainer = Trainer(rm)
    assert "score.weight" in trainable_names(trainer.model)
    trainer.train()
    assert [m for m in read_metrics(tmp_path / "rm_run") if "loss" in m]
