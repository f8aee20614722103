"""Task evaluation (``ironcore eval --task``): checkers, pass@k, prompts, bad input, eval.json and MLflow, the
per-item logs (``--log-samples``), progress lines and chat evaluation (``--chat``).

Multiple choice against lm-eval's own numbers is in test_lm_eval_adapter.py.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from ironcore.checkpoints import native
from ironcore.cli import main
from ironcore.config.model import ModelConfig
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import ConfigError, DataError
from ironcore.evaluation.task_config import FewShot, TaskConfig, load_task
from ironcore.evaluation.tasks import (
    Meter,
    check_task,
    complete,
    cut,
    evaluate_task,
    load_for_eval,
    pass_at_k,
    progress_line,
    render,
)
from ironcore.inference import generate, stream
from ironcore.models import TransformerModel
from ironcore.rewards.gsm8k import gsm8k_answer, last_number

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO / "examples/data/gsm8k/gsm8k_test_100.jsonl"
WORDS = "the a cat dog sat ran on under mat one two three four five six seven".split()
SEEN: dict[str, list] = {}  # what the recording checker was given


def recording_checker(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """A checker of this module (``tests.test_eval_tasks:recording_checker``-style): keeps what it was given."""
    SEEN.setdefault("prompts", []).extend(prompts)
    SEEN.setdefault("completions", []).extend(completions)
    return [float(len(c) % 2) for c in completions]


def answer_checker(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """Right where the item says so: mixed scores whatever a random model writes."""
    SEEN.setdefault("completions", []).extend(completions)
    return [float(a == "yes") for a in answer]


def failing_checker(prompts: list[str], completions: list[str], **_) -> list[float]:
    raise ZeroDivisionError("division by zero")


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder with one checkpoint of a small random model and its BPE tokenizer."""
    texts = [" ".join(random.Random(i).choices(WORDS, k=10)) for i in range(100)]
    tokenizer = Tokenizer.train_bpe(texts, vocab_size=280)
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, ffn_hidden_size=64, max_position_embeddings=512,
                      position_embedding="rope", norm_type="rmsnorm", gated_mlp=True, activation="silu")  # fmt: skip
    run = tmp_path_factory.mktemp("run")
    folder = native.save_model(TransformerModel(cfg), run / "checkpoints" / "step_0000007")
    tokenizer.save(folder)
    (folder / native.TRAINER_STATE).write_text(json.dumps({"step": 7}))
    (run / "checkpoints" / "latest").write_text("step_0000007")
    return run


def test_gsm8k_checker_is_right_on_reference_answers_and_wrong_on_shuffled_ones() -> None:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    answers = [row["answer"] for row in rows]
    assert len(rows) == 100
    assert gsm8k_answer([""] * 100, answers, answers) == [1.0] * 100
    rotated = answers[1:] + answers[:1]
    final = [a.split("####")[-1].strip().replace(",", "") for a in answers]  # the answer's number, as written
    same = [float(x) == float(y) for x, y in zip(final[1:] + final[:1], final, strict=True)]
    assert sum(same) == 1  # items 53 and 54 both answer 2
    assert gsm8k_answer([""] * 100, rotated, answers) == [1.0 if s else 0.0 for s in same]


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    """Chen et al.'s formula equals the share of k-subsets of the n samples holding a right one."""
    for n, c, k in [(4, 0, 1), (4, 1, 1), (4, 1, 4), (5, 2, 2), (6, 3, 4), (6, 6, 3)]:
        samples = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert math.isclose(pass_at_k(n, c, k), sum(any(s) for s in subsets) / len(subsets)), (n, c, k)


