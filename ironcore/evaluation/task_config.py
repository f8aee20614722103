"""What a task is: its config (:class:`TaskConfig`), the built-in tasks, and :func:`load_task`, which reads
a task's YAML file or ``NAME=DATA`` spec. Torch-free, so that the pipeline's Snakefile can read an experiment's
tasks to know their input files without importing the model side (:mod:`ironcore.evaluation.tasks` runs them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ironcore.config.base import InvalidValue, did_you_mean, field, from_dict, template_fields
from ironcore.errors import ConfigError
from ironcore.files import read_json, read_yaml


@dataclass
class FewShot:
    path: str = field(help="JSONL of examples (not the evaluated items)")
    k: int = field(0, help="examples put before each prompt")
    separator: str = field("\n\n", help="between the examples and before the prompt")


@dataclass
class TaskConfig:
    """One task. Templates name an item's fields, ``"Question: {question}"``: plain names only (no attribute,
    index or format spec), ``{{`` and ``}}`` for braces (``template_fields``, checked at load)."""

    name: str = field(help="the metrics' prefix: eval/<name>/<metric>")
    path: str = field(help="JSONL file of items")
    type: str = field("generate", help="generate | multiple_choice")
    prompt: str = field("{prompt}", help="template of the prompt (multiple choice: the context)")
    chat: bool = field(False, help="render the prompt as a user turn with the tokenizer's chat template")
    system: str | None = field(None, help="chat: a system message")
    few_shot: FewShot | None = field(None, help="examples before each prompt")
    limit: int | None = field(None, help="evaluate the first N items only")
    batch_size: int = field(32, help="prompts (generation) or contexts (multiple choice) per batch")
    # generate
    checker: str = field("exact", help="a reward function: gsm8k, exact, regex, ... or module:function")
    checker_options: dict[str, Any] = field({}, help="keyword arguments bound to the checker")
    target: str = field("{answer}", help="generation: a few-shot example's answer, after its prompt")
    max_new_tokens: int = field(256, help="generation budget per item")
    stop: list[str] = field([], help="strings that end a completion (cut there)")
    samples: int = field(0, help="seeded samples per item for pass@k (0: greedy accuracy only)")
    pass_at: list[int] = field([1], help="the k of pass@k, each <= samples")
    temperature: float = field(1.0, help="of the samples")
    seed: int = field(0, help="of the samples")
    # multiple choice
    choices: str = field("choices", help="multiple choice: the field holding the list of choices")
    gold: str = field("gold", help="multiple choice: the field holding the index of the right choice")
    target_delimiter: str = field(" ", help="multiple choice: between the context and each choice")

    def validate(self) -> None:
        for key in ("prompt", "target"):
            template_fields(getattr(self, key), key)  # plain {field} names only, one line for anything else
        if self.type not in ("generate", "multiple_choice"):
            raise InvalidValue("type", f"must be generate or multiple_choice, got {self.type!r}")
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise InvalidValue(key, f"must be >= 1, got {getattr(self, key)}")
        if self.limit is not None and self.limit < 1:
            raise InvalidValue("limit", f"must be >= 1, got {self.limit}")
        if self.samples < 0:
            raise InvalidValue("samples", f"must be >= 0, got {self.samples}")
        for k in self.pass_at if self.samples else []:
            if not 1 <= k <= self.samples:
                raise InvalidValue("pass_at", f"each k must be in 1..samples ({self.samples}), got {k}")
        if self.samples and self.temperature <= 0:
            raise InvalidValue("temperature", f"samples need a temperature > 0, got {self.temperature}")


# Built-in tasks: ``NAME=DATA`` on the command line (DATA: the JSONL file, or for ``synthetic`` the folder
# of ``ironcore synthetic``, whose task.json names the checker).
BUILTIN_TASKS: dict[str, dict[str, Any]] = {
    # GSM8K test as in its release ({"question", "answer": "... #### 18"}), prompted like the pipeline's SFT data.
    "gsm8k": {"prompt": "Question: {question}\nAnswer:\n", "checker": "gsm8k", "target": "{answer}",
              "max_new_tokens": 256, "stop": ["\n\n", "Question:"]},  # fmt: skip
    # ``ironcore synthetic`` held-out records ({"prompt", "answer"}): greedy accuracy and pass@4 (the rl target's evaluation).
    "synthetic": {"prompt": "{prompt}", "checker": "exact", "max_new_tokens": 8, "samples": 4,
                  "pass_at": [1, 4], "temperature": 1.0},  # fmt: skip
}
# A built-in under ``chat`` (``--chat``, or ``chat: true`` over ``base:``): an instruct model is asked the question
# as a user would ask it, and reasons in paragraphs until its end-of-turn token, so no stop strings ("\n\n" would
# cut the reasoning) and room for it; the checker still reads the completion's last number.
BUILTIN_CHAT: dict[str, dict[str, Any]] = {
    "gsm8k": {"prompt": "{question}", "stop": [], "max_new_tokens": 512},
}


def load_task(spec: str, chat: bool = False) -> TaskConfig:
    """The task ``spec`` names: a YAML file, or ``NAME=DATA`` for a built-in (see :data:`BUILTIN_TASKS`);
    ``chat`` (``--chat``) makes it a chat task, a built-in in its chat form (:data:`BUILTIN_CHAT`)."""
    name, eq, data = spec.partition("=")
    if eq:
        if name not in BUILTIN_TASKS:
            raise ConfigError(f"--task {spec}: '{name}' is not a built-in task ({', '.join(BUILTIN_TASKS)})"
                              + did_you_mean(name, BUILTIN_TASKS))  # fmt: skip
        settings = {"name": name, **BUILTIN_TASKS[name], **(BUILTIN_CHAT.get(name, {}) if chat else {}), "path": data}
        settings.update({"chat": True} if chat else {})
        if name == "synthetic" and Path(data).is_dir():
            manifest = read_json(Path(data) / "task.json", "synthetic task manifest")
            settings.update(path=str(Path(data) / "heldout.jsonl"), checker=manifest.get("reward", "exact"))
        return from_dict(TaskConfig, settings, f"--task {spec}")
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--task {spec}: expected a task YAML file or a built-in as NAME=DATA "
                          f"({', '.join(f'{n}=...' for n in BUILTIN_TASKS)})")  # fmt: skip
    settings = read_yaml(path, "task config")
    base = settings.pop("base", None)
    if base is not None:
        if base not in BUILTIN_TASKS:
            raise ConfigError(f"{path}: config key 'base': '{base}' is not a built-in task ({', '.join(BUILTIN_TASKS)})")
        as_chat = chat or settings.get("chat") is True
        settings = {**BUILTIN_TASKS[base], **(BUILTIN_CHAT.get(base, {}) if as_chat else {}), **settings}
    settings.setdefault("name", path.stem)
    settings.update({"chat": True} if chat else {})
    if "path" in settings and not Path(settings["path"]).is_absolute():  # relative to the YAML file's folder
        settings["path"] = str(path.parent / settings["path"])
    few = settings.get("few_shot")
    if isinstance(few, dict) and "path" in few and not Path(few["path"]).is_absolute():
        few["path"] = str(path.parent / few["path"])
    try:
        return from_dict(TaskConfig, settings)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
