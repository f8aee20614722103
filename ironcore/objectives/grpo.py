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

from dataclasses import dataclass
from typing import Literal

import torch

from ironcore.config.base import InvalidValue, field


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
        512, help="Most tokens a completion may have; also dr_grpo's constant normaliser."
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
    num_iterations: int = field(1, help="Optimizer steps on each generated batch (PPO's mu).")
    mask_truncated_completions: bool = field(
        False, help="Leave completions that hit max_completion_length (no EOS) out of the loss."
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
    is_std_zero: torch.Tensor  # bool; its mean is TRL's frac_reward_zero_std


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> Advantages:
    """Advantages of the global batch's rewards ``[N]``, in groups of ``num_generations`` consecutive ones.

    A NaN reward (no reward function could score the completion) is left out
    of its group's mean and std and gets advantage 0: it must not move the
    policy. So does a whole group whose std is NaN (one scored completion).
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
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
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
