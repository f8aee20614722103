"""The hierarchical config: model references, overrides with type coercion, validation, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ironcore.checkpoints.hf import save_hf_model
from ironcore.checkpoints.hf_families import model_config_from_folder
from ironcore.config import ConfigError, build_config, dump_config, load_config, load_model_config
from ironcore.models import TransformerModel

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "example.yaml"


def write(tmp_path: Path, text: str, name: str = "train.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_config_resolves_model_by_name() -> None:
    cfg = load_config(EXAMPLE, world_size=1)
    assert cfg.model.name == "gpt2-tiny"
    assert cfg.model == load_model_config(ROOT / "configs" / "model" / "gpt2-tiny.yaml")
    assert cfg.trainer.train_batch_size == cfg.trainer.micro_batch_size * cfg.trainer.gradient_accumulation_steps


def test_overrides_are_coerced_to_the_field_types() -> None:
    cfg = load_config(
        EXAMPLE,
        ["optim.max_lr=3e-4", "trainer.micro_batch_size=2", "trainer.compile=true", "model.num_layers=1",
         "init.init_from=null", "operation.train_steps=20"],
        world_size=1,
    )
    assert cfg.optim.max_lr == pytest.approx(3e-4) and isinstance(cfg.optim.max_lr, float)
    assert cfg.trainer.micro_batch_size == 2
    assert cfg.trainer.compile is True
    assert cfg.model.num_layers == 1 and cfg.model.name == "gpt2-tiny"
    assert cfg.init.init_from is None
    assert cfg.operation.train_steps == 20


def test_model_can_be_swapped_by_override_and_inline_mapping(tmp_path: Path) -> None:
    assert load_config(EXAMPLE, ["model=llama-tiny"], world_size=1).model.name == "llama-tiny"
    inline = write(tmp_path, "model:\n  name: mine\n  vocab_size: 64\n  hidden_size: 16\n  num_layers: 1\n"
                   "  num_attention_heads: 2\n")
    assert load_config(inline, world_size=1).model.hidden_size == 16
    by_path = write(tmp_path, f"model: {ROOT / 'configs/model/qwen3-tiny.yaml'}\n", "by_path.yaml")
    assert load_config(by_path, world_size=1).model.qk_norm is True


def test_model_from_hf_folder(tmp_path: Path) -> None:
    tiny = load_model_config("llama-tiny")
    save_hf_model(TransformerModel(tiny), tmp_path / "hf")
    train = write(tmp_path, f"model: {tmp_path / 'hf'}\n")
    cfg = load_config(train, world_size=1, read_folder=model_config_from_folder)
    assert cfg.model.hidden_size == tiny.hidden_size
    assert cfg.model.kv_heads == tiny.kv_heads
    assert cfg.model.gated_mlp and cfg.model.norm_type == "rmsnorm"
    with pytest.raises(ConfigError, match=r"^\S*train\.yaml: model: \S+ is a folder; an HF checkpoint folder is not accepted"):
        load_config(train, world_size=1)  # the config package reads no HF folder by itself (layers)
    with pytest.raises(ConfigError, match="neither an HF checkpoint"):
        load_config(write(tmp_path, f"model: {tmp_path}\n"), world_size=1, read_folder=model_config_from_folder)


def test_init_from_alone_gives_the_model(tmp_path: Path) -> None:
    """No ``model:``: the model of init.init_from (an HF folder, an IronCore run, its latest pointer), named as
    the HF folder's model is named (its folder, here; a hub cache's snapshot: the repository's name)."""
    tiny = load_model_config("llama-tiny")
    hf = tmp_path / "models--Org--Tiny-Instruct" / "snapshots" / "0123abc"
    save_hf_model(TransformerModel(tiny), hf)
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000004"
    step.mkdir(parents=True)
    saved = {**yaml.safe_load(dump_config(load_config(EXAMPLE, world_size=1)))["model"], "name": "mine", "num_layers": 1}
    (step / "model_config.yaml").write_text(yaml.safe_dump(saved))
    (step / "model.safetensors").write_bytes(b"")  # the model's config is all a config reads
    (run / "checkpoints" / "latest").write_text("step_0000004")
    for source, name, layers in ((hf, "Tiny-Instruct", tiny.num_layers), (run, "mine", 1),
                                 (run / "checkpoints" / "latest", "mine", 1)):
        train = write(tmp_path, f"init:\n  init_from: {source}\noperation:\n  train_steps: 1\n")
        cfg = load_config(train, world_size=1, read_folder=model_config_from_folder)
        assert (cfg.model.name, cfg.model.num_layers) == (name, layers), source
    given = load_config(train, ["model=llama-tiny"], world_size=1, read_folder=model_config_from_folder)
    assert given.model.name == "llama-tiny"  # a model: of its own wins
    with pytest.raises(ConfigError, match="neither an HF checkpoint"):
        load_config(train, [f"init.init_from={tmp_path}"], world_size=1, read_folder=model_config_from_folder)


