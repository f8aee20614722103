"""Task evaluation: what a checkpoint can do, as accuracy on items with known answers (``ironcore eval --task``).

A task is a JSONL file of items and a config: a YAML file, or a built-in
(:data:`~ironcore.evaluation.task_config.BUILTIN_TASKS`) with its data file, ``gsm8k=path/to/test.jsonl``.

- ``type: generate``: each item's prompt (``prompt``, a template over the
  item's fields, rendered with the tokenizer's chat template when ``chat``)
  is completed by :mod:`ironcore.inference`, cut at the first ``stop``
  string, and scored by a *checker*: a reward function of
  :mod:`ironcore.rewards`, the same plug-ins the RL objective uses
  (``gsm8k``, ``exact``, ``regex``, or ``module:function``), called with the
  item's fields as keyword arguments. Metrics: ``accuracy``, the mean score
  of one greedy completion per item, and with ``samples: n`` > 0,
  ``pass_at_<k>`` for each k of ``pass_at``: the unbiased estimator of Chen
  et al. (2021), ``1 - C(n - c, k) / C(n, k)`` over n seeded samples of which
  c score 1, averaged over the items.
- ``type: multiple_choice``: a context (``prompt``), the item's list of
  choices (field ``choices``) and the index of the right one (``gold``).
  Each choice, after ``target_delimiter``, is scored by its log-likelihood
  given the context, tokenized as lm-evaluation-harness does, the context
  encoded once for all its choices. ``acc``: the most likely choice is the
  gold one; ``acc_norm``: the same with each log-likelihood divided by its
  choice's length in characters (lm-eval's definitions, the same numbers).

Few-shot examples come from a separate file (``few_shot: {path, k}``): its
first k items, each rendered as prompt + target (``target`` for generation,
the gold choice for multiple choice), joined by ``few_shot.separator`` before
the item's prompt (as chat turns when ``chat``).

Under ``chat`` a built-in task takes its chat form (:data:`~ironcore.evaluation.task_config.BUILTIN_CHAT`): the
item as a user would ask it, one user turn, answered until the template's
end-of-turn token. ``details`` (``ironcore eval --log-samples``) receive one
row per item: what the model read, what it wrote, what the checker compared.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ironcore.checkpoints import native
from ironcore.checkpoints.load import load_language_model, locate
from ironcore.config.base import fill_template, template_fields
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import CheckpointError, ConfigError, DataError, UserError
from ironcore.evaluation.likelihood import encode_pair, loglikelihoods
from ironcore.evaluation.task_config import TaskConfig
from ironcore.files import read_json, read_text
from ironcore.inference import stream
from ironcore.inference.settings import stop_ids
from ironcore.models.transformer import TransformerModel
from ironcore.rewards import RewardSet, RewardSpec, load_reward
from ironcore.rewards.gsm8k import last_number, reference_answer

CHECK_STOPS_EVERY = 4  # decode steps between looks for the stop strings in the text so far
PROGRESS_EVERY = 5.0  # seconds between progress lines (and one at the end)

# What a built-in checker compares, for the sample log: (the answer it reads in a completion, in the item's answer).
EXTRACTIONS: dict[str, tuple[Callable[[str], Any], Callable[[Any], Any]]] = {
    "gsm8k": (last_number, lambda answer: reference_answer(str(answer))),
}


def load_for_eval(source: str | Path, device: str = "cpu") -> tuple[TransformerModel, Tokenizer]:
    """The model and tokenizer of an IronCore checkpoint, a run folder (its latest) or an HF folder."""
    _, folder = locate(source)
    if not (folder / "tokenizer.json").exists():
        raise ConfigError(f"{folder}: no tokenizer.json saved with the model (evaluation needs its tokenizer)")
    return load_language_model(source, device), Tokenizer.from_path(folder)


def read_items(path: str | Path, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of each item of a JSONL file; a bad line is a one-line DataError naming it."""
    items = []
    for number, line in enumerate(read_text(path, "task data").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        items.append((number, record))
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise DataError(f"{path}: no items (an empty file)")
    return items


def render(template: str, record: dict[str, Any], where: str, key: str) -> str:
    """``template`` filled from ``record``; a field it names that the record lacks is a one-line error."""
    for name in template_fields(template, key):  # plain names only (checked when the task was loaded)
        if name not in record:
            raise DataError(f"{where}: no field '{name}' (the task's '{key}' template uses it; the item has "
                            f"{', '.join(sorted(record)) or 'no fields'})")  # fmt: skip
    return fill_template(template, record)


def prefix_token(tokenizer: Tokenizer) -> int:
    """What an empty context is scored after: BOS when the tokenizer has one, else its EOS (as lm-eval's hf)."""
    specials = tokenizer.special_tokens
    for name in ("bos_token", "eos_token"):
        token = specials.get(name)
        if token and tokenizer.backend.token_to_id(token) is not None:
            return tokenizer.backend.token_to_id(token)
    return tokenizer.eod_id


def check_task(task: TaskConfig) -> None:
    """Read and check everything the task needs before any model work: its items and few-shot examples, the
    fields its templates name, multiple-choice lists and gold indices, the checker (one-line errors)."""
    files = [(task.path, read_items(task.path, task.limit))]
    if task.few_shot and task.few_shot.k:
        files.append((task.few_shot.path, read_items(task.few_shot.path, task.few_shot.k)))
    for path, items in files:
        for number, record in items:
            where = f"{path}:{number}"
            render(task.prompt, record, where, "prompt")
            if task.type == "multiple_choice":
                _choices(task, record, where)
            elif path != task.path:
                render(task.target, record, where, "target")
    if task.type == "generate":
        load_reward(RewardSpec(task.checker, options=dict(task.checker_options)), f"task {task.name}: checker")


def trained_step(folder: Path) -> int | None:
    """The training step a checkpoint folder was saved at (None for weights without a trainer state)."""
    state = folder / native.TRAINER_STATE
    return read_json(state, "trainer state", CheckpointError).get("step") if state.exists() else None


def check_chat_template(task: TaskConfig, tokenizer: Tokenizer) -> None:
    """A chat task needs the tokenizer's chat template: without one, a one-line error before any model work."""
    if task.chat and not tokenizer.chat_template:
        raise ConfigError(f"task {task.name} is a chat task (--chat or 'chat: true'), but the checkpoint's tokenizer "
                          "has no chat template (chat_template.jinja or tokenizer_config.json's chat_template)")  # fmt: skip


def evaluate_task(model: TransformerModel, tokenizer: Tokenizer, task: TaskConfig,
                  progress: Callable[[str], None] | None = None, details: list[dict] | None = None,
                  eos_token_ids: tuple[int, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """The task's metrics (``accuracy``, ``pass_at_k``, or ``acc``, ``acc_norm``), items and seconds.

    ``details``, when given, receives one row per item, in the file's order: ``doc_id`` (its index), ``line``
    (in the file), ``prompt`` (the text the model read); generation: the greedy ``completion``, the answer the
    checker read in it (``extracted``) and in the item (``expected``; see :data:`EXTRACTIONS`, else None), the
    item's ``answer`` as ``reference``, the ``score``; multiple choice: ``choices``, their ``loglikelihoods``,
    ``chosen``, ``gold``, ``acc``, ``acc_norm``; with ``samples``, how many were right (``samples_right``).
    ``eos_token_ids``: more ids that end a completion (those of the model's ``generation_config.json``).
    """
    check_chat_template(task, tokenizer)
    items = read_items(task.path, task.limit)
    shots = read_items(task.few_shot.path, task.few_shot.k) if task.few_shot and task.few_shot.k else []
    started = time.perf_counter()
    say = progress or (lambda _: None)
    if task.type == "generate":
        metrics = _generation(model, tokenizer, task, items, shots, say, details, eos_token_ids)
    else:
        metrics = _multiple_choice(model, tokenizer, task, items, shots, say, details)
    return {**metrics, "items": len(items), "seconds": round(time.perf_counter() - started, 3)}


def progress_line(done: int, total: int, unit: str, seconds: float) -> str:
    """``24/50 completions, 3.1/s, ETA 8 s``; once all are done, the time taken instead of the ETA."""
    line = f"{done}/{total} {unit}"
    if done == 0 or seconds <= 0:
        return line
    rate = done / seconds
    left = f"ETA {_duration((total - done) / rate)}" if done < total else f"in {_duration(seconds)}"
    return f"{line}, {rate:.3g}/s, {left}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Meter:
    """Counts finished units and reports :func:`progress_line` every ``every`` seconds and once at the end: a
    long evaluation shows its pace and how long it has left without flooding the log."""

    def __init__(self, report: Callable[[str], None], total: int, unit: str, every: float = PROGRESS_EVERY,
                 clock: Callable[[], float] = time.perf_counter) -> None:  # fmt: skip
        self.report, self.total, self.unit, self.every, self.clock = report, total, unit, every, clock
        self.done = 0
        self.started = self.last = clock()

    def advance(self, n: int) -> None:
        """``n`` more units finished; a line when ``every`` seconds passed since the last (not at the end)."""
        self.done += n
        now = self.clock()
        if self.done < self.total and now - self.last >= self.every:
            self.last = now
            self.report(progress_line(self.done, self.total, self.unit, now - self.started))

    def end(self) -> None:
        """The last line: all done, the rate and the time taken."""
        self.report(progress_line(self.total, self.total, self.unit, self.clock() - self.started))


def _prompt_text(task: TaskConfig, tokenizer: Tokenizer, record: dict, where: str,
                 shots: list[tuple[str, str]]) -> str:  # fmt: skip
    """The prompt of one item with the few-shot examples (pairs of prompt and target) before it."""
    prompt = render(task.prompt, record, where, "prompt")
    if not task.chat:
        separator = task.few_shot.separator if task.few_shot else ""
        return "".join(p + t + separator for p, t in shots) + prompt
    messages = [{"role": "system", "content": task.system}] if task.system else []
    for p, t in shots:
        messages += [{"role": "user", "content": p}, {"role": "assistant", "content": t.strip()}]
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _generation(model: TransformerModel, tokenizer: Tokenizer, task: TaskConfig, items: list, shots: list,
                progress: Callable[[str], None], details: list[dict] | None,
                eos_token_ids: tuple[int, ...]) -> dict[str, float]:  # fmt: skip
    checker = RewardSet([load_reward(RewardSpec(task.checker, options=dict(task.checker_options)),
                                     f"task {task.name}: checker")])  # fmt: skip
    examples = [(render(task.prompt, r, f"{task.few_shot.path}:{n}", "prompt"),
                 render(task.target, r, f"{task.few_shot.path}:{n}", "target")) for n, r in shots]  # fmt: skip
    texts = [_prompt_text(task, tokenizer, r, f"{task.path}:{n}", examples) for n, r in items]
    encode = tokenizer.encode if task.chat else (lambda t: tokenizer.backend.encode(t, add_special_tokens=True).ids)
    prompts = [encode(text) for text in texts]
    records = [r for _, r in items]

    def run(prompts: list[list[int]], unit: str, temperature: float, batch: int) -> list[str]:
        meter = Meter(progress, len(prompts), unit)
        out = complete(model, tokenizer, prompts, task.max_new_tokens, task.stop, temperature, task.seed, batch,
                       meter.advance, eos_token_ids)  # fmt: skip
        meter.end()
        return out

    greedy = run(prompts, "completions", 0.0, task.batch_size)
    scores = _score(checker, task, texts, greedy, records)
    metrics = {"accuracy": _mean(scores)}
    if details is not None:
        extract, expect = EXTRACTIONS.get(task.checker, (None, None))
        for i, ((line, record), text, completion, score) in enumerate(zip(items, texts, greedy, scores, strict=True)):
            details.append({"doc_id": i, "line": line, "prompt": text, "completion": completion,
                            "extracted": _plain(extract(completion)) if extract else None,
                            "expected": _plain(expect(record.get("answer"))) if expect else None,
                            "reference": record.get("answer"), "score": score})  # fmt: skip
    if task.samples:
        n = task.samples
        sampled = run([p for p in prompts for _ in range(n)], "samples", task.temperature, task.batch_size * n)
        repeated = _score(checker, task, [t for t in texts for _ in range(n)], sampled,
                          [r for r in records for _ in range(n)])  # fmt: skip
        correct = [sum(1 for s in repeated[i * n : (i + 1) * n] if s is not None and s >= 1.0) for i in range(len(items))]
        for k in task.pass_at:
            metrics[f"pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(items)
        for row, c in zip(details[-len(items) :] if details is not None else [], correct, strict=False):
            row["samples_right"] = c  # of the task's n samples
    return metrics


def _plain(value: Any) -> Any:
    """A checker's reading of an answer as JSON: a number as its text (``18``, ``7/2``), None as null."""
    return None if value is None else value if isinstance(value, (str, int, float, bool)) else str(value)


def _score(checker: RewardSet, task: TaskConfig, prompts: list[str], completions: list[str],
           records: list[dict]) -> list[float | None]:  # fmt: skip
    fields = {key: [r.get(key) for r in records] for key in {k for r in records for k in r}}
    try:
        total = checker.score(prompts, completions, fields).total
    except UserError as err:
        raise type(err)(f"task {task.name} ({task.path}): {err}") from None
    return [None if math.isnan(v) else v for v in total.tolist()]


def _mean(scores: list[float | None]) -> float:
    known = [s for s in scores if s is not None]
    return sum(known) / len(known) if known else math.nan


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn from n (c of them right) is right (Chen et al.)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def complete(model: TransformerModel, tokenizer: Tokenizer, prompts: list[list[int]], max_new_tokens: int,
             stop: list[str], temperature: float, seed: int, batch_size: int,
             advance: Callable[[int], None] | None = None, eos_token_ids: tuple[int, ...] = ()) -> list[str]:  # fmt: skip
    """The completion text of each prompt (special tokens left out), cut at its first ``stop`` string.

    Up to ``batch_size`` prompts decode at once, longest first; a row whose text holds a stop string is ended
    (``stream``'s ``stop_rows``) and, like a finished one, gives its place to the next waiting prompt
    (continuous batching), so the batch stays full and no row decodes past its answer. A row also ends at a
    stop token: the tokenizer's end of document and EOS (a chat template's end of turn) and ``eos_token_ids``.
    A prompt too long for the model with its budget loses tokens on the left (as lm-eval's). ``advance(n)``
    hears of the rows as they end (a progress meter, a progress bar).
    """
    room = model.config.max_position_embeddings - max_new_tokens
    if room < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                          f"{model.config.max_position_embeddings} positions")  # fmt: skip
    stops = stop_ids(tokenizer, eos_token_ids)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows: list[list[int]] = [[] for _ in order]  # by place in ``order``
    ended = [False] * len(order)
    live: set[int] = set()  # rows started and not ended
    stopped = torch.zeros(len(order), dtype=torch.bool, device=next(model.parameters()).device)
    tokens = stream(model, [prompts[i][-room:] for i in order], max_new_tokens, temperature=temperature,
                    eos_token_id=stops, seed=seed if temperature > 0 else None, stop_rows=stopped,
                    max_batch=batch_size)  # fmt: skip
    reported = 0
    for step, token in enumerate(tokens):
        running = (token >= 0).nonzero().squeeze(1)
        for j, t in zip(running.tolist(), token[running].tolist(), strict=True):
            rows[j].append(t)
            live.add(j)
            if t in stops or len(rows[j]) == max_new_tokens:  # its last token: no more to look at
                ended[j] = True
                live.discard(j)
        if stop and (step + 1) % CHECK_STOPS_EVERY == 0 and live:
            looked = sorted(live)
            texts = tokenizer.backend.decode_batch([rows[j] for j in looked], skip_special_tokens=True)
            met = [j for j, text in zip(looked, texts, strict=True) if any(s in text for s in stop)]
            stopped[met] = True  # the engine ends them: they cost no more steps
            for j in met:
                ended[j] = True
                live.discard(j)
        if advance and sum(ended) > reported:
            advance(sum(ended) - reported)
            reported = sum(ended)
    if advance and len(order) > reported:
        advance(len(order) - reported)
    out = [""] * len(prompts)
    for i, text in zip(order, tokenizer.backend.decode_batch(rows, skip_special_tokens=True), strict=True):
        out[i] = cut(text, stop)
    return out


def cut(text: str, stop: list[str]) -> str:
    """``text`` up to its first stop string (lm-eval cuts at each stop string in turn: the same result)."""
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


def loglikelihoods_in_steps(model: TransformerModel, requests: list[tuple[list[int], list[int]]], batch: int,
                            advance: Callable[[int], None]) -> list[tuple[float, bool]]:  # fmt: skip
    """:func:`~ironcore.evaluation.likelihood.loglikelihoods`, one batch of contexts at a time so that
    ``advance(n)`` hears of the requests scored (a progress meter or bar). The batches are the ones a single
    call makes (its order: distinct contexts, longest first), so the numbers are the same."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(requests):
        groups.setdefault(tuple(context), []).append(i)
    contexts = sorted(groups, key=len, reverse=True)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in range(0, len(contexts), batch):
        members = [i for context in contexts[start : start + batch] for i in groups[context]]
        for i, result in zip(members, loglikelihoods(model, [requests[i] for i in members], batch), strict=True):
            results[i] = result
        advance(len(members))
    return results


def _multiple_choice(model: TransformerModel, tokenizer: Tokenizer, task: TaskConfig, items: list, shots: list,
                     progress: Callable[[str], None], details: list[dict] | None) -> dict[str, float]:  # fmt: skip
    examples = []
    for number, record in shots:
        choices, gold = _choices(task, record, f"{task.few_shot.path}:{number}")
        examples.append((render(task.prompt, record, f"{task.few_shot.path}:{number}", "prompt"),
                         task.target_delimiter + choices[gold]))  # fmt: skip
    prefix = prefix_token(tokenizer)
    requests, spans, golds, lengths, contexts, options = [], [], [], [], [], []
    for number, record in items:
        where = f"{task.path}:{number}"
        choices, gold = _choices(task, record, where)
        context = _prompt_text(task, tokenizer, record, where, examples)
        contexts.append(context)
        options.append(choices)
        spans.append((len(requests), len(requests) + len(choices)))
        requests += [encode_pair(tokenizer.encode, context, task.target_delimiter + c, prefix) for c in choices]
        golds.append(gold)
        lengths.append([len(c) for c in choices])
    meter = Meter(progress, len(requests), "choices")
    scored = loglikelihoods_in_steps(model, requests, task.batch_size, meter.advance)
    meter.end()
    acc = acc_norm = 0
    for i, ((start, end), gold, chars) in enumerate(zip(spans, golds, lengths, strict=True)):
        lls = [ll for ll, _ in scored[start:end]]
        chosen, chosen_norm = _argmax(lls), _argmax([ll / max(n, 1) for ll, n in zip(lls, chars, strict=True)])
        acc += chosen == gold
        acc_norm += chosen_norm == gold
        if details is not None:
            details.append({"doc_id": i, "line": items[i][0], "prompt": contexts[i], "choices": options[i],
                            "loglikelihoods": lls, "chosen": chosen, "gold": gold, "acc": float(chosen == gold),
                            "acc_norm": float(chosen_norm == gold)})  # fmt: skip
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal values, as numpy's


def _choices(task: TaskConfig, record: dict, where: str) -> tuple[list[str], int]:
    """The item's choices and gold index, checked: a list of two or more strings and an index into it."""
    for key in (task.choices, task.gold):
        if key not in record:
            raise DataError(f"{where}: no field '{key}' (the task's multiple-choice "
                            f"{'choices' if key == task.choices else 'gold'} field)")  # fmt: skip
    choices, gold = record[task.choices], record[task.gold]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field '{task.choices}' must be a list of strings")
    if len(choices) < 2:
        raise DataError(f"{where}: field '{task.choices}' has {len(choices)} choice; multiple choice needs two or more")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(f"{where}: field '{task.gold}' must be an index into the {len(choices)} choices, got {gold!r}")
    return choices, gold