def test_generation_task_scores_the_completions_with_the_checker(run_folder, tmp_path) -> None:
    """Prompts with few-shot examples before them, completions = the engine's greedy tokens cut at the stop
    string, accuracy = the checker's mean; pass@k from seeded samples, the same on a second run."""
    SEEN.clear()
    model, tokenizer = load_for_eval(run_folder)
    items = _write(tmp_path / "items.jsonl", [{"q": " ".join(WORDS[i : i + 3]), "answer": WORDS[i]} for i in range(6)])
    shots = _write(tmp_path / "shots.jsonl", [{"q": "one two", "answer": "three"}, {"q": "dog", "answer": "cat"}])
    task = TaskConfig(name="toy", path=str(items), prompt="Q: {q}\nA:", target=" {answer}", checker=
                      "test_eval_tasks:recording_checker", max_new_tokens=12, stop=["\n"], samples=3,
                      pass_at=[1, 3], seed=1, few_shot=FewShot(str(shots), 2, "\n\n"),
                      batch_size=4)  # fmt: skip
    details: list[dict] = []
    got = evaluate_task(model, tokenizer, task, details=details)
    prompts = [f"Q: one two\nA: three\n\nQ: dog\nA: cat\n\nQ: {' '.join(WORDS[i : i + 3])}\nA:" for i in range(6)]
    assert SEEN["prompts"][:6] == prompts
    ids = [tokenizer.backend.encode(p, add_special_tokens=True).ids for p in prompts]
    greedy = [cut(tokenizer.decode(out, skip_special_tokens=True), ["\n"]) for out in generate(model, ids, 12)]
    assert SEEN["completions"][:6] == greedy and any(greedy)
    assert got["accuracy"] == sum(len(c) % 2 for c in greedy) / 6
    sampled = SEEN["completions"][6:]
    assert len(sampled) == 18 and sampled != greedy * 3
    right = [sum(len(c) % 2 for c in sampled[3 * i : 3 * i + 3]) for i in range(6)]
    assert got["pass_at_3"] == sum(r > 0 for r in right) / 6
    assert got["pass_at_1"] == pytest.approx(sum(right) / 18)
    assert [d["samples_right"] for d in details] == right and [d["completion"] for d in details] == greedy
    SEEN.clear()
    assert evaluate_task(model, tokenizer, task) == {**got, "seconds": pytest.approx(got["seconds"], abs=60)}


def test_completions_stop_early_and_are_cut_at_the_stop_string(run_folder) -> None:
    model, tokenizer = load_for_eval(run_folder)
    ids = [tokenizer.encode("the cat sat on"), tokenizer.encode("a dog")]
    whole = [tokenizer.decode(out, skip_special_tokens=True) for out in generate(model, ids, 40)]
    assert min(map(len, whole)) > 10
    stop = [whole[0][2:4], whole[1][3:5]]
    assert complete(model, tokenizer, ids, 40, stop, 0.0, 0, 2) == [cut(text, stop) for text in whole]
    assert all(len(c) < len(w) for c, w in zip(complete(model, tokenizer, ids, 40, stop, 0.0, 0, 2), whole))


def test_chat_tasks_render_with_the_chat_template(run_folder, tmp_path) -> None:
    SEEN.clear()
    model, tokenizer = load_for_eval(run_folder)
    tokenizer.chat_templates["default"] = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                                           "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    items = _write(tmp_path / "chat.jsonl", [{"prompt": "one two", "answer": "three"}])
    task = TaskConfig(name="chat", path=str(items), chat=True, system="be brief", max_new_tokens=4,
                      checker="test_eval_tasks:recording_checker")  # fmt: skip
    evaluate_task(model, tokenizer, task)
    assert SEEN["prompts"] == ["<system>be brief\n<user>one two\n<assistant>"]


def test_builtin_tasks_and_yaml_files(tmp_path) -> None:
    gsm8k = load_task(f"gsm8k={GSM8K}")
    assert (gsm8k.name, gsm8k.checker, gsm8k.prompt) == ("gsm8k", "gsm8k", "Question: {question}\nAnswer:\n")
    check_task(gsm8k)
    folder = tmp_path / "synthetic"
    folder.mkdir()
    _write(folder / "heldout.jsonl", [{"prompt": "12+34=", "answer": "46"}])
    (folder / "task.json").write_text(json.dumps({"task": "addition", "reward": "exact"}))
    synthetic = load_task(f"synthetic={folder}")
    assert (synthetic.path, synthetic.samples, synthetic.pass_at) == (str(folder / "heldout.jsonl"), 4, [1, 4])
    (tmp_path / "mine.yaml").write_text("base: gsm8k\npath: data.jsonl\nlimit: 5\n")
    mine = load_task(str(tmp_path / "mine.yaml"))
    assert (mine.name, mine.checker, mine.limit, mine.path) == ("mine", "gsm8k", 5, str(tmp_path / "data.jsonl"))