def test_tensor_parallel_flag_sets_the_trainer_key() -> None:
    cfg = load_config(EXAMPLE, tensor_model_parallel_size=2, world_size=2)
    assert cfg.trainer.tensor_model_parallel_size == 2
    assert cfg.trainer.train_batch_size == cfg.trainer.micro_batch_size * cfg.trainer.gradient_accumulation_steps


def test_batch_sizes_are_derived_per_data_parallel_size() -> None:
    cfg = load_config(EXAMPLE, ["trainer.gradient_accumulation_steps=null", "trainer.train_batch_size=32",
                                "trainer.micro_batch_size=4"], world_size=2)
    assert cfg.trainer.gradient_accumulation_steps == 4  # 32 = 4 x 4 x DP 2


def test_dump_and_load_back_is_identical(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE, ["model=llama3.1-8b", "optim.max_lr=1e-5"], world_size=1)
    dumped = write(tmp_path, dump_config(cfg), "resolved.yaml")
    again = load_config(dumped, world_size=1)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        (["trainer.micro_batch_sise=2"], 1, "unknown config key 'trainer.micro_batch_sise' (did you mean 'micro_batch_size'?)"),
        (["optimm.max_lr=1"], 1, "unknown config key 'optimm' (did you mean 'optim'?)"),
        (["trainer.micro_batch_size=abc"], 1, "config key 'trainer.micro_batch_size': expected an integer, got 'abc'"),
        (["optim.max_lr=fast"], 1, "config key 'optim.max_lr': expected a number, got 'fast'"),
        (["optim.optimizer=sgdd"], 1, "'sgdd' is neither a built-in optimizer (adamw, adam, sgd, muon) nor module:Class (did you mean 'sgd'?)"),
        (["trainer.train_batch_size=10"], 1,
         "trainer.train_batch_size 10 != micro_batch_size 8 x gradient_accumulation_steps 1 x data-parallel size 1"),
        (["trainer.tensor_model_parallel_size=3"], 3,
         "model.num_attention_heads 4 is not divisible by trainer.tensor_model_parallel_size 3"),
        (["trainer.tensor_model_parallel_size=2"], 3, "world size 3 is not a multiple of trainer.tensor_model_parallel_size 2"),
        (["trainer.tensor_model_parallel_size=4"], 2, "trainer.tensor_model_parallel_size 4 is larger than the world size 2"),
        (["model.hidden_size=130"], 1,
             "config key 'model.num_attention_heads': hidden_size 130 is not divisible by 4 heads"),
        (["model=llama-tinyy"], 1, "'llama-tinyy' is neither a file, an HF checkpoint folder nor a known model name (did you mean 'llama-tiny'?)"),
        (["optim.max_lr"], 1, "expected KEY=VALUE"),
        (["trainer.overlap_grad_reduce=true"], 1,
         "config key 'trainer.overlap_grad_reduce': needs trainer.data_parallel: zero1"),
        (["trainer.overlap_grad_reduce=true", "trainer.distributed_optimizer=true",
          "trainer.tensor_model_parallel_size=2"], 2, "is not supported with tensor parallelism yet"),
        (["trainer.offload=params"], 2, "config key 'trainer.offload': needs trainer.data_parallel: fsdp (it is ddp)"),
        (["trainer.distributed_optimizer=true", "trainer.data_parallel=fsdp"], 2,
         "config key 'trainer.distributed_optimizer': true means data_parallel: zero1, but data_parallel is fsdp"),
        (["trainer.data_parallel=zero1", "trainer.checkpoint_format=sharded"], 2,
         "config key 'trainer.checkpoint_format': sharded checkpoints are written by data_parallel fsdp"),
        (["trainer.data_parallel=fsdp", "model.lora={rank: 4, quantize_base: nf4, targets: [q, v]}"], 2,
         "config key 'trainer.data_parallel': fsdp does not shard QLoRA's NF4 base"),
    ],
)
def test_bad_config_gives_one_line_error_naming_the_key(overrides, world_size, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, overrides, world_size=world_size)
    text = str(info.value)
    assert message in text
    assert str(EXAMPLE) in text and "\n" not in text


