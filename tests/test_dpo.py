"""DPO training (losses, reference log-probs, metrics, accumulation, resume, DP/TP, bad pairs) and chat SFT.

The preference pairs are real HH-RLHF pairs shipped in examples/data; a
512-token BPE trained on them keeps the logits small so a tiny model learns in
seconds on CPU.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import launch_train, read_metrics, small_run_config

from ironcore.checkpoints import native as checkpoint
from ironcore.config import ConfigError, build_config, dump_config
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.metadata import load_metadata
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.data.samples.batches import StepBatches
from ironcore.data.samples.build import build_dataset
from ironcore.models import TransformerModel
from ironcore.objectives import ObjectiveContext
from ironcore.objectives.dpo import CACHE_DIR, DPOObjective, DPOOptions, preference_losses
from ironcore.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
TINY_MODEL = {
    "name": "tiny", "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 128, "position_embedding": "rope", "norm_type": "rmsnorm", "gated_mlp": True,
    "activation": "silu", "ffn_hidden_size": 128, "num_key_value_heads": 2, "tie_word_embeddings": False,
}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory) -> Path:
    """100 real HH-RLHF harmless pairs (the shortest prompts), BPE-512, 96 positions; returns the data config path."""
    source = EXAMPLES / "hh_rlhf" / "hh_rlhf_harmless_300.jsonl"
    root = tmp_path_factory.mktemp("dpo")
    rows = [json.loads(line) for line in source.read_text().splitlines()[:400]]
    # Short prompts only: the long red-team dialogues would not leave room for a response in 96 tokens.
    rows = sorted(rows, key=lambda r: len(r["prompt"]))[:100]
    path = _write_yaml(root / "data.yaml", {
        "name": "hh-slice", "task_type": "dpo", "source": {"path": str(_jsonl(root / "pairs.jsonl", rows))},
        "tokenizer": {"train": {"vocab_size": 512}}, "max_seq_length": 96, "valid_fraction": 0.1,
        "output_dir": str(root / "out"), "num_workers": 0,
    })
    preprocess(load_data_config(path), progress=False)
    return path


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory, dpo_data) -> Path:
    """An IronCore checkpoint of a seeded tiny model: the policy's (and reference's) starting weights."""
    torch.manual_seed(7)
    model = TransformerModel(make_config(dpo_data, tmp_path_factory.mktemp("unused")).model)
    return checkpoint.save_model(model, tmp_path_factory.mktemp("start") / "ckpt")


def make_config(data_config: Path, out: Path, options: dict | None = None, **overrides):
    """A 3-step run on the pairs; ``options``: the DPO objective's (trainer.objective_options)."""
    return small_run_config(TINY_MODEL, data_config, out, 3, trainer__objective_options=options or {}, **overrides)


def train_lines(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if "loss" in m}


def assert_same_metrics(a: dict[int, dict], b: dict[int, dict], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for step in a:
        for name in ("loss", "grad_norm", *METRICS):
            assert a[step][name] == pytest.approx(b[step][name], rel=tol, abs=tol), (step, name)


# ---- the losses ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "by_hand"),
    [
        # TRL DPOTrainer.dpo_loss, with z = (pi_c - pi_r) - (ref_c - ref_r):
        ("sigmoid", 0.0, lambda z, b, e: -math.log(1 / (1 + math.exp(-b * z)))),
        ("sigmoid", 0.2, lambda z, b, e: -(1 - e) * math.log(1 / (1 + math.exp(-b * z)))
                                         - e * math.log(1 / (1 + math.exp(b * z)))),
        ("ipo", 0.0, lambda z, b, e: (z - 1 / (2 * b)) ** 2),
        ("hinge", 0.0, lambda z, b, e: max(0.0, 1 - b * z)),
    ],
)
def test_each_loss_equals_its_formula(loss_type, label_smoothing, by_hand) -> None:
    policy_chosen, policy_rejected = [-12.0, -30.5, -8.25], [-15.0, -22.0, -8.0]
    ref_chosen, ref_rejected = [-13.0, -29.0, -9.0], [-14.0, -25.5, -7.5]
    beta = 0.3
    ours = preference_losses(*(torch.tensor(v, dtype=torch.float64) for v in
                               (policy_chosen, policy_rejected, ref_chosen, ref_rejected)),
                             loss_type, beta, label_smoothing)
    for i in range(3):
        z = (policy_chosen[i] - policy_rejected[i]) - (ref_chosen[i] - ref_rejected[i])
        assert ours[i].item() == pytest.approx(by_hand(z, beta, label_smoothing), rel=1e-12)