@pytest.mark.parametrize(
    ("rows", "settings", "error", "message"),
    [
        ([], {}, DataError, r"items.jsonl: no items \(an empty file\)"),
        ([{"question": "q"}, {"prompt": "p"}], {"prompt": "{question}"}, DataError,
         r"items.jsonl:2: no field 'question' \(the task's 'prompt' template uses it"),
        ([{"prompt": "p", "choices": ["only"], "gold": 0}], {"type": "multiple_choice"}, DataError,
         r"items.jsonl:1: field 'choices' has 1 choice; multiple choice needs two or more"),
        ([{"prompt": "p", "choices": ["a", "b"], "gold": 2}], {"type": "multiple_choice"}, DataError,
         r"items.jsonl:1: field 'gold' must be an index into the 2 choices, got 2"),
        ([{"prompt": "p", "choices": ["a", "b"]}], {"type": "multiple_choice"}, DataError,
         r"items.jsonl:1: no field 'gold'"),
        ([{"prompt": "p"}], {"checker": "nonsense"}, ConfigError, r"task t: checker.function.*'nonsense'"),
        ([{"prompt": "p"}], {"samples": 2, "pass_at": [4]}, ConfigError, r"pass_at.*each k must be in 1..samples"),
    ],
)  # fmt: skip
def test_bad_tasks_are_one_line_errors(tmp_path, rows, settings, error, message) -> None:
    path = _write(tmp_path / "items.jsonl", rows)
    with pytest.raises(error, match=message):
        check_task(load_task_from(path, settings))


@pytest.mark.parametrize(("key", "template", "message"), [
    ("prompt", "{question", "config key 'prompt': invalid template '{question': expected '}' before end of string"),
    ("prompt", "{question.__class__.__mro__}", "config key 'prompt': {question.__class__.__mro__} is not a plain "
                                               "field name (a template names fields as {name} only"),
    ("prompt", "Q: {question[0]}", "{question[0]} is not a plain field name"),
    ("prompt", "{question!r}", "{question!r} is not a plain field name"),
    ("prompt", "{question:>99999}", "{question:>99999} is not a plain field name"),
    ("prompt", "{} {0}", "{} is not a plain field name"),
    ("target", "{answer} }", "config key 'target': invalid template '{answer} }': Single '}' encountered"),
])  # fmt: skip
def test_a_task_template_names_plain_fields_only_checked_at_load(tmp_path, key, template, message) -> None:
    """`prompt: "{question"` was a raw ValueError at the first item, `{question.__class__.__mro__}` rendered
    Python's internals: now one line at load naming the task file and the key."""
    _write(tmp_path / "items.jsonl", [{"question": "q", "answer": "a"}])
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({"path": "items.jsonl", key: template}))
    with pytest.raises(ConfigError) as info:
        load_task(str(path))
    text = str(info.value)
    assert text.startswith(f"{path}: config key '{key}': ") and message in text and "\n" not in text, text
    path.write_text(yaml.safe_dump({"path": "items.jsonl", "prompt": "{{literal}} {question}: {answer}\n"}))
    task = load_task(str(path))
    check_task(task)
    assert render(task.prompt, {"question": "q", "answer": 3}, "x", "prompt") == "{literal} q: 3\n"


def load_task_from(path: Path, settings: dict) -> TaskConfig:
    from ironcore.config.base import from_dict

    return from_dict(TaskConfig, {"name": "t", "path": str(path), **settings})


