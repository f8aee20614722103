"""The ``ironcore`` lm-eval model against lm-eval's own ``hf`` model on the same weights (exported with
``save_hf_model``), on local tasks written here: the same ``acc``, ``acc_norm`` and ``exact_match``, the same
log-likelihoods to 1e-4, and ``loglikelihood_rolling`` equal to our perplexity evaluation on the same text.
Our own multiple-choice evaluation (``ironcore eval --task``) gives lm-eval's accuracy on the same items."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the eval extra (in dev)")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from ironcore.checkpoints import native  # noqa: E402
from ironcore.checkpoints.hf import save_hf_model  # noqa: E402
from ironcore.config.model import ModelConfig  # noqa: E402
from ironcore.data.preprocessing.tokenizer import Tokenizer  # noqa: E402
from ironcore.evaluation.harness import IronCoreLM  # noqa: E402
from ironcore.evaluation.tasks import TaskConfig, evaluate_task  # noqa: E402
from ironcore.models import TransformerModel  # noqa: E402
from ironcore.objectives.lm import loss_sums  # noqa: E402

WORDS = "the a cat dog sat ran on under mat log red blue big small one two three four five six".split()
TEXTS = [" ".join(random.Random(i).choices(WORDS, k=12)) + "." for i in range(200)]
MC_ITEMS = 40


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> dict[str, Path]:
    """One small random Llama-style model with a BPE tokenizer, as an IronCore checkpoint and an HF folder,
    and two lm-eval tasks over JSON files (multiple choice with choices of unequal lengths, generate_until)."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = Tokenizer.train_bpe(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, ffn_hidden_size=128, max_position_embeddings=64,
                      position_embedding="rope", norm_type="rmsnorm", gated_mlp=True, activation="silu")  # fmt: skip
    model = TransformerModel(cfg)
    with torch.no_grad():  # wide weights: distinct log-likelihoods, few near-ties
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    ours = native.save_model(model, root / "ironcore")
    tokenizer.save(ours)
    hf = save_hf_model(model, root / "hf")
    tokenizer.save(hf)
    rng = random.Random(0)
    mc = [{"question": _sentence(rng, rng.randint(1, 8)), "choices": [_sentence(rng, rng.randint(1, 4)) for _ in
           range(rng.choice([2, 3, 4]))]} for _ in range(MC_ITEMS)]  # fmt: skip
    for item in mc:
        item["gold"] = rng.randrange(len(item["choices"]))
    gen = [{"prompt": _sentence(rng, rng.randint(2, 6)), "answer": _sentence(rng, 1)} for _ in range(12)]
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc))
    (tasks / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in gen))
    (tasks / "toy_mc.yaml").write_text(
        f"task: toy_mc\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {tasks / 'mc.jsonl'}}}}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
        "metric_list: [{metric: acc}, {metric: acc_norm}]\n"
    )
    (tasks / "toy_gen.yaml").write_text(
        f"task: toy_gen\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {tasks / 'gen.jsonl'}}}}}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs: {until: ['.'], max_gen_toks: 10, do_sample: false}\n"
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
    )
    return {"ours": ours, "hf": hf, "tasks": tasks, "mc": tasks / "mc.jsonl"}


def _evaluate(model, tasks: Path) -> dict:
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # lm-eval's own tasks take seconds
    return lm_eval.simple_evaluate(model=model, tasks=["toy_mc", "toy_gen"], task_manager=manager, log_samples=True,
                                   batch_size=8, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def runs(twin) -> dict[str, dict]:
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(twin["hf"]), device="cpu", batch_size=8, dtype="float32")
    return {"ours": _evaluate(IronCoreLM(checkpoint=str(twin["ours"]), batch_size=8), twin["tasks"]),
            "hf": _evaluate(hf, twin["tasks"])}  # fmt: skip


def test_same_metrics_as_lm_evals_hf_model(runs) -> None:
    ours, hf = runs["ours"]["results"], runs["hf"]["results"]
    for task, metric in [("toy_mc", "acc,none"), ("toy_mc", "acc_norm,none"), ("toy_gen", "exact_match,none")]:
        assert ours[task][metric] == hf[task][metric], (task, metric)
    assert ours["toy_mc"]["acc,none"] != ours["toy_mc"]["acc_norm,none"]  # the length normalisation mattered