def _logps_by_hand(model: TransformerModel, mb: dict, side: str) -> torch.Tensor:
    """Summed log-softmax of the labels over the masked (response) positions, one pair at a time."""
    out = []
    for b in range(len(mb[f"{side}_input_ids"])):
        logits = model(mb[f"{side}_input_ids"][b : b + 1], mb[f"{side}_position_ids"][b : b + 1])[0]
        token = torch.log_softmax(logits.double(), -1).gather(-1, mb[f"{side}_labels"][b].unsqueeze(-1))[:, 0]
        out.append((token * mb[f"{side}_loss_mask"][b]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_objective_scores_responses_only_against_the_reference(dpo_data, tmp_path, loss_type) -> None:
    """Policy and reference log-probs over response tokens only; ipo length-normalises all four."""
    cfg = make_config(dpo_data, tmp_path)
    torch.manual_seed(1)
    policy = TransformerModel(cfg.model)
    torch.manual_seed(2)
    reference = TransformerModel(cfg.model)
    data_cfg = load_data_config(dpo_data)
    metadata = load_metadata(data_cfg.output_dir)
    dataset = build_dataset(data_cfg.output_dir, metadata, "train", 96, seed=0)
    (mb,) = StepBatches(dataset, global_batch_size=4, micro_batch_size=4, device=torch.device("cpu")).step(0)
    assert (mb["chosen_loss_mask"].sum(-1) < (mb["chosen_labels"] != 0).sum(-1)).all()  # prompts unscored
    objective = DPOObjective(ObjectiveContext(cfg, torch.device("cpu"), nullcontext(), Path(data_cfg.output_dir),
                                              metadata, 96, policy, lambda: 0), DPOOptions(loss_type, beta=0.5))
    objective.reference = reference
    with torch.no_grad():
        terms = objective.terms(policy, mb)
        pc, pr = _logps_by_hand(policy, mb, "chosen"), _logps_by_hand(policy, mb, "rejected")
        rc, rr = _logps_by_hand(reference, mb, "chosen"), _logps_by_hand(reference, mb, "rejected")
    if loss_type == "ipo":
        lc, lr = mb["chosen_loss_mask"].sum(-1).double(), mb["rejected_loss_mask"].sum(-1).double()
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    z = (pc - pr) - (rc - rr)
    expected = {"sigmoid": -torch.log(torch.sigmoid(0.5 * z)), "ipo": (z - 1 / (2 * 0.5)) ** 2,
                "hinge": torch.clamp(1 - 0.5 * z, min=0)}[loss_type]
    torch.testing.assert_close(terms.losses.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms.chosen_rewards.double(), 0.5 * (pc - rc), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms.rejected_rewards.double(), 0.5 * (pr - rr), rtol=1e-4, atol=1e-5)


def test_dpo_options_are_checked(dpo_data, tmp_path) -> None:
    for options, message in (
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "trainer.objective_options.label_smoothing': only the sigmoid"),
        ({"beta": 0}, "trainer.objective_options.beta': must be positive"),
        ({"betta": 0.2}, "unknown config key 'trainer.objective_options.betta' (did you mean 'beta'?)"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            Trainer(make_config(dpo_data, tmp_path, options))


def test_the_deprecated_dpo_group_is_read_as_the_objective_options(caplog) -> None:
    """``dpo:`` still works, as trainer.objective_options, with one warning line; not both; and the all-defaults
    group that every run's config.yaml saved before is read silently, beside any objective's options."""
    with caplog.at_level("WARNING"):
        cfg = build_config({"dpo": {"loss_type": "ipo", "beta": 0.5}}, world_size=1)
    assert cfg.trainer.objective_options == {"loss_type": "ipo", "beta": 0.5} and cfg.dpo is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "'dpo' is deprecated" in warning and "trainer.objective_options" in warning and "\n" not in warning
    with pytest.raises(ConfigError, match="config key 'dpo': deprecated, and trainer.objective_options is given too"):
        build_config({"dpo": {"beta": 0.5}, "trainer": {"objective_options": {"beta": 0.2}}}, world_size=1)
    caplog.clear()
    saved = {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "sft_weight": 0.0, "reference": "live"}
    grpo = build_config({"dpo": saved, "trainer": {"objective_options": {"num_generations": 4}}}, world_size=1)
    assert grpo.trainer.objective_options == {"num_generations": 4} and not caplog.records


# ---- training ----------------------------------------------------------------------------------------


def test_precomputed_reference_gives_the_live_numbers(dpo_data, start_checkpoint, tmp_path, monkeypatch) -> None:
    live = make_config(dpo_data, tmp_path / "live", init__init_from=str(start_checkpoint), operation__eval_interval=3)
    pre = make_config(dpo_data, tmp_path / "pre", {"reference": "precomputed", "sft_weight": 0.5},
                      init__init_from=str(start_checkpoint), operation__eval_interval=3)
    live.trainer.objective_options["sft_weight"] = 0.5
    final_live = Trainer(live).train()
    final_pre = Trainer(pre).train()
    assert_same_metrics(train_lines(tmp_path / "live"), train_lines(tmp_path / "pre"))
    assert final_live == pytest.approx(final_pre, rel=1e-5, abs=1e-5)
    cache = Path(load_data_config(dpo_data).output_dir) / CACHE_DIR
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.npy")) == ["train", "valid"]
    # A second run reads the cache instead of running the reference again.
    import ironcore.objectives.dpo as dpo_module

    monkeypatch.setattr(dpo_module, "compute_reference_logps", lambda *a, **k: pytest.fail("recomputed"))
    Trainer(make_config(dpo_data, tmp_path / "again", {"reference": "precomputed"},
                        init__init_from=str(start_checkpoint), operation__train_steps=1))
    # Other reference weights: another key, so the cache is not reused.
    monkeypatch.undo()
    Trainer(make_config(dpo_data, tmp_path / "other", {"reference": "precomputed"}, operation__train_steps=1))
    assert len(list(cache.glob("train-*.npy"))) == 2


def test_short_run_learns_the_training_preferences(dpo_data, start_checkpoint, tmp_path) -> None:
    cfg = make_config(dpo_data, tmp_path, {"reference": "precomputed"}, init__init_from=str(start_checkpoint),
                      operation__train_steps=24, optim__max_lr=3e-3)
    trainer = Trainer(cfg)
    before = trainer.objective.evaluate(trainer.forward, trainer.train_data.eval_steps())
    trainer.train()
    after = trainer.objective.evaluate(trainer.forward, trainer.train_data.eval_steps())
    # Policy == reference at the start: every reward is 0, so no pair is "won" yet.
    assert before["val_rewards/margins"] == 0.0 and before["val_rewards/accuracies"] == 0.0
    assert after["val_rewards/accuracies"] > 0.5, after
    assert after["val_rewards/margins"] > 0.0, after
    assert after["val_loss"] < before["val_loss"]


def test_accumulation_equals_larger_micro_batch(dpo_data, start_checkpoint, tmp_path) -> None:
    init = str(start_checkpoint)
    Trainer(make_config(dpo_data, tmp_path / "a", {"sft_weight": 0.3}, init__init_from=init,
                        trainer__micro_batch_size=2, trainer__gradient_accumulation_steps=1)).train()
    Trainer(make_config(dpo_data, tmp_path / "b", {"sft_weight": 0.3}, init__init_from=init,
                        trainer__micro_batch_size=1, trainer__gradient_accumulation_steps=2)).train()
    assert_same_metrics(train_lines(tmp_path / "a"), train_lines(tmp_path / "b"))


@pytest.mark.slow
def test_fsdp_at_dp2_equals_one_process_with_accumulation(dpo_data, start_checkpoint, tmp_path) -> None:
    """DPO under ``trainer.data_parallel: fsdp``: the policy and its frozen reference both sharded."""
    init = str(start_checkpoint)
    Trainer(make_config(dpo_data, tmp_path / "one", {"sft_weight": 0.3}, init__init_from=init,
                        trainer__micro_batch_size=1, trainer__gradient_accumulation_steps=2)).train()
    raw = yaml.safe_load(dump_config(make_config(dpo_data, tmp_path / "fsdp", {"sft_weight": 0.3},
                                                 init__init_from=init, trainer__micro_batch_size=1)))
    raw["trainer"].update(train_batch_size=None, gradient_accumulation_steps=1, data_parallel="fsdp")
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(raw))
    log = launch_train(tmp_path / "fsdp.yaml", 2)
    assert "reference model: sharded like the policy (FSDP)" in log
    assert_same_metrics(train_lines(tmp_path / "one"), train_lines(tmp_path / "fsdp"))


def test_resume_keeps_the_starting_weights_as_reference(dpo_data, tmp_path) -> None:
    """4 steps straight == 2 steps, restart from the step-2 checkpoint, 2 more (init from an HF folder)."""
    from ironcore.checkpoints.hf import save_hf_model

    torch.manual_seed(11)
    hf_dir = save_hf_model(TransformerModel(make_config(dpo_data, tmp_path).model), tmp_path / "hf")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = {"init__init_from": str(hf_dir), "operation__train_steps": 4, "trainer__save_interval": 2}
    Trainer(make_config(dpo_data, straight, {"loss_type": "ipo"}, **options)).train()
    (resumed / "checkpoints").mkdir(parents=True)
    os.system(f"cp -r {straight}/checkpoints/step_0000002 {resumed}/checkpoints/")
    checkpoint.update_latest(resumed / "checkpoints", resumed / "checkpoints" / "step_0000002")
    Trainer(make_config(dpo_data, resumed, {"loss_type": "ipo"}, **options)).train()
    a, b = train_lines(straight), train_lines(resumed)
    assert sorted(b) == [3, 4]
    assert_same_metrics({s: a[s] for s in b}, b, tol=1e-6)


def test_metrics_reach_console_jsonl_and_mlflow(dpo_data, tmp_path, monkeypatch, capsys) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = make_config(dpo_data, tmp_path / "run", {"sft_weight": 0.1}, utils__tracking=True,
                      utils__experiment_name="dpo", operation__train_steps=2, operation__eval_interval=1)
    Trainer(cfg).train()
    assert "| acc " in capsys.readouterr().out
    lines = read_metrics(tmp_path / "run")
    assert {"loss", "nll_loss", "lr", "grad_norm", "tokens_per_sec", *METRICS} <= set(lines[0])
    assert {"val_loss", *(f"val_{m}" for m in METRICS)} <= set(lines[1])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dpo").experiment_id])
    params = run.data.params
    assert run.data.tags["task_type"] == "dpo" and params["trainer.objective_options.sft_weight"] == "0.1"
    assert params["trainer.objective_options.beta"] == "0.1"  # the objective's options in full, defaults too
    assert not any(name.startswith("dpo") for name in params)  # no group of the deprecated (or any other) kind
    for name in ("train/loss", "train/nll_loss", *METRICS, "val/loss", *(f"val/{m}" for m in METRICS)):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)][:1] == [1], name