def test_cli_writes_eval_json_and_logs_to_the_training_run(run_folder, tmp_path, capsys, monkeypatch) -> None:
    """``ironcore eval --task``: eval.json in the checkpoint folder with eval/<task>/<metric>, the metrics on
    the MLflow run that trained it (its mlflow_run.json), at the checkpoint's step."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e", str(tmp_path / "artifacts"))).info.run_id
    (run_folder / "mlflow_run.json").write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))
    assert main(["eval", "--checkpoint", str(run_folder), "--task", f"gsm8k={GSM8K}", "--limit", "3",
                 "--log-samples"]) == 0  # fmt: skip
    folder = run_folder / "checkpoints/step_0000007"
    out = json.loads((folder / "eval.json").read_text())
    assert out["step"] == 7 and out["tasks"]["gsm8k"]["items"] == 3
    assert out["eval/gsm8k/accuracy"] == out["tasks"]["gsm8k"]["accuracy"]
    history = client.get_metric_history(run_id, "eval/gsm8k/accuracy")
    assert [(m.value, m.step) for m in history] == [(out["eval/gsm8k/accuracy"], 7)]
    assert "1 metrics logged to run" in capsys.readouterr().err
    # --log-samples: the sample files beside eval.json, and on the training run under the checkpoint's step
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "eval/step_0000007")}
    assert logged == {"samples_gsm8k.jsonl", "samples_gsm8k.html"}
    assert all((folder / name).is_file() for name in logged)
    (run_folder / "mlflow_run.json").write_text(json.dumps({"tracking_uri": "http://127.0.0.1:9", "run_id": "x"}))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main(["eval", "--checkpoint", str(run_folder), "--task", f"gsm8k={GSM8K}", "--limit", "1",
                 "--output", str(tmp_path / "e.json")]) == 0  # fmt: skip
    assert "could not log" in capsys.readouterr().err  # a dead server costs the logging, not the evaluation


def test_cli_bad_task_is_one_line_and_writes_nothing(run_folder, tmp_path, capsys) -> None:
    bad = _write(tmp_path / "bad.jsonl", [{"question": "q", "answer": "#### 1"}, {"answer": "#### 2"}])
    output = tmp_path / "out.json"
    assert main(["eval", "--checkpoint", str(run_folder), "--task", f"gsm8k={GSM8K}", "--task",
                 f"gsm8k={bad}", "--output", str(output)]) == 2  # fmt: skip
    assert "two tasks are named 'gsm8k'" in capsys.readouterr().err
    (tmp_path / "t.yaml").write_text(f"base: gsm8k\npath: {bad}\n")
    assert main(["eval", "--checkpoint", str(run_folder), "--task", f"gsm8k={GSM8K}", "--task",
                 str(tmp_path / "t.yaml"), "--output", str(output)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"{bad}:2: no field 'question'" in err and len(err.strip().splitlines()) == 1
    assert not output.exists()
    assert main(["eval", "--checkpoint", str(run_folder), "--task", f"gsm8k={GSM8K}", "--system", "hi"]) == 2
    assert "--system is the system turn of a chat evaluation: give --chat too" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_folder), "--task", "gsm9k=x.jsonl"]) == 2
    assert "'gsm9k' is not a built-in task (gsm8k, synthetic) (did you mean 'gsm8k'?)" in capsys.readouterr().err


def test_a_checker_that_raises_is_one_line_naming_the_task(run_folder, tmp_path) -> None:
    model, tokenizer = load_for_eval(run_folder)
    items = _write(tmp_path / "items.jsonl", [{"prompt": "one two", "answer": "three"}])
    task = TaskConfig(name="t", path=str(items), checker="test_eval_tasks:failing_checker", max_new_tokens=2)
    with pytest.raises(DataError, match=rf"task t \({items}\): reward function failing_checker raised "
                                        r"ZeroDivisionError: division by zero"):  # fmt: skip
        evaluate_task(model, tokenizer, task)


def test_log_samples_has_every_item_and_agrees_with_the_metrics(run_folder, tmp_path, capsys) -> None:
    """``--log-samples``: one JSONL row per item (doc_id, line, the prompt the model read, the greedy completion,
    what the checker read in it and in the reference, the score; multiple choice: the choices' log-likelihoods,
    chosen, gold), whose mean score is the task's metric; the same rows as an escaped HTML table."""
    SEEN.clear()
    toy = _write(tmp_path / "toy.jsonl", [{"q": f"<b>{w} & {v}</b>", "answer": "yes" if w < v else "no"}
                                            for w, v in zip(WORDS, WORDS[3:])])  # fmt: skip
    toy.write_text("\n" + toy.read_text())  # a blank first line: line numbers are the file's, doc_id counts items
    (tmp_path / "toy.yaml").write_text(f"path: {toy}\nprompt: 'Q: {{q}}\\nA:'\nchecker: test_eval_tasks:answer_checker\n")
    _write(tmp_path / "mc.jsonl", [{"prompt": f"the {w}", "choices": ["cat sat", "dog", "on the mat"], "gold": i % 3}
                                   for i, w in enumerate(WORDS)])  # fmt: skip
    (tmp_path / "mc.yaml").write_text("path: mc.jsonl\ntype: multiple_choice\n")
    output = tmp_path / "out" / "e.json"
    assert main(["eval", "--checkpoint", str(run_folder), "--task", f"gsm8k={GSM8K}", "--task", str(tmp_path / "toy.yaml"),
                 "--task", str(tmp_path / "mc.yaml"), "--limit", "6", "--max-new-tokens", "6", "--log-samples",
                 "--no-mlflow", "--output", str(output)]) == 0  # fmt: skip
    result = json.loads(output.read_text())["tasks"]
    rows = {name: [json.loads(line) for line in (output.parent / f"samples_{name}.jsonl").read_text().splitlines()]
            for name in ("gsm8k", "toy", "mc")}  # fmt: skip
    questions = [json.loads(line) for line in GSM8K.read_text().splitlines()[:6]]
    gsm8k = rows["gsm8k"]
    assert [list(r) for r in gsm8k] == [["doc_id", "line", "prompt", "completion", "extracted", "expected", "reference",
                                         "score"]] * 6  # fmt: skip
    assert [(r["doc_id"], r["line"]) for r in gsm8k] == [(i, i + 1) for i in range(6)]
    assert [r["prompt"] for r in gsm8k] == [f"Question: {q['question']}\nAnswer:\n" for q in questions]
    assert [r["reference"] for r in gsm8k] == [q["answer"] for q in questions]
    assert [r["expected"] for r in gsm8k] == [q["answer"].split("####")[-1].strip().replace(",", "") for q in questions]
    for r in gsm8k:  # the number the checker read, and its verdict on the completion, as the checker gives it
        number = last_number(r["completion"])
        assert r["extracted"] == (None if number is None else str(number))
        assert r["score"] == gsm8k_answer([""], [r["completion"]], [r["reference"]])[0] == (r["extracted"] == r["expected"])
    assert sum(r["score"] for r in gsm8k) / 6 == result["gsm8k"]["accuracy"]
    toy_rows = rows["toy"]
    assert [(r["doc_id"], r["line"]) for r in toy_rows] == [(i, i + 2) for i in range(6)]
    assert [r["completion"] for r in toy_rows] == SEEN["completions"]
    assert [r["score"] for r in toy_rows] == [float(r["reference"] == "yes") for r in toy_rows] and 0 < sum(
        r["score"] for r in toy_rows) < 6  # fmt: skip
    assert sum(r["score"] for r in toy_rows) / 6 == result["toy"]["accuracy"]
    assert {r["extracted"] for r in toy_rows} == {None}  # a checker of its own: nothing known to extract
    mc = rows["mc"]
    assert [list(r) for r in mc] == [["doc_id", "line", "prompt", "choices", "loglikelihoods", "chosen", "gold", "acc",
                                      "acc_norm"]] * 6  # fmt: skip
    assert all(r["chosen"] == max(range(3), key=r["loglikelihoods"].__getitem__) for r in mc)
    assert [r["acc"] for r in mc] == [float(r["chosen"] == r["gold"]) for r in mc]
    assert sum(r["acc"] for r in mc) / 6 == result["mc"]["acc"] and sum(r["acc_norm"] for r in mc) / 6 == result["mc"]["acc_norm"]
    page = (output.parent / "samples_toy.html").read_text()
    assert page.count("<tr>") == 7 and "&lt;b&gt;the &amp; dog&lt;/b&gt;" in page and "<b>" not in page
    assert all((output.parent / f"samples_{name}.html").is_file() for name in ("gsm8k", "mc"))
    err = capsys.readouterr().err
    assert "gsm8k: 6/6 completions, " in err and "/s, in " in err and "mc: 18/18 choices, " in err


