"""Chat from the command line: ``ironcore chat`` and ``ironcore generate --chat`` / ``{"messages": ...}`` prompts.

The ids fed to the model must be ``transformers``' ``apply_chat_template(..., add_generation_prompt=True)``
of the conversation so far, and a reply must end at the end-of-turn token (``<|im_end|>``, the tokenizer's
EOS), unshown. The model is a tiny Llama saved by ``transformers`` whose blocks add nothing (zero output
projections), so its greedy next token depends on the last token alone: after the generation prompt's
newline it says "Hello", "!", ``<|im_end|>``, and after ``<|im_end|>`` "Hello" again, so a chat that did
not stop there would say "Hello!Hello!...".
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from ironcore.cli import main

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "examples" / "data" / "gpt2" / "tokenizer.json"
CHATML = ROOT / "tests" / "data" / "chat_templates" / "chatml.jinja"
NEWLINE, HELLO, BANG = 198, 15496, 0  # GPT-2's "\n", "Hello", "!"
MAX_NEW = "8"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """An HF folder: the tiny bigram Llama above and a ChatML tokenizer (GPT-2 BPE, ``<|im_end|>`` its EOS)."""
    import tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer.from_file(str(GPT2))
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHATML.read_text(encoding="utf-8"))
    folder = tmp_path_factory.mktemp("chat_model")
    tokenizer.save_pretrained(folder)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        # Token -> a one-hot direction (<|im_end|> shares the newline's), and the next token's head row on it.
        for axis, (tokens, following) in enumerate((((NEWLINE, end), HELLO), ((HELLO,), BANG), ((BANG,), end))):
            direction = torch.zeros(32)
            direction[axis] = 1.0
            embed[list(tokens)] = direction
            head[following] = 10 * direction
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(chat_model):
    """``ids(messages)``: transformers' tokens of a conversation with the generation prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)

    def ids(messages: list[dict[str, str]]) -> list[int]:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(rendered if isinstance(rendered, list) else rendered["input_ids"])

    return ids


@pytest.fixture
def fed(monkeypatch) -> list[list[int]]:
    """The prompts the command gives the model (through ironcore.inference's stream or generate), in order."""
    import ironcore.inference as inference

    prompts: list[list[int]] = []

    def recording(real):
        def call(model, input_ids, *args, **kwargs):
            prompts.extend([int(t) for t in row] for row in input_ids)
            return real(model, input_ids, *args, **kwargs)
        return call

    monkeypatch.setattr(inference, "stream", recording(inference.stream))
    monkeypatch.setattr(inference, "generate", recording(inference.generate))
    return prompts


def run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    """``ironcore ARGV`` in this process with ``stdin`` piped in: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _stdin(stdin):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _stdin(text: str):
    import sys

    saved, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


def test_chat_renders_each_turn_like_transformers_and_stops_at_the_end_of_turn(chat_model, reference, fed) -> None:
    system = {"role": "system", "content": "You are terse."}
    turns = "What is the capital of France?\nAnd of Italy?\n/reset\nHi again\n/exit\nnever read\n"
    code, out, err = run(["chat", "--from-hf", str(chat_model), "--system", system["content"],
                          "--max-new-tokens", MAX_NEW], turns)  # fmt: skip
    assert code == 0, err
    assert out == "Hello!\n" * 3  # each reply ends at <|im_end|>, unshown; stdout holds only the replies
    first = [system, {"role": "user", "content": "What is the capital of France?"}]
    second = [*first, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And of Italy?"}]
    after_reset = [system, {"role": "user", "content": "Hi again"}]
    assert fed == [reference(first), reference(second), reference(after_reset)]
    assert "you>" not in out + err  # no terminal prompts when stdin is piped


def test_chat_refuses_a_tokenizer_without_a_template_and_a_conversation_too_long(chat_model, tmp_path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_bytes((chat_model / "tokenizer.json").read_bytes())
    code, _, err = run(["chat", "--from-hf", str(chat_model), "--tokenizer", str(plain)], "Hi\n")
    assert code == 2 and "no chat template" in err and "ironcore generate" in err and err.count("\n") == 1
    code, out, err = run(["chat", "--from-hf", str(chat_model), "--max-new-tokens", MAX_NEW],
                         "word " * 300 + "\nHi\n")  # fmt: skip
    assert code == 0 and "the model has 256 positions: /reset starts over" in err
    assert out == "Hello!\n"  # the turn that did not fit is dropped; the next one is answered


def test_generate_chat_renders_the_prompt_as_a_user_turn(chat_model, reference, fed) -> None:
    code, out, err = run(["generate", "--from-hf", str(chat_model), "--chat", "--system", "Be brief.",
                          "--prompt", "What is the capital of France?", "--max-new-tokens", MAX_NEW])  # fmt: skip
    assert code == 0, err
    assert out == "Hello!\n"
    assert fed == [reference([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is the capital of France?"}])]
    assert "chat template" not in err  # no hint: the prompt went through the template


def test_generate_reads_messages_lines_without_chat(chat_model, reference, fed, tmp_path) -> None:
    from ironcore.data.preprocessing.tokenizer import Tokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": messages}) + '\n{"prompt": "Once upon"}\n')
    code, out, err = run(["generate", "--from-hf", str(chat_model), "--prompts-file", str(prompts), "--json",
                          "--max-new-tokens", MAX_NEW])  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0]["messages"] == messages and records[1]["prompt"] == "Once upon"
    assert records[0]["completion"] == "Hello!" and records[0]["finish_reason"] == "stop"
    assert fed == [reference(messages), Tokenizer.from_path(chat_model).encode("Once upon")]
    prompts.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n{"messages": [{"role": "user"}]}\n')
    code, _, err = run(["generate", "--from-hf", str(chat_model), "--prompts-file", str(prompts)])
    assert code == 2 and f"{prompts}:2: " in err and '"messages"' in err and err.count("\n") == 1


def test_a_raw_prompt_to_a_chat_tokenizer_gets_a_hint(chat_model) -> None:
    code, out, err = run(["generate", "--from-hf", str(chat_model), "--prompt", "What is", "--max-new-tokens", "2"])
    assert code == 0 and out.startswith("What is")  # still generated as before
    hints = [line for line in err.splitlines() if "--chat" in line]
    assert hints == ["[the tokenizer has a chat template: --chat renders the prompt as a user turn, as an "
                     "instruct model expects]"]