def test_bad_pairs_are_counted_and_skipped(tmp_path, data_config, caplog) -> None:
    rows = [
        {"prompt": "Q: hi\nA:", "chosen": " hello", "rejected": " go away"},
        {"prompt": "Q: hi\nA:", "chosen": "  ", "rejected": " no"},
        {"prompt": "Q: hi\nA:", "chosen": " same", "rejected": " same"},
        {"prompt": "Q:" + " word" * 40 + "\nA:", "chosen": " yes", "rejected": " no"},
        # Both responses start alike; cut at 16 tokens they would be identical.
        {"prompt": "Q: count\nA:", "chosen": " one two three four five six seven eight nine ten eleven A",
         "rejected": " one two three four five six seven eight nine ten eleven B"},
    ]
    config = data_config(task_type="dpo", source={"path": str(_jsonl(tmp_path / "d.jsonl", rows))},
                         max_seq_length=16, on_bad_record="skip")
    with caplog.at_level("WARNING"):
        metadata = preprocess(config, progress=False)
    assert metadata["counts"]["empty"] == 1
    assert metadata["counts"]["identical_pair"] == 2
    assert metadata["counts"]["prompt_too_long"] == 1
    assert metadata["splits"]["train"]["documents"] == 1
    assert "chosen and rejected are identical" in caplog.text and "leaves no room for a response" in caplog.text