def test_progress_lines_give_the_rate_and_the_time_left() -> None:
    assert progress_line(24, 50, "completions", 8.0) == "24/50 completions, 3/s, ETA 9 s"
    assert progress_line(240, 1000, "choices", 60.0) == "240/1000 choices, 4/s, ETA 3.2 min"
    assert progress_line(50, 50, "completions", 16.0) == "50/50 completions, 3.12/s, in 16 s"
    assert progress_line(0, 50, "completions", 3.0) == "0/50 completions"
    now = iter([0.0, 1.0, 4.0, 6.0, 7.0, 20.0, 21.0])  # a line once 5 s have passed since the last, and the end
    lines: list[str] = []
    meter = Meter(lines.append, 10, "completions", every=5.0, clock=lambda: next(now))
    for _ in range(5):
        meter.advance(2)
    meter.end()
    assert lines == ["6/10 completions, 1/s, ETA 4 s", "10/10 completions, 0.476/s, in 21 s"]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, chat_tokenizer_dir) -> Path:
    """A checkpoint with a chat tokenizer (ChatML-style turns, EOS <|im_end|>) whose model always answers with the
    end-of-turn token (an output bias on it)."""
    tokenizer = Tokenizer.from_path(chat_tokenizer_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, ffn_hidden_size=32, max_position_embeddings=512,
                      position_embedding="rope", norm_type="rmsnorm", gated_mlp=True, activation="silu",
                      tie_word_embeddings=False, lm_head_bias=True)  # fmt: skip
    model = TransformerModel(cfg)
    with torch.no_grad():
        model.lm_head.bias[tokenizer.backend.token_to_id("<|im_end|>")] = 50.0
    folder = native.save_model(model, tmp_path_factory.mktemp("chat") / "checkpoint")
    tokenizer.save(folder)
    return folder


