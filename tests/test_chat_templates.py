"""Chat templates and generation configs, read and written the way ``transformers`` does.

Templates render with jinja2 alone and must give exactly ``transformers``' text
(real ChatML, Llama-3, Llama-3.2, Qwen3 and Gemma templates from tests/data);
folders saved by the installed ``transformers`` (``chat_template.jinja``,
named templates, ``generation_config.json``) go through preprocess, train,
generate and convert with the template surviving byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
import yaml
from run_helpers import read_metrics

from ironcore.cli import main
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "examples" / "data" / "gpt2" / "tokenizer.json"
TEMPLATES = ROOT / "tests" / "data" / "chat_templates"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<start_of_turn>", "<end_of_turn>", "<bos>"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse. "}, {"role": "user", "content": " Hi\n"},
     {"role": "assistant", "content": "Hello! 👋"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "think b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
]


def hf_tokenizer(template: str | dict[str, str]):
    """A transformers fast tokenizer: GPT-2's BPE, the templates' special tokens, Llama-style bos/eos."""
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer.from_file(str(GPT2))
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<|eot_id|>",
                                   pad_token="<|endoftext|>", chat_template=template)


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory) -> dict[str, Path]:
    """Each template in a tokenizer folder written by transformers' save_pretrained."""
    folders = {}
    for path in sorted(TEMPLATES.glob("*.jinja")):
        folder = tmp_path_factory.mktemp(path.stem.replace(".", "_"))
        hf_tokenizer(path.read_text(encoding="utf-8")).save_pretrained(folder)
        folders[path.stem] = folder
    return folders


def test_transformers_saves_templates_beside_the_config_and_we_read_them(saved_folders) -> None:
    for name, folder in saved_folders.items():
        assert (folder / "chat_template.jinja").is_file()
        assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
        assert Tokenizer.from_path(folder).chat_template == (TEMPLATES / f"{name}.jinja").read_text(), name


@pytest.mark.parametrize("name", ["chatml", "llama3", "llama3.2", "qwen3", "gemma"])
def test_rendering_is_byte_identical_to_transformers(saved_folders, name) -> None:
    from transformers import AutoTokenizer

    ours, theirs = Tokenizer.from_path(saved_folders[name]), AutoTokenizer.from_pretrained(saved_folders[name])
    variables = [{}, {"enable_thinking": False}] if name == "qwen3" else [{}]
    checked = 0
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            for extra in variables:
                try:
                    expected = theirs.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=generation_prompt, **extra)
                except Exception as err:  # the template refuses this conversation (Gemma: no system turn)
                    with pytest.raises(ConfigError, match="chat template: ") as refused:
                        ours.apply_chat_template(messages, generation_prompt, **extra)
                    assert str(err) in str(refused.value)
                    continue
                assert ours.apply_chat_template(messages, generation_prompt, **extra) == expected
                checked += 1
    assert checked >= 4


def test_loop_controls_and_generation_blocks_render_like_transformers() -> None:
    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                "{% if loop.index > 3 %}{% break %}{% endif %}[{{ m.role }}]"
                "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
                "{% else %}{{ m.content }}{% endif %}{% endfor %}{{ messages | tojson }}")
    ours = Tokenizer(tokenizers.Tokenizer.from_file(str(GPT2)), {"chat_template": template})
    messages = CONVERSATIONS[1] + CONVERSATIONS[2]
    assert ours.apply_chat_template(messages) == hf_tokenizer(template).apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize(("template", "problem"), [
    ("{% for i in range(1000000) %}x{% endfor %}", "OverflowError: Range too big. The sandbox blocks ranges larger"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{{ 'a' + 1 }}", "TypeError: can only concatenate str"),
])  # fmt: skip
def test_a_template_that_fails_while_rendering_is_one_line_naming_it(tmp_path, chat_tokenizer_dir, template,
                                                                     problem) -> None:  # fmt: skip
    """`range(1000000)` was an OverflowError out of a preprocessing worker: one line naming the template's file,
    and in preprocessing (two workers) the record's line, like a template's own raise_exception."""
    from ironcore.data.preprocessing.config import load_data_config
    from ironcore.data.preprocessing.preprocess import preprocess
    from ironcore.errors import DataError

    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((chat_tokenizer_dir / name).read_bytes())
    (folder / "chat_template.jinja").write_text(template)
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_path(folder).apply_chat_template(CONVERSATIONS[0])
    assert str(info.value).startswith(f"chat template: {problem}") and "\n" not in str(info.value)
    assert str(info.value).endswith(f" (in {folder / 'chat_template.jinja'})")
    if "range" not in template:
        return
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(4)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({
        "name": "chat", "task_type": "sft", "source": {"path": str(tmp_path / "chat.jsonl")},
        "fields": {"messages": "messages"}, "tokenizer": {"path": str(folder)}, "output_dir": str(tmp_path / "out"),
        "num_workers": 2}))  # fmt: skip
    with pytest.raises(DataError, match=r"chat\.jsonl:1: chat template: OverflowError: Range too big"):
        preprocess(load_data_config(config), progress=False)