# ---- DP and TP under torchrun ------------------------------------------------------------------------


def _torchrun(config: Path, nproc: int, *overrides: str) -> dict[int, dict]:
    launch_train(config, nproc, *overrides)
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer.output_dir=")))
    return train_lines(out)


@pytest.mark.slow
def test_data_and_tensor_parallel_match_one_process(dpo_data, start_checkpoint, tmp_path) -> None:
    """DP=2 (precomputed reference, spread over the ranks) and TP=2 (live, sharded reference) == 1 process."""
    config = _write_yaml(tmp_path / "dpo.yaml", {
        "model": TINY_MODEL, "data": {"config_path": str(dpo_data)},
        "trainer": {"micro_batch_size": 2, "save_interval": 0, "objective_options": {"sft_weight": 0.2}},
        "operation": {"train_steps": 4, "eval_interval": 2, "eval_steps": 2, "log_interval": 1},
        "optim": {"max_lr": 3e-3, "warmup_steps": 2}, "init": {"init_from": str(start_checkpoint)},
        "utils": {"tracking": False},
    })
    single = _torchrun(config, 1, f"trainer.output_dir={tmp_path / 'one'}", "trainer.gradient_accumulation_steps=2")
    dp2 = _torchrun(config, 2, f"trainer.output_dir={tmp_path / 'dp2'}", "trainer.objective_options.reference=precomputed")
    tp2 = _torchrun(config, 2, "--tensor-model-parallel-size", "2", f"trainer.output_dir={tmp_path / 'tp2'}",
                    "trainer.gradient_accumulation_steps=2")
    assert_same_metrics(single, dp2, tol=1e-4)
    assert_same_metrics(single, tp2, tol=1e-4)
    evals = [{m["step"]: m for m in read_metrics(tmp_path / run) if "val_loss" in m} for run in ("one", "dp2")]
    assert evals[0][2]["val_loss"] == pytest.approx(evals[1][2]["val_loss"], rel=1e-5)