def test_same_loglikelihoods_and_generations(runs) -> None:
    for task in ("toy_mc", "toy_gen"):
        ours, hf = runs["ours"]["samples"][task], runs["hf"]["samples"][task]
        assert len(ours) == len(hf) > 0
        for a, b in zip(ours, hf, strict=True):
            if task == "toy_mc":
                # resps: one [(log-likelihood, is_greedy)] per choice
                ll_a, ll_b = ([float(choice[0][0]) for choice in s["resps"]] for s in (a, b))
                assert torch.allclose(torch.tensor(ll_a), torch.tensor(ll_b), atol=1e-4), a["doc"]
                assert [c[0][1] for c in a["resps"]] == [c[0][1] for c in b["resps"]]
            else:
                assert a["filtered_resps"] == b["filtered_resps"]
    generated = [s["filtered_resps"][0] for s in runs["ours"]["samples"]["toy_gen"]]
    assert any(generated), "the generation task generated nothing: the comparison would prove little"


def test_loglikelihood_rolling_equals_our_perplexity_evaluation(twin) -> None:
    """Over a text longer than the model's 64 positions (two windows): lm-eval's hf, our adapter and the
    language-model loss of our validation (``objectives.lm.loss_sums``) on the same tokens agree."""
    from lm_eval.models.huggingface import HFLM

    text = " ".join(TEXTS[:5])
    ours = IronCoreLM(checkpoint=str(twin["ours"]))
    hf = HFLM(pretrained=str(twin["hf"]), device="cpu", batch_size=4, dtype="float32")
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    got, want = ours.loglikelihood_rolling(request)[0], hf.loglikelihood_rolling(request)[0]
    assert abs(got - want) < 1e-4 * max(1.0, abs(want))
    ids = ours.tok_encode(text)
    n, window = len(ids), ours.max_length
    assert window < n <= 2 * window
    # The windows: the prefix token and the first 63 tokens predict tokens 0..63; then 65 tokens ending at the
    # last one, of whose targets only the n - 64 not predicted yet count.
    first, second = torch.tensor([[ours.prefix_token_id] + ids[:window]]), torch.tensor([ids[n - window - 1 :]])
    batches = [[{"input_ids": t[:, :-1], "labels": t[:, 1:], "loss_mask": mask[None]}]
               for t, mask in ((first, torch.ones(window)),
                               (second, torch.arange(window) >= 2 * window - n))]  # fmt: skip
    total, count = loss_sums(ours.model, batches)
    assert count == n and abs(-total - got) < 1e-4 * max(1.0, abs(got))


def test_our_multiple_choice_accuracy_equals_lm_evals(twin, runs) -> None:
    from ironcore.evaluation.tasks import load_for_eval

    model, tokenizer = load_for_eval(twin["ours"])
    task = TaskConfig(name="toy_mc", path=str(twin["mc"]), type="multiple_choice", prompt="{question}", batch_size=5)
    got = evaluate_task(model, tokenizer, task)
    assert got["items"] == MC_ITEMS
    for metric in ("acc", "acc_norm"):
        assert got[metric] == runs["hf"]["results"]["toy_mc"][f"{metric},none"], metric


def test_batch_size_in_model_args_and_lm_evals_own_options_both_work(twin) -> None:
    """docs/evaluation.md's ``--model_args checkpoint=DIR,batch_size=16,max_gen_toks=256``: lm-eval constructs
    the model with its own ``--batch_size`` and ``--device`` (defaults included) beside them; model_args win,
    and lm-eval's options alone work too."""
    from lm_eval.api.registry import get_model

    model = get_model("ironcore")
    defaults = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # lm-eval's, as its CLI passes them
    lm = model.create_from_arg_string(f"checkpoint={twin['ours']},batch_size=16,max_gen_toks=256", defaults)
    assert (lm.batch_size, lm.max_gen_toks) == (16, 256)
    lm = model.create_from_arg_string(f"checkpoint={twin['ours']},device=cpu", {**defaults, "batch_size": "4"})
    assert lm.batch_size == 4 and next(lm.model.parameters()).device.type == "cpu"
    lm = model.create_from_arg_obj({"checkpoint": str(twin["ours"]), "batch_size": 8}, defaults)
    assert lm.batch_size == 8