def test_inconsistent_model_yaml_names_file_and_field(tmp_path: Path) -> None:
    bad = write(tmp_path, "name: bad\nhidden_size: 64\nnum_attention_heads: 4\nnum_key_value_heads: 3\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: config key 'model\.num_key_value_heads': 4 query heads are not divisible"):
        load_model_config(bad)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "trainer:\n  micro_batch_size: 2\n bad indent: [\n")
    with pytest.raises(ConfigError, match=r"train\.yaml:3: invalid YAML"):
        load_config(bad)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"does/not/exist.yaml: no such file"):
        load_config("does/not/exist.yaml")


def test_build_config_without_a_file() -> None:
    cfg = build_config({"model": "phi-tiny", "operation": {"train_steps": 3}}, world_size=1)
    assert cfg.model.parallel_attn_mlp and cfg.operation.train_steps == 3
    assert yaml.safe_load(dump_config(cfg))["model"]["name"] == "phi-tiny"


def _duplicate_optim(tmp_path: Path) -> Path:
    return write(tmp_path, "model: llama-tiny\noptim:\n  max_lr: 1.0e-3\n  warmup_steps: 5\noperation:\n"
                 "  train_steps: 3\noptim:\n  weight_decay: 0.0\n", "dup.yaml")


def test_a_key_given_twice_is_refused_in_every_yaml_naming_the_key_and_both_lines(tmp_path: Path) -> None:
    """Two `optim:` groups used to keep the last one only, dropping the first one's settings silently."""
    from ironcore.data.preprocessing.config import load_data_config
    from ironcore.evaluation.task_config import load_task

    with pytest.raises(ConfigError) as info:
        load_config(_duplicate_optim(tmp_path), world_size=1)
    assert str(info.value) == f"{tmp_path / 'dup.yaml'}: key 'optim' given twice (lines 2 and 7)"
    model = write(tmp_path, "name: m\nvocab_size: 64\nhidden_size: 16\nnum_layers: 1\nnum_attention_heads: 2\n"
                  "hidden_size: 32\n", "model.yaml")
    data = write(tmp_path, "name: d\nsource:\n  path: a.txt\n  path: b.txt\n", "data.yaml")
    task = write(tmp_path, "path: items.jsonl\nprompt: 'Q: {q}'\nchecker: exact\nprompt: '{q}'\n", "task.yaml")
    for load, path, key, lines in ((load_model_config, model, "hidden_size", (3, 6)),
                                   (load_data_config, data, "path", (3, 4)),
                                   (load_task, str(task), "prompt", (2, 4))):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            load(path)
        assert str(info.value) == f"{path}: key '{key}' given twice (lines {lines[0]} and {lines[1]})"
    # ... nested and in flow style too; an override's value is YAML as well; `<<` merges may still override.
    with pytest.raises(ConfigError, match=r"key 'max_lr' given twice \(line 1\)"):
        load_config(EXAMPLE, ["optim={max_lr: 1, max_lr: 2}"], world_size=1)
    from ironcore.files import read_yaml

    assert read_yaml(write(tmp_path, "a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n", "m.yaml"))["b"] == {"x": 3, "y": 2}


def test_a_key_given_twice_is_one_cli_line_with_exit_2(tmp_path: Path, capsys) -> None:
    from ironcore.cli import main

    assert main(["train", "--config", str(_duplicate_optim(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err == f"ironcore train: error: {tmp_path / 'dup.yaml'}: key 'optim' given twice (lines 2 and 7)\n"
