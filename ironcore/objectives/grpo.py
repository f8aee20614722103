"""GRPO: group-relative policy optimisation, its advantages and its clipped per-token loss.

For every prompt the policy samples ``num_generations`` completions (a group);
reward functions score them, and a completion's advantage is its reward minus
its group's mean, divided by the group's (or the batch's) standard deviation.
The loss is PPO's clipped surrogate per completion token, on the probability
ratio between the policy being trained and the one that sampled (ratio 1 when
each batch is trained once), plus ``beta`` times the k3 estimate of the KL to
a frozen reference. TRL's ``GRPOTrainer`` is the reference for the formulas,
the option names and defaults, and the metric names (``kl``, ``clip_ratio/*``,
``reward``, ``reward_std``, ``frac_reward_zero_std``).

Like every objective here, a micro-batch's loss is its *share* of the global
batch's loss (all micro-batches, all data-parallel ranks), so that summing the
shares gives TRL's loss of the whole batch as one micro-batch in one process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from ironcore.config.base import InvalidValue, field
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.data.samples.batches import IndexDataset, MicroBatch
from ironcore.data.samples.rl import Prompt, PromptDataset
from ironcore.errors import ConfigError
from ironcore.files import write_text_atomically
from ironcore.inference import generate
from ironcore.inference.settings import completion_texts, stop_ids
from ironcore.objectives.base import (
    Forward,
    MemoryShape,
    Objective,
    ObjectiveContext,
    StepResult,
    frozen_reference,
    global_sum,
)
from ironcore.parallel import comm, state
from ironcore.parallel.cross_entropy import vocab_parallel_token_logps
from ironcore.rewards import RewardSet, RewardSpec, load_reward
from ironcore.tables import html_table

log = logging.getLogger(__name__)


@dataclass
class GRPOOptions:
    """Options of GRPO, with TRL's ``GRPOConfig`` names and defaults (none differs).

    TRL also takes true / false for ``scale_rewards`` (group / none); here it is one of the three names.
    """

    num_generations: int = field(8, help="Completions sampled per prompt (a group); at least 2.")
    temperature: float = field(1.0, help="Sampling temperature.")
    top_p: float = field(1.0, help="Nucleus sampling: the most probable tokens of this mass, in (0, 1].")
    top_k: int = field(0, help="Sample among the k most probable tokens (0: all).")
    max_completion_length: int = field(
        512, help="Most tokens a completion may have; also dr_grpo's constant normaliser. With the data's prompt "
        "budget (max_seq_length) it must fit model.max_position_embeddings: budget + this - 1 <= positions."
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        "group",
        help="Divide the advantages by the std of the group's rewards (group), of the batch's (batch), "
        "or not at all (none; Dr. GRPO).",
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = field(
        "dapo",
        help="How token losses are averaged: grpo (per sequence, then over sequences), dr_grpo (sum over "
        "sequences x max_completion_length), dapo (over all completion tokens of the global batch).",
    )
    epsilon: float = field(0.2, help="Clip the probability ratio at 1 - epsilon below (above: epsilon_high).")
    epsilon_high: float | None = field(
        None, help="Clip the probability ratio above at 1 + epsilon_high (null: epsilon; DAPO uses 0.28)."
    )
    beta: float = field(0.0, help="Weight of the KL to the reference (0: no reference model is run).")
    num_iterations: int = field(
        1, help="Optimizer steps on each generated batch (PPO's mu): the steps in between reuse it, against the "
        "log-probs of the policy that sampled it.",
    )
    mask_truncated_completions: bool = field(
        False, help="Leave completions that hit max_completion_length (no EOS) out of the loss."
    )
    rewards: list[RewardSpec] = field(
        [], help="Reward functions: {function: a built-in (gsm8k, regex, exact, reward_model) or module:function, "
        "weight, name, options}."
    )
    reward_errors: Literal["raise", "skip"] = field(
        "raise",
        help="A reward function that raises: stop with one line, or score that sample None and count it.",
    )
    eval_num_samples: int = field(
        4, help="Validation: completions sampled per held-out prompt for pass@k (k = this); 0: greedy only."
    )
    log_completions: bool = field(
        False, help="Write a table of the training batch's prompts, completions, rewards and advantages every "
        "log_completions_steps: OUTPUT_DIR/completions/step_N.html and .jsonl, and MLflow artifacts."
    )
    num_completions_to_print: int | None = field(
        None, help="log_completions: rows of each table (null: every completion of the global batch)."
    )
    log_completions_steps: int | None = field(
        None, help="log_completions: steps between tables (null: operation.log_interval, as TRL logs a table "
        "every logging_steps)."
    )

    def validate(self) -> None:
        if self.num_generations < 2:
            raise InvalidValue(
                "num_generations", f"must be >= 2 (a group's std needs two), got {self.num_generations}"
            )
        if self.temperature <= 0:
            raise InvalidValue("temperature", f"must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidValue("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidValue("top_k", f"must be >= 0, got {self.top_k}")
        if self.max_completion_length < 1:
            raise InvalidValue("max_completion_length", f"must be >= 1, got {self.max_completion_length}")
        if not 0 < self.epsilon < 1:
            raise InvalidValue("epsilon", f"must be in (0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise InvalidValue("epsilon_high", f"must be positive (or null), got {self.epsilon_high}")
        if self.beta < 0:
            raise InvalidValue("beta", f"must be >= 0, got {self.beta}")
        if self.num_iterations < 1:
            raise InvalidValue("num_iterations", f"must be >= 1, got {self.num_iterations}")
        if not self.rewards:
            raise InvalidValue("rewards", "GRPO needs at least one reward function")
        if self.eval_num_samples < 0:
            raise InvalidValue("eval_num_samples", f"must be >= 0, got {self.eval_num_samples}")
        for key in ("num_completions_to_print", "log_completions_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise InvalidValue(key, f"must be >= 1 (or null), got {getattr(self, key)}")


# ---- advantages ------------------------------------------------------------------------------------------


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation (Bessel-corrected) ignoring NaNs, as TRL's ``nanstd``: NaN under 2 values."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.nan)
    std = variance.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


@dataclass
class Advantages:
    """Per-completion ``[N]`` advantages, the std they were scaled by, and whether that std is 0."""

    advantages: torch.Tensor
    std: torch.Tensor  # the group's std, or the batch's for scale_rewards=batch (NaN under 2 rewards)
    is_std_zero: torch.Tensor  # bool (a NaN std counts: no spread); its mean is TRL's frac_reward_zero_std


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> Advantages:
    """Advantages of the global batch's rewards ``[N]``, in groups of ``num_generations`` consecutive ones.

    A NaN reward (no reward function could score the completion) is left out
    of its group's mean and std and gets advantage 0: it must not move the
    policy. So does a whole group whose std is NaN (one scored completion, or
    none). Such a group has no spread, so ``is_std_zero`` counts it, as TRL
    counts a group of all-None rewards (its ``nansum`` scores them 0, whose std is 0).
    """
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):  # "none" keeps the group std for is_std_zero
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std)) | std.isnan()
    return Advantages(torch.nan_to_num(advantages, nan=0.0), std, is_std_zero)


# ---- loss ------------------------------------------------------------------------------------------------


@dataclass
class GRPOLossParts:
    """One micro-batch's loss share, and detached sums over its completion tokens for the metrics.

    The objective adds the sums over micro-batches and DP ranks, then divides
    by ``tokens`` for TRL's ``kl`` and ``clip_ratio/{low,high,region}_mean``.
    """

    loss: torch.Tensor  # this micro-batch's share of the global batch's loss (carries the gradient)
    tokens: torch.Tensor  # completion tokens (masked)
    kl_sum: torch.Tensor  # per-token KL to the reference (0 when beta == 0)
    low_clipped: torch.Tensor  # tokens whose ratio is under 1 - epsilon with a negative advantage
    high_clipped: torch.Tensor  # tokens whose ratio is over 1 + epsilon_high with a positive advantage
    region_clipped: torch.Tensor  # either of the two


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: GRPOOptions,
    total_sequences: int,
    total_tokens: float,
) -> GRPOLossParts:
    """GRPO's loss share of a micro-batch of completions, with the sums of its metrics.

    ``per_token_logps`` ``[B, T]``: the policy's log-probs of the completion
    tokens; ``old_per_token_logps``: those of the policy that sampled them
    (None: this very policy, ratio 1, as when ``num_iterations`` is 1);
    ``ref_per_token_logps``: the reference's (needed when ``beta`` != 0);
    ``advantages`` ``[B]``; ``mask`` ``[B, T]``: the completion tokens.
    ``total_sequences`` and ``total_tokens`` (masked) count the whole global
    batch, so that the shares of all micro-batches and ranks add up to its loss.
    """
    mask = mask.to(per_token_logps.dtype)
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    epsilon_high = options.epsilon if options.epsilon_high is None else options.epsilon_high
    advantages = advantages.unsqueeze(1)

    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - options.epsilon, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    kl_sum = per_token_logps.new_zeros(())
    if options.beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError(f"beta = {options.beta} needs the reference's log-probs")
        log_ratio = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(log_ratio) - log_ratio - 1  # k3: unbiased, always >= 0
        per_token_loss = per_token_loss + options.beta * per_token_kl
        kl_sum = (per_token_kl.detach() * mask).sum()

    masked = per_token_loss * mask
    if options.loss_type == "grpo":  # mean over each sequence's tokens (an empty one counts as 0)
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / total_sequences
    elif options.loss_type == "dr_grpo":
        loss = masked.sum() / (total_sequences * options.max_completion_length)
    elif options.loss_type == "dapo":
        loss = masked.sum() / max(total_tokens, 1)
    else:
        raise ValueError(f"unknown GRPO loss type {options.loss_type!r}")

    is_low_clipped = (coef_1.detach() < 1 - options.epsilon) & (advantages < 0)
    is_high_clipped = (coef_1.detach() > 1 + epsilon_high) & (advantages > 0)
    return GRPOLossParts(
        loss=loss,
        tokens=mask.sum(),
        kl_sum=kl_sum,
        low_clipped=(is_low_clipped * mask).sum(),
        high_clipped=(is_high_clipped * mask).sum(),
        region_clipped=((is_low_clipped | is_high_clipped) * mask).sum(),
    )


# ---- the objective ---------------------------------------------------------------------------------------


def check_positions(max_completion_length: int, prompt_budget: int, positions: int) -> None:
    """Refuse at start-up a prompt of the full budget + ``max_completion_length`` beyond the model's positions.

    A rollout feeds the prompt and every new token but the last, and the update runs over the same positions,
    so ``prompt_budget + max_completion_length - 1`` must fit in ``model.max_position_embeddings``.
    """
    needed = prompt_budget + max_completion_length - 1
    if needed > positions:
        fits = positions - prompt_budget + 1
        advice = f"at most {fits} fit" if fits >= 1 else "lower the data's max_seq_length"
        raise ConfigError(
            f"config key 'trainer.objective_options.max_completion_length': a prompt of the data's max_seq_length "
            f"({prompt_budget} tokens) + {max_completion_length} new tokens needs {needed} positions, more than "
            f"model.max_position_embeddings ({positions}); {advice}"
        )


SAMPLE_ROWS = 16  # held-out prompts shown with their completions at each evaluation
WARN_AFTER = 3  # generations in a row that learn nothing (all cut off, no reward spread) before a warning


@dataclass
class Rollout:
    """Completions of a batch of prompts, laid out for the update: one row per completion, right-padded."""

    input_ids: torch.Tensor  # [N, L] prompt + completion + padding
    mask: torch.Tensor  # [N, L - 1] completion tokens, aligned with the targets input_ids[:, 1:]
    lengths: torch.Tensor  # [N] completion lengths (tokens, stop token included)
    truncated: torch.Tensor  # [N] bool: no stop token within max_completion_length
    texts: list[str]  # decoded completions (stop token and special tokens left out)


@dataclass
class Generation:
    """One generation step's completions, ready to train on for ``num_iterations`` steps (this rank's part)."""

    step: int  # the optimizer step that sampled them
    input_ids: list[torch.Tensor]  # per micro-batch [N, L]: prompt + completion + padding
    masks: list[torch.Tensor]  # per micro-batch [N, L - 1]: the completion's targets
    advantages: list[torch.Tensor]  # per micro-batch [N]
    old_logps: list[torch.Tensor] | None  # per micro-batch [N, L - 1], the sampling policy's; None when mu = 1
    total_sequences: int  # completions of the global batch (all DP ranks)
    total_tokens: float  # their completion tokens
    positions: int  # the positions an update runs over (rows x padded length - 1), all DP ranks
    reward_metrics: dict[str, float]  # reward and completion metrics of the global batch
    seconds: float  # the time it took to sample and score them


class GRPOObjective(Objective):
    """GRPO on rl prompt data: rollouts from the live policy, rewards, group advantages, clipped loss.

    A sample is a prompt; each brings ``num_generations`` completions, so
    ``trainer.train_batch_size`` counts prompts per optimizer step and a
    group never straddles two ranks. Every rank samples its own prompts'
    completions with ``ironcore.inference`` on the weights being trained (no
    copy), seeded by the step and the micro-batch's place in the global batch,
    so a resumed run draws what it would have drawn and any data-parallel
    layout with the same micro-batch size draws the same; the TP ranks of a
    group draw the same tokens. Rewards are gathered over the data-parallel ranks for the
    advantages (``scale_rewards: batch`` needs them all) and the metrics.
    """

    task_types = ("rl",)
    Options = GRPOOptions

    def __init__(self, context: ObjectiveContext, options: GRPOOptions | None = None) -> None:
        super().__init__(context, options)
        if options is None:
            raise ConfigError("trainer.objective_options.rewards: GRPO needs at least one reward function")
        self.options: GRPOOptions = options
        self.sequences_per_sample = options.num_generations
        self.model = context.model
        self.tokenizer = Tokenizer.from_path(context.data_dir)
        self.stop = stop_ids(self.tokenizer)
        self.pad_id = context.metadata["tokenizer"]["eod_id"]
        self.rewards = RewardSet([load_reward(spec, f"trainer.objective_options.rewards[{i}]")
                                  for i, spec in enumerate(options.rewards)])
        check_positions(options.max_completion_length, context.seq_len, context.config.model.max_position_embeddings)
        self._unscored: set[str] = set()  # reward functions already warned about scoring no completion
        self.reference = frozen_reference(context) if options.beta != 0.0 else None
        self.prompts: dict[str, PromptDataset] = {}
        self.split = "train"
        self._samples: list[Path] = []  # sample and completion tables written since the trainer last asked
        self._last_table = 0  # the step of the last completions table
        self._streaks = {"clipped": 0, "zero_std": 0}  # generations in a row that learnt nothing, and why
        self.generation: Generation | None = None  # the completions being trained on

    def prepare(self, datasets: dict[str, torch.utils.data.Dataset]) -> dict[str, torch.utils.data.Dataset]:
        self.prompts = datasets  # PromptDataset per split; the trainer batches their indices
        return {split: IndexDataset(len(prompts)) for split, prompts in datasets.items()}

    def memory_shape(self) -> MemoryShape:
        opts = self.options
        return MemoryShape(rows_per_sample=opts.num_generations, new_tokens=opts.max_completion_length,
                           reference=opts.beta != 0.0 and self.config.model.lora is None, kv_cache=True)

    # ---- rollouts ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[Prompt], copies: int, temperature: float, seed: int) -> Rollout:
        """``copies`` completions of each prompt (consecutive rows), sampled from the current weights."""
        opts = self.options
        ids = [prompt.ids.tolist() for prompt in prompts for _ in range(copies)]
        with self.autocast:  # generate runs the model in eval mode and puts it back
            completions = generate(
                self.model, ids, opts.max_completion_length, temperature=temperature,
                top_k=opts.top_k or None, top_p=opts.top_p, eos_token_id=self.stop, seed=seed,
            )
        width = max(len(p) + len(c) for p, c in zip(ids, completions, strict=True))
        multiple = state.tp_size() if state.sequence_parallel() else 1  # SP splits the L - 1 inputs evenly
        width = -(-(width - 1) // multiple) * multiple + 1
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), width - 1)
        for row, (prompt, completion) in enumerate(zip(ids, completions, strict=True)):
            input_ids[row, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            mask[row, len(prompt) - 1 : len(prompt) - 1 + len(completion)] = 1.0  # targets are the completion
        stopped = torch.tensor([bool(c) and c[-1] in self.stop for c in completions])
        if opts.mask_truncated_completions:
            mask[~stopped] = 0.0
        texts = completion_texts(self.tokenizer, completions, self.stop)
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        return Rollout(input_ids.to(self.device), mask.to(self.device), lengths, ~stopped, texts)

    def score(self, prompts: list[Prompt], copies: int, rollout: Rollout):
        """Every reward function's scores of the rollout's completions (``RewardScores``)."""
        fields: dict[str, list] = {}
        for prompt in prompts:
            for key, value in prompt.fields.items():
                if key != "prompt":
                    fields.setdefault(key, []).extend([value] * copies)
        texts = [prompt.fields["prompt"] for prompt in prompts for _ in range(copies)]
        return self.rewards.score(texts, rollout.texts, fields, self.options.reward_errors)

    def token_logps(self, model: Forward, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs ``[N, L-1]`` of ``input_ids[:, 1:]`` under ``model`` at the sampling
        temperature, and the entropies of those distributions (a metric)."""
        with self.autocast:
            logits = model(input_ids[:, :-1], parallel_output=True)
        # Chunked: no fp32 copies of the [N, L-1, V] logits beside them (they were most of the update's peak)
        return vocab_parallel_token_logps(logits, input_ids[:, 1:], self.options.temperature)

    def _seed(self, step: int, micro_batch: int, per_rank: int) -> int:
        """The sampling seed of one micro-batch of a step: from its place in the *global* batch, so that a
        resumed run and any data-parallel layout with the same micro-batch size draw the same completions."""
        return (self.config.init.seed * 1_000_003 + step) * 65_536 + state.dp_rank() * per_rank + micro_batch

    def _prompts(self, micro_batches: list[MicroBatch]) -> list[list[Prompt]]:
        dataset = self.prompts[self.split]
        return [[dataset[i] for i in mb["index"].tolist()] for mb in micro_batches]

    # ---- a step ------------------------------------------------------------------------------------------
    def backward(self, forward: Forward, micro_batches: list[MicroBatch]) -> StepResult:
        """Generate and score (every ``num_iterations``-th step), then one clipped update on that generation."""
        step = self.context.step()
        gen = self.generation
        if gen is None or not gen.step <= step < gen.step + self.options.num_iterations:
            gen = self.generation = self._generate(forward, micro_batches, step)
        return self._update(forward, gen)

    def _generate(self, forward: Forward, micro_batches: list[MicroBatch], step: int) -> Generation:
        """Rollouts of this rank's prompts, their rewards gathered over DP ranks, and their advantages."""
        opts, g = self.options, self.options.num_generations
        start = time.perf_counter()
        groups = self._prompts(micro_batches)
        rollouts = [self.rollout(prompts, g, opts.temperature, self._seed(step, j, len(groups)))
                    for j, prompts in enumerate(groups)]
        scores = [self.score(prompts, g, r) for prompts, r in zip(groups, rollouts, strict=True)]

        # One gather of every rank's rows, in rank order (each rank's are contiguous): per completion its
        # total reward, each function's reward, its length and whether it was cut off.
        local = torch.cat([
            torch.cat([s.total[:, None], s.per_function, r.lengths[:, None], r.truncated[:, None].float()], 1)
            for s, r in zip(scores, rollouts, strict=True)
        ])
        everyone = _gathered(local.to(self.device)).cpu()
        adv = group_advantages(everyone[:, 0], g, opts.scale_rewards)
        mine = slice(state.dp_rank() * len(local), (state.dp_rank() + 1) * len(local))
        advantages = adv.advantages[mine].to(self.device).split([len(s.total) for s in scores])
        if opts.log_completions and self._table_due(step):
            self._write_completions(step + 1, groups, rollouts, everyone, adv.advantages)
        old_logps = None
        if opts.num_iterations > 1:  # the sampling policy's log-probs, for the ratio of the later iterations
            with torch.no_grad():
                old_logps = [self.token_logps(forward, r.input_ids)[0] for r in rollouts]
        completion_tokens = float(sum(r.mask.sum() for r in rollouts))
        update_positions = float(sum(r.mask.numel() for r in rollouts))
        counts = torch.tensor([completion_tokens, update_positions], dtype=torch.float64, device=self.device)
        total_tokens, positions = global_sum(counts).tolist()
        return Generation(
            step=step, input_ids=[r.input_ids for r in rollouts], masks=[r.mask for r in rollouts],
            advantages=list(advantages), old_logps=old_logps, total_sequences=len(everyone),
            total_tokens=total_tokens, positions=int(positions),
            reward_metrics=self._reward_metrics(scores, everyone, adv),
            seconds=time.perf_counter() - start,
        )

    def _update(self, forward: Forward, gen: Generation) -> StepResult:
        """The clipped loss over the generation's completion tokens, backpropagated micro-batch by micro-batch."""
        opts = self.options
        start = time.perf_counter()
        sums = torch.zeros(7, device=self.device, dtype=torch.float64)  # loss tokens kl low high region H
        for j, (input_ids, mask, a) in enumerate(zip(gen.input_ids, gen.masks, gen.advantages, strict=True)):
            ref = None
            if self.reference is not None:  # first: its logits come and go before the policy's graph is held
                with torch.no_grad():
                    ref, _ = self.token_logps(self.reference, input_ids)
            logps, entropy = self.token_logps(forward, input_ids)
            old = None if gen.old_logps is None else gen.old_logps[j]
            parts = grpo_loss(logps, old, ref, a, mask, opts, gen.total_sequences, gen.total_tokens)
            parts.loss.backward()
            sums += torch.stack([parts.loss.detach(), parts.tokens, parts.kl_sum, parts.low_clipped,
                                 parts.high_clipped, parts.region_clipped, (entropy * mask).sum()]).double()
        sums = global_sum(sums)
        metrics = {"loss": float(sums[0])}
        tokens = max(float(sums[1]), 1.0)
        if opts.beta != 0.0:
            metrics["kl"] = float(sums[2]) / tokens
        metrics["entropy"] = float(sums[6]) / tokens
        for i, name in ((3, "low_mean"), (4, "high_mean"), (5, "region_mean")):
            metrics[f"clip_ratio/{name}"] = float(sums[i]) / tokens
        metrics.update(gen.reward_metrics)  # those of the completions this step trained on
        generated = gen.step == self.context.step()
        metrics.update({"time/rollout_s": gen.seconds if generated else 0.0,
                        "time/update_s": time.perf_counter() - start})
        return StepResult(metrics, int(sums[1]), processed=gen.positions)

    # ---- the generation kept across num_iterations steps, and in checkpoints -----------------------------
    def state_dict(self) -> dict[str, Any]:
        """The generation still to be trained on (num_iterations > 1), so that a resumed run reuses it."""
        gen = self.generation
        if gen is None or self.options.num_iterations == 1:
            return {}
        fields = {f.name: getattr(gen, f.name) for f in dataclasses.fields(Generation)}
        moved = {k: [t.cpu() for t in v] if isinstance(v, list) else v for k, v in fields.items()}
        return {"generation": moved, "layout": [state.tp_size(), state.dp_size(), state.dp_rank()]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if "generation" not in saved:
            return
        if saved["layout"] != [state.tp_size(), state.dp_size(), state.dp_rank()]:
            log.warning("the checkpoint's GRPO rollouts were made by another parallel layout: the next step "
                        "samples new ones")
            return
        fields = saved["generation"]
        moved = {k: [t.to(self.device) for t in v] if isinstance(v, list) else v for k, v in fields.items()}
        self.generation = Generation(**moved)

    def _reward_metrics(self, scores: list, everyone: torch.Tensor, adv: Advantages) -> dict[str, float]:
        """TRL's reward and completion metrics over the global batch (``everyone``: the gathered rows)."""
        rewards, per_function = everyone[:, 0], everyone[:, 1:-2]
        lengths, truncated = everyone[:, -2], everyone[:, -1]
        metrics = {"reward": float(torch.nanmean(rewards)), "reward_std": float(nanstd(rewards)),
                   "frac_reward_zero_std": float(adv.is_std_zero.float().mean())}
        self._warn_unscored(per_function)
        for j, name in enumerate(self.rewards.names):
            metrics[f"rewards/{name}/mean"] = float(torch.nanmean(per_function[:, j]))
            metrics[f"rewards/{name}/std"] = float(nanstd(per_function[:, j]))
        if self.options.reward_errors == "skip":
            errors = global_sum(torch.tensor([sum(s.errors[n] for s in scores) for n in self.rewards.names],
                                             dtype=torch.float64, device=self.device))
            for name, count in zip(self.rewards.names, errors.tolist(), strict=True):
                metrics[f"rewards/{name}/errors"] = count
        metrics["completions/mean_length"] = float(lengths.mean())
        metrics["completions/min_length"] = float(lengths.min())
        metrics["completions/max_length"] = float(lengths.max())
        metrics["completions/clipped_ratio"] = float(truncated.mean())
        self._warn_learning_nothing(metrics)
        return metrics

    def _warn_learning_nothing(self, metrics: dict[str, float]) -> None:
        """Say why, when :data:`WARN_AFTER` generations in a row teach nothing: every completion cut off at the
        budget (the rewards score unfinished answers), or every group's rewards equal (all advantages 0)."""
        reasons = {
            "clipped": (metrics["completions/clipped_ratio"] == 1.0,
                        f"every completion hit max_completion_length ({self.options.max_completion_length} tokens) "
                        "without an end token (completions/clipped_ratio 1.0), so the rewards score cut-off "
                        "answers: raise trainer.objective_options.max_completion_length"),
            "zero_std": (metrics["frac_reward_zero_std"] == 1.0,
                         f"every group's completions got the same reward (frac_reward_zero_std 1.0, reward "
                         f"{metrics['reward']:.3g}): every advantage is 0 and nothing is learnt; look at what "
                         "the rewards see (objective_options.log_completions: true)"),
        }
        for key, (bad, message) in reasons.items():
            self._streaks[key] = self._streaks[key] + 1 if bad else 0
            if self._streaks[key] == WARN_AFTER and not (dist.is_initialized() and dist.get_rank()):
                log.warning("step %d: for %d generations in a row %s", self.context.step() + 1, WARN_AFTER, message)

    # ---- completion tables (TRL's log_completions) -------------------------------------------------------
    def _table_due(self, step: int) -> bool:
        """Is a completions table due at this generation? One per ``log_completions_steps`` finished steps,
        also when generations come only every ``num_iterations`` steps (the same answer on every rank)."""
        every = self.options.log_completions_steps or self.config.operation.log_interval
        done = step + 1
        if done // every <= self._last_table // every:
            return False
        self._last_table = done
        return True

    def _write_completions(self, step: int, groups: list[list[Prompt]], rollouts: list[Rollout],
                           everyone: torch.Tensor, advantages: torch.Tensor) -> None:
        """The global batch's prompts, completions, rewards and advantages, as TRL's ``log_completions``
        table: ``OUTPUT_DIR/completions/step_N.html`` (to look at) and ``.jsonl`` (to read back), rank 0."""
        g = self.options.num_generations
        texts = [(prompt.fields["prompt"], text) for prompts, rollout in zip(groups, rollouts, strict=True)
                 for prompt, text in zip([p for p in prompts for _ in range(g)], rollout.texts, strict=True)]
        if state.dp_size() > 1:  # every rank's rows, in rank order (as ``everyone``)
            parts: list[Any] = [None] * state.dp_size()
            dist.all_gather_object(parts, texts, group=state.dp_group())
            texts = [row for part in parts for row in part]
        if dist.is_initialized() and dist.get_rank():
            return
        names = self.rewards.names
        rows = []
        for (prompt, completion), values, advantage in zip(texts, everyone.tolist(), advantages.tolist(),
                                                           strict=True):
            rewards = {name: None if math.isnan(v) else v for name, v in zip(names, values[1:-2], strict=True)}
            rows.append({"step": step, "prompt": prompt, "completion": completion, **rewards,
                         "reward": None if math.isnan(values[0]) else values[0], "advantage": advantage,
                         "tokens": int(values[-2]), "cut_off": bool(values[-1])})
        rows = rows[: self.options.num_completions_to_print]
        folder = Path(self.config.trainer.output_dir) / "completions"
        folder.mkdir(parents=True, exist_ok=True)
        jsonl = folder / f"step_{step:07d}.jsonl"
        write_text_atomically(jsonl, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        summary = (f"{len(everyone)} completions of step {step}, {len(rows)} shown; reward "
                   f"{float(torch.nanmean(everyone[:, 0])):.3f}, cut off {float(everyone[:, -1].mean()):.2f}")
        page = folder / f"step_{step:07d}.html"
        write_text_atomically(page, html_table(f"Training completions at step {step}", summary, rows))
        self._samples += [page, jsonl]

    def _warn_unscored(self, per_function: torch.Tensor) -> None:
        """Warn, once per function, when one returned None for all of a global batch's completions: its
        metrics are then null (NaN); when no function scored any, so is ``reward``, and every advantage is 0."""
        nothing = bool(per_function.isnan().all())
        for j, name in enumerate(self.rewards.names):
            if name not in self._unscored and bool(per_function[:, j].isnan().all()):
                self._unscored.add(name)
                if dist.is_initialized() and dist.get_rank():  # every rank has the gathered rewards: one says it
                    continue
                log.warning(
                    "reward function %s returned None for all %d completions of step %d: its metrics are null%s "
                    "(warned once)", name, len(per_function), self.context.step(),
                    "; no reward function scored any, so reward is null and nothing is learnt from them"
                    if nothing else "",
                )

    # ---- validation --------------------------------------------------------------------------------------
    def evaluate(self, forward: Forward, batches: Iterable[list[MicroBatch]]) -> dict[str, float]:
        """Held-out prompts: greedy accuracy (mean reward) and pass@k with seeded sampling (k completions,
        correct when the reward is at least 1, the full score of a verifiable reward)."""
        k = self.options.eval_num_samples
        sums = torch.zeros(4, dtype=torch.float64)  # reward sum, scored, prompts passed, prompts
        rows: list[tuple[Any, str, float]] = []
        self.split = "valid"
        try:
            for b, micro_batches in enumerate(batches):
                groups = self._prompts(micro_batches)
                for j, prompts in enumerate(groups):
                    rollout = self.rollout(prompts, 1, 0.0, seed=0)
                    greedy = self.score(prompts, 1, rollout).total
                    shown = SAMPLE_ROWS - len(rows)
                    rows += [(p.fields["prompt"], text, float(r)) for p, text, r
                             in zip(prompts[:shown], rollout.texts, greedy.tolist(), strict=False)]
                    sums[0] += float(torch.nansum(greedy))
                    sums[1] += float((~greedy.isnan()).sum())
                    if k:
                        seed = self._seed(-1 - b, j, len(groups))  # the same draws at every evaluation
                        rollout = self.rollout(prompts, k, self.options.temperature, seed)
                        sampled = self.score(prompts, k, rollout)
                        sums[2] += float((sampled.total.view(-1, k) >= 1.0).any(dim=1).sum())
                    sums[3] += len(prompts)
        finally:
            self.split = "train"
        sums = global_sum(sums.to(self.device)).cpu()
        metrics = {"val_accuracy": float(sums[0] / max(float(sums[1]), 1.0))}
        if k:
            metrics[f"val_pass_at_{k}"] = float(sums[2] / max(float(sums[3]), 1.0))  # MLflow refuses "@"
        if not (dist.is_initialized() and dist.get_rank()):
            self._samples.append(self._write_samples(rows, metrics))
        return metrics

    def _write_samples(self, rows: list[tuple[Any, str, float]], metrics: dict[str, float]) -> Path:
        """A table of held-out prompts with their greedy completions and rewards, what people would rather
        look at than read about: ``OUTPUT_DIR/samples/step_NNNNNNN.html``."""
        step = self.context.step()
        summary = ", ".join(f"{name} {value:.3f}" for name, value in metrics.items()) + "; greedy completions"
        path = Path(self.config.trainer.output_dir) / "samples" / f"step_{step:07d}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        table = [{"prompt": prompt, "completion": text, "reward": reward} for prompt, text, reward in rows]
        write_text_atomically(path, html_table(f"Held-out samples at step {step}", summary, table))
        return path

    def artifacts(self) -> list[Path]:
        written, self._samples = self._samples, []
        return written

    def log_fields(self, metrics: dict[str, float]) -> str:
        reward = metrics["reward"]
        shown = f"{reward:.3f}" if math.isfinite(reward) else "n/a (none scored)"
        return f" | reward {shown} | len {metrics['completions/mean_length']:.1f}"


def _gathered(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every data-parallel rank, concatenated in rank order (``x`` itself in one process)."""
    return torch.cat(comm.all_gather(x, state.dp_group())) if state.dp_size() > 1 else x