def test_lm_eval_results_never_overwrite_a_task_of_our_own(twin, runs, tmp_path, capsys, monkeypatch) -> None:
    """A --task and an --lm-eval task of one name: refused in one line before any work; a task lm-eval expands a
    group into that is named like a --task: kept beside it as lm_eval:<name>."""

    class LocalTasksOnly(TaskManager):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)
    from ironcore.cli import main

    ours = tmp_path / "toy_mc.yaml"  # our multiple-choice evaluation of the same items, with fewer of them
    ours.write_text(f"path: {twin['mc']}\ntype: multiple_choice\nprompt: '{{question}}'\nlimit: 5\n")
    (tmp_path / "lm").mkdir()
    shutil.copytree(twin["tasks"], tmp_path / "lm", dirs_exist_ok=True)
    (tmp_path / "lm" / "toy_group.yaml").write_text("group: toy_group\ntask: [toy_mc]\n"
                                                    "aggregate_metric_list: [{metric: acc}]\n")
    output = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(twin["ours"]), "--include-path", str(tmp_path / "lm"), "--output", str(output),
            "--task", str(ours)]  # fmt: skip
    assert main([*args, "--lm-eval", "toy_mc"]) == 2
    err = capsys.readouterr().err
    assert "--lm-eval toy_mc and --task" in err and "both name a task 'toy_mc'" in err and not output.exists()
    assert main([*args, "--lm-eval", "toy_group"]) == 0
    result = json.loads(output.read_text())
    assert result["tasks"]["toy_mc"]["items"] == 5  # ours, not overwritten
    assert result["eval/lm_eval:toy_mc/acc"] == runs["hf"]["results"]["toy_mc"]["acc,none"]


def test_lm_eval_command_finds_the_ironcore_model(twin, tmp_path) -> None:
    """``lm_eval --model ironcore`` works once ironcore is installed: the .pth hook registers the model."""
    out = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "ironcore", "--model_args",
                          f"checkpoint={twin['ours']}", "--tasks", "toy_mc", "--include_path", str(twin["tasks"]),
                          "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "toy_mc" in out.stdout and "acc" in out.stdout


def test_ironcore_eval_runs_lm_eval_tasks(twin, runs, tmp_path, capsys, monkeypatch) -> None:
    """``ironcore eval --lm-eval``: lm-eval's numbers as eval/<task>/<metric> in eval.json, with a progress bar
    (as lm-eval's hf model) and, with --log-samples, lm-eval's own per-item log; an unknown task is one line and
    writes nothing."""

    class LocalTasksOnly(TaskManager):  # indexing lm-eval's own tasks (for the unknown one) takes 15 s
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)
    from ironcore.cli import main

    output = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(twin["ours"]), "--include-path", str(twin["tasks"]), "--output", str(output)]
    assert main([*args, "--lm-eval", "toy_mc", "--log-samples"]) == 0
    result = json.loads(output.read_text())
    assert result["eval/toy_mc/acc"] == runs["hf"]["results"]["toy_mc"]["acc,none"]
    assert result["eval/toy_mc/acc_norm"] == runs["hf"]["results"]["toy_mc"]["acc_norm,none"]
    assert "Running loglikelihood requests" in capsys.readouterr().err  # the tqdm bar
    rows = [json.loads(line) for line in (tmp_path / "samples_toy_mc.jsonl").read_text().splitlines()]
    want = runs["hf"]["samples"]["toy_mc"]
    assert [r["doc_id"] for r in rows] == [s["doc_id"] for s in want] and len(rows) == MC_ITEMS
    assert sum(r["acc"] for r in rows) / MC_ITEMS == result["eval/toy_mc/acc"]
    output.unlink()
    assert main([*args, "--lm-eval", "toy_mc,no_such_task"]) == 2
    assert "no lm-eval task named no_such_task" in capsys.readouterr().err and not output.exists()