# ---- chat SFT end to end -----------------------------------------------------------------------------


def test_chat_sft_trains_on_assistant_turns_only(tmp_path, chat_tokenizer_dir) -> None:
    """``messages`` data with the Qwen3 chat template, multi-turn: the loss is the assistant tokens' mean."""
    tokenizer_dir = chat_tokenizer_dir
    from ironcore.data.preprocessing.tokenizer import Tokenizer

    single = [json.loads(line) for line in (EXAMPLES / "gsm8k" / "gsm8k_chat_200.jsonl").read_text().splitlines()]
    # Two-turn conversations too: a second question follows the first answer.
    double = [{"messages": a["messages"] + b["messages"][1:]} for a, b in zip(single[40:60:2], single[41:60:2])]
    records = single[:20] + double
    data = _write_yaml(tmp_path / "data.yaml", {
        "name": "chat", "task_type": "sft", "source": {"path": str(_jsonl(tmp_path / "chat.jsonl", records))},
        "fields": {"messages": "messages"}, "tokenizer": {"path": str(tokenizer_dir)}, "max_seq_length": 512,
        "append_eod": False, "output_dir": str(tmp_path / "out"), "num_workers": 0,
    })
    metadata = preprocess(load_data_config(data), progress=False)
    assert metadata["splits"]["train"]["documents"] == 30
    tokenizer = Tokenizer.from_path(tokenizer_dir)
    dataset = build_dataset(tmp_path / "out", metadata, "train", 512, seed=0)
    for index, record in ((0, records[0]), (25, records[25])):
        sample = dataset[index]
        trained = tokenizer.decode(sample["labels"][sample["loss_mask"] > 0].tolist())
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert all(reply in trained for reply in replies) and trained.count("<|im_end|>") == len(replies)
        assert not any(m["content"] in trained for m in record["messages"] if m["role"] != "assistant")

    model = {**TINY_MODEL, "vocab_size": metadata["tokenizer"]["vocab_size"], "hidden_size": 32,
             "ffn_hidden_size": 64, "max_position_embeddings": 512}
    cfg = build_config({
        "model": model, "data": {"config_path": str(data)},
        "trainer": {"micro_batch_size": 2, "output_dir": str(tmp_path / "run"), "save_interval": 0},
        "operation": {"train_steps": 6, "eval_interval": 0, "log_interval": 1},
        "optim": {"max_lr": 1e-2, "warmup_steps": 1}, "init": {"seed": 5}, "utils": {"tracking": False},
    }, world_size=1)
    Trainer(cfg).train()
    losses = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "run")}
    assert losses[6] < losses[1]
    # Step 1's loss by hand: the same initial weights and batch, CE averaged over the trained tokens only.
    torch.manual_seed(cfg.init.seed)
    start = TransformerModel(cfg.model)
    (mb,) = StepBatches(dataset, global_batch_size=2, micro_batch_size=2, seed=cfg.init.seed, shuffle=True,
                        device=torch.device("cpu")).step(0)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(start(mb["input_ids"]).transpose(1, 2), mb["labels"], reduction="none")
    assert losses[1] == pytest.approx(((ce * mb["loss_mask"]).sum() / mb["loss_mask"].sum()).item(), rel=1e-5)


