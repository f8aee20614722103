"""A trained reward model as a reward function (RLHF): the score of prompt + completion.

The checkpoint is a run (or checkpoint folder) of the ``reward_model``
objective, with the tokenizer saved beside its weights. As TRL does for a
reward model, a plain prompt is joined to its completion as text (after
``prompt_template``, which should be the one the reward model's data used),
and a conversation is rendered with the reward model's chat template and the
generation prompt, the completion following it. The reward is the score at
the last token — where the reward-model objective reads it in training.
Sequences longer than the model's positions keep their end.

Use it as ``{function: reward_model, options: {checkpoint: runs/rm}}``.
"""

from __future__ import annotations

import functools
from os import PathLike
from typing import Any

import torch

from ironcore.checkpoints.load import load_model, locate
from ironcore.config.base import InvalidValue
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import CheckpointError, ConfigError
from ironcore.models.transformer import TransformerModel
from ironcore.rewards.base import positive_int, reward_options, string_option


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@functools.lru_cache(maxsize=4)
def load_reward_model(checkpoint: str, device: torch.device) -> tuple[TransformerModel, Tokenizer]:
    """The reward model of ``checkpoint`` and its tokenizer, loaded once per process (built for the current
    TP layout, so every TP rank holds its shard and scores the same completions)."""
    model = load_model(checkpoint, device)
    if model.score is None:
        raise CheckpointError(f"{checkpoint}: not a reward model (its model_config has no score_head)")
    folder = locate(checkpoint)[1]
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder}: no tokenizer.json saved with the reward model")
    return model.requires_grad_(False), Tokenizer.from_path(folder)


def _prompt_text(prompt: Any, tokenizer: Tokenizer, prompt_template: str) -> str:
    if isinstance(prompt, str):
        return prompt_template.replace("{prompt}", prompt)
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True)


def _check_options(options: dict[str, Any]) -> None:
    """At load: a path, a template that places the prompt, a positive batch size."""
    if "checkpoint" in options and not isinstance(options["checkpoint"], (str, PathLike)):
        raise InvalidValue("checkpoint", f"must be a path, got {options['checkpoint']!r}")
    string_option(options, "prompt_template")
    if "{prompt}" not in options.get("prompt_template", "{prompt}"):
        raise InvalidValue("prompt_template", "has no '{prompt}': the reward model would score completions alone")
    positive_int(options, "batch_size")


@reward_options("checkpoint", "prompt_template", "batch_size", check=_check_options)
@torch.no_grad()
def reward_model(
    prompts: list[Any],
    completions: list[str],
    *,
    checkpoint: str,
    prompt_template: str = "{prompt}",
    batch_size: int = 32,
    **_: Any,
) -> list[float]:
    """The reward model's score of each prompt + completion (see the module doc)."""
    model, tokenizer = load_reward_model(str(checkpoint), _device())
    texts = [_prompt_text(p, tokenizer, prompt_template) + c for p, c in zip(prompts, completions, strict=True)]
    limit = model.config.max_position_embeddings
    ids = [row[-limit:] or [tokenizer.eod_id] for row in tokenizer.encode_batch(texts)]
    device = model.score.weight.device
    scores: list[float] = []
    for first in range(0, len(ids), batch_size):
        rows = ids[first : first + batch_size]
        width = max(len(row) for row in rows)
        batch = torch.full((len(rows), width), tokenizer.eod_id, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row)
        last = torch.tensor([len(row) - 1 for row in rows], device=device)
        out = model(batch.to(device)).squeeze(-1).float()  # right padding: causal, so no mask is needed
        scores += out.gather(1, last[:, None]).squeeze(1).tolist()
    return scores