def test_chat_asks_the_builtin_as_a_user_turn_and_stops_at_the_end_of_turn(chat_run, chat_tokenizer_dir, run_folder,
                                                                            tmp_path, monkeypatch, capsys) -> None:  # fmt: skip
    """``--chat``: each GSM8K question, as a user would ask it, is one user turn after the --system turn,
    tokenized as transformers' apply_chat_template(add_generation_prompt=True) tokenizes it; a completion ends
    at the end-of-turn token (one token here, not the budget's 8). Without a template: one line."""
    from transformers import PreTrainedTokenizerFast  # not AutoTokenizer: seconds less to import

    import ironcore.evaluation.tasks as tasks_module

    seen: dict[str, list] = {"rows": []}

    def recording_stream(model, prompts, max_new_tokens, **options):
        seen["prompts"] = prompts
        for token in stream(model, prompts, max_new_tokens, **options):
            seen["rows"].append(token.tolist())
            yield token

    monkeypatch.setattr(tasks_module, "stream", recording_stream)
    output = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(chat_run), "--task", f"gsm8k={GSM8K}", "--chat", "--system", "Be brief.",
                 "--limit", "3", "--max-new-tokens", "8", "--log-samples", "--output", str(output)]) == 0  # fmt: skip
    hf = PreTrainedTokenizerFast.from_pretrained(chat_tokenizer_dir)
    turns = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": json.loads(line)["question"]}]
             for line in GSM8K.read_text().splitlines()[:3]]  # fmt: skip
    want = [list(hf.apply_chat_template(t, add_generation_prompt=True, tokenize=True, return_dict=False)) for t in turns]
    assert sorted(seen["prompts"]) == sorted(want)  # the engine takes the longest first
    rows = [json.loads(line) for line in (tmp_path / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [hf.apply_chat_template(t, add_generation_prompt=True, tokenize=False)
                                           for t in turns]  # fmt: skip
    end = hf.convert_tokens_to_ids("<|im_end|>")
    assert [[t for t in step if t >= 0] for step in seen["rows"]] == [[end] * 3]  # one step: every row ended
    assert [r["completion"] for r in rows] == ["", "", ""]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_folder), "--task", f"gsm8k={GSM8K}", "--chat", "--limit", "1",
                 "--no-mlflow", "--output", str(tmp_path / "x.json")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "task gsm8k is a chat task" in err and "has no chat template" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