def test_named_templates_round_trip_through_both_libraries(tmp_path) -> None:
    from transformers import AutoTokenizer

    templates = {"default": (TEMPLATES / "chatml.jinja").read_text(), "tool_use": (TEMPLATES / "llama3.jinja").read_text()}
    hf_tokenizer(templates).save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "additional_chat_templates" / "tool_use.jinja").is_file()
    ours = Tokenizer.from_path(tmp_path / "hf")
    assert ours.chat_templates == templates
    ours.save(tmp_path / "ours")
    assert AutoTokenizer.from_pretrained(tmp_path / "ours").chat_template == templates
    for name in ("chat_template.jinja", "additional_chat_templates/tool_use.jinja"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()


def test_chat_data_preprocesses_without_transformers(tmp_path, saved_folders) -> None:
    """The base install (no dev extra) has no transformers: chat rendering must not need it."""
    records = tmp_path / "chat.jsonl"
    records.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS[1:] * 3))
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({
        "name": "chat", "task_type": "sft", "source": {"path": str(records)}, "fields": {"messages": "messages"},
        "tokenizer": {"path": str(saved_folders["qwen3"])}, "max_seq_length": 128, "output_dir": str(tmp_path / "out"),
        "num_workers": 0,
    }))
    code = ("import sys; sys.modules['transformers'] = None\n"  # any import of it fails
            "from ironcore.cli import main\n"
            f"sys.exit(main(['preprocess', '--config', {str(config)!r}, '--no-progress']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert 0 < metadata["splits"]["train"]["trained_tokens"] < metadata["splits"]["train"]["tokens"]


# ---- an HF folder as transformers saves it, through every command ---------------------------------------


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny Llama with its tokenizer (Llama-3's template) and a three-id eos_token_id, saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf_model")
    tokenizer = hf_tokenizer((TEMPLATES / "llama3.jinja").read_text())
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ends = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|im_end|>", "<end_of_turn>")]
    model.generation_config.eos_token_id = ends
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(folder)
    return folder


def generate_json(folder: Path, *extra: str) -> dict:
    """``ironcore generate --json`` (in this process: a subprocess per call spent its time importing)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["generate", "--from-hf", str(folder), "--prompt", "Hi", "--max-new-tokens", "12", "--json",
                     *extra])  # fmt: skip
    assert code == 0, out.getvalue()
    return json.loads(out.getvalue())


def test_generate_stops_at_every_id_of_a_multi_id_eos(hf_folder, tmp_path) -> None:
    """Greedy decoding without stops shows the tokens; each end id, wherever it stands in the list, stops it."""
    free = generate_json(hf_folder, "--ignore-eos")["token_ids"]
    assert len(free) == 12
    tokenizer = Tokenizer.from_path(hf_folder)
    always = {tokenizer.eod_id, tokenizer.backend.token_to_id("<|eot_id|>")}  # EOD and the tokenizer's EOS
    position = next(p for p, t in enumerate(free) if t not in free[:p] and t not in always)
    assert not always & set(free[:position])
    stop = free[position]
    fillers = [t for t in range(1000, 2000) if t not in free][:2]
    config = json.loads((hf_folder / "generation_config.json").read_text())
    for index in range(3):
        ends = fillers[:index] + [stop] + fillers[index:]
        copy = tmp_path / f"eos{index}"
        subprocess.run(["cp", "-r", str(hf_folder), str(copy)], check=True)
        (copy / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": ends}))
        result = generate_json(copy)
        assert result["token_ids"] == free[: position + 1] and result["finish_reason"] == "stop", (index, result)


def test_an_hf_folder_goes_through_preprocess_train_and_convert(hf_folder, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    template = (hf_folder / "chat_template.jinja").read_bytes()
    records = tmp_path / "chat.jsonl"
    answered = [m + [{"role": "assistant", "content": "Fine."}] if m[-1]["role"] == "user" else m for m in CONVERSATIONS]
    records.write_text("".join(json.dumps({"messages": m}) + "\n" for m in answered * 4))
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({
        "name": "chat", "task_type": "sft", "source": {"path": str(records)}, "fields": {"messages": "messages"},
        "tokenizer": {"path": str(hf_folder)}, "max_seq_length": 96, "append_eod": False,
        "output_dir": str(tmp_path / "data"), "num_workers": 0,
    }))
    assert main(["preprocess", "--config", str(data), "--no-progress"]) == 0
    train = tmp_path / "train.yaml"
    train.write_text(yaml.safe_dump({
        "model": str(hf_folder), "data": {"config_path": str(data)}, "init": {"init_from": str(hf_folder)},
        "trainer": {"micro_batch_size": 2, "output_dir": str(tmp_path / "run"), "save_interval": 0},
        "operation": {"train_steps": 2, "eval_interval": 0}, "utils": {"tracking": False},
    }))
    assert main(["train", "--config", str(train)]) == 0
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m] == [1, 2]
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    assert (checkpoint / "chat_template.jinja").read_bytes() == template
    assert json.loads((checkpoint / "generation_config.json").read_text())["eos_token_id"] == json.loads(
        (hf_folder / "generation_config.json").read_text())["eos_token_id"]

    assert main(["convert", "--from-hf", str(hf_folder), "--output", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "--to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "back")]) == 0
    for name in ("chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (hf_folder / name).read_bytes(), name
    messages = CONVERSATIONS[1]
    assert AutoTokenizer.from_pretrained(tmp_path / "back").apply_chat_template(messages, tokenize=False) == \
        AutoTokenizer.from_pretrained(hf_folder).apply_chat_template(messages, tokenize=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(hf_folder)(ids).logits
        after = AutoModelForCausalLM.from_pretrained(tmp_path / "back")(ids).logits
    torch.testing.assert_close(after, before)