def test_response_logps_in_chunks_equal_the_cross_entropy_sums(monkeypatch) -> None:
    """The pair's summed response log-probs and their gradients, with the log-probs taken five tokens at a time,
    equal the masked cross-entropy sums of the whole logits."""
    from ironcore.config.model import ModelConfig
    from ironcore.objectives.dpo import response_logps
    from ironcore.parallel import cross_entropy

    cfg = ModelConfig(**TINY_MODEL)
    monkeypatch.setattr(cross_entropy, "LOGPS_CHUNK_BYTES", 4 * cfg.vocab_size * 5)
    torch.manual_seed(0)
    model = TransformerModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 13))
    mask = (torch.arange(12) >= 5).float().expand(2, 12)
    mb = {f"{side}_{key}": value for side, rows in (("chosen", ids[:2]), ("rejected", ids[2:])) for key, value in
          (("input_ids", rows[:, :-1]), ("labels", rows[:, 1:]), ("loss_mask", mask),
           ("position_ids", torch.arange(12).expand(2, 12)))}  # fmt: skip
    chosen, rejected = response_logps(model, mb, nullcontext())
    (chosen - 2 * rejected).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ce = torch.nn.functional.cross_entropy(model(ids[:, :-1]).transpose(1, 2), ids[:, 1:], reduction="none")
    want = -(ce * torch.cat([mask, mask])).sum(-1)
    (want[:2] - 2 * want[2:]).sum().backward()
    torch.testing.assert_close(torch.cat([chosen, rejected]), want, atol=1e-4, rtol=1e-5)
    for got, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4)
