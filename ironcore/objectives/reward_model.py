"""The reward-model objective: a scalar head trained on preference pairs (RLHF's first stage).

It reads the pairs DPO reads (``task_type: dpo``) and trains a model with
``model.score_head: true`` (HF's ``ForSequenceClassification`` with one
label). A sequence's reward ``r`` is the score at its last response token:
that position's label is the last trained token (the end of sequence the data
appends, or, for chat pairs, the newline a ChatML template writes after the
end of turn), so the score has seen the whole prompt and response. The loss is Bradley–Terry's,
as TRL's ``RewardTrainer.compute_loss`` writes it,

    loss = -log σ(r_chosen - r_rejected)  [+ c · (r_chosen + r_rejected)²]

where the optional second term (``center_rewards_coefficient``, TRL's
option of that name) keeps the rewards centred on zero. Metrics carry TRL's
names: ``accuracy`` (share of pairs with r_chosen > r_rejected), ``margin``
(mean r_chosen - r_rejected), ``min_reward``, ``mean_reward``, ``max_reward``.

Like every objective, the step's loss belongs to the whole global batch: each
micro-batch backpropagates its pairs' loss sum divided by the global pair
count. A trained reward model scores GRPO's completions through the built-in
reward function ``reward_model`` (:mod:`ironcore.rewards.model`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ironcore.config.base import InvalidValue, field
from ironcore.data.samples.batches import MicroBatch
from ironcore.data.samples.dpo import both_sides
from ironcore.objectives.base import Forward, Objective, ObjectiveContext, StepResult, global_sum
from ironcore.parallel import comm, state


@dataclass
class RewardModelOptions:
    """``trainer.objective_options`` of the reward_model objective (TRL ``RewardConfig`` names)."""

    center_rewards_coefficient: float | None = field(
        None, help="Weight of the mean squared sum of a pair's rewards added to the loss, keeping rewards "
        "centred on zero (TRL's option); null: not added.",
    )

    def validate(self) -> None:
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise InvalidValue("center_rewards_coefficient", f"must be >= 0, got {self.center_rewards_coefficient}")


def last_token_scores(scores: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Each row's score ``[B]`` at its last trained position (its last response token) from ``[B, T, 1]``."""
    positions = torch.arange(loss_mask.shape[1], device=loss_mask.device)
    last = torch.where(loss_mask > 0, positions, -1).amax(dim=1)
    if bool((last < 0).any()):
        raise ValueError("a sequence without response tokens has no reward position")
    return scores.squeeze(-1).gather(1, last[:, None]).squeeze(1)


def bradley_terry_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, center_rewards_coefficient: float | None = None
) -> torch.Tensor:
    """Per-pair losses ``[B]``: ``-log σ(r_c - r_r)`` plus the optional centring term (TRL's formula)."""
    losses = -F.logsigmoid(chosen - rejected)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


class RewardModelObjective(Objective):
    """Bradley–Terry reward modelling on preference pairs, with TRL ``RewardTrainer``'s metrics."""

    sequences_per_sample = 2  # a (chosen, rejected) pair
    task_types = ("dpo",)
    one_backward_per_micro_batch = True
    score_head = True
    Options = RewardModelOptions

    def __init__(self, context: ObjectiveContext, options: RewardModelOptions | None = None) -> None:
        super().__init__(context, options or RewardModelOptions())

    def rewards(self, forward: Forward, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen and rejected rewards ``[B]`` of a pair micro-batch, in one forward pass of both sides."""
        with self.autocast:
            scores = forward(both_sides(mb, "input_ids"), both_sides(mb, "position_ids"), None)
        rewards = last_token_scores(scores.float(), both_sides(mb, "loss_mask"))
        chosen, rejected = rewards.chunk(2)
        return chosen, rejected

    def _sums(self, chosen: torch.Tensor, rejected: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Loss, correct pairs, margin and reward sums, pairs; then -min and max reward (see :meth:`_metrics`)."""
        both = torch.cat([chosen, rejected]).detach()
        return torch.stack([
            losses.sum().detach(), (chosen > rejected).sum(), (chosen - rejected).sum().detach(), both.sum(),
            torch.tensor(len(chosen), device=both.device), -both.min(), both.max(),
        ]).double()

    def backward(self, forward: Forward, micro_batches: list[MicroBatch]) -> StepResult:
        pairs = global_sum(torch.tensor([float(sum(len(mb["chosen_input_ids"]) for mb in micro_batches))],
                                        device=self.device))[0]
        sums = []
        for mb in micro_batches:
            chosen, rejected = self.rewards(forward, mb)
            losses = bradley_terry_losses(chosen, rejected, self.options.center_rewards_coefficient)
            (losses.sum() / pairs).backward()
            sums.append(self._sums(chosen, rejected, losses))
        tokens = sum(float(mb["chosen_loss_mask"].sum() + mb["rejected_loss_mask"].sum()) for mb in micro_batches)
        metrics, tokens = self._metrics(torch.stack(sums), tokens)
        return StepResult(metrics, tokens)

    @torch.no_grad()
    def evaluate(self, forward: Forward, batches: Iterable[list[MicroBatch]]) -> dict[str, float]:
        """The loss and TRL's metrics over ``batches``, each name prefixed with ``val_``."""
        sums = []
        for micro_batches in batches:
            for mb in micro_batches:
                chosen, rejected = self.rewards(forward, mb)
                losses = bradley_terry_losses(chosen, rejected, self.options.center_rewards_coefficient)
                sums.append(self._sums(chosen, rejected, losses))
        metrics, _ = self._metrics(torch.stack(sums) if sums else torch.zeros(0, 7, dtype=torch.float64), 0.0)
        return {f"val_{name}": value for name, value in metrics.items()}

    def _metrics(self, sums: torch.Tensor, tokens: float) -> tuple[dict[str, float], int]:
        """Metrics of the whole global batch from this rank's per-micro-batch sums ``[M, 7]``."""
        totals = torch.cat([sums[:, :5].sum(0), torch.tensor([float(tokens)], dtype=torch.float64)])
        extremes = sums[:, 5:].amax(0) if len(sums) else torch.full((2,), -torch.inf, dtype=torch.float64)
        totals = global_sum(totals.to(self.device))
        extremes = comm.all_reduce(extremes.to(self.device), state.dp_group(), op="max")
        loss, correct, margin, reward, pairs, tokens = totals.tolist()
        n = max(pairs, 1.0)
        return {
            "loss": loss / n,
            "accuracy": correct / n,
            "margin": margin / n,
            "min_reward": -extremes[0].item(),
            "mean_reward": reward / (2 * n),
            "max_reward": extremes[1].item(),
        }, int(tokens)

    def log_fields(self, metrics: dict[str, float]) -> str:
        return f" | acc {metrics['accuracy']:.2f} | margin {metrics['margin']:.3f}"
