"""The language-model objective: next-token cross-entropy over the trained tokens (pretraining and SFT).

Pretraining trains every position; SFT only the response (or the assistant
turns), as the data set's loss mask says. The loss of a step is
token-weighted over the whole global batch: each micro-batch backpropagates
``sum(token losses x mask) / N`` with N the trained tokens of all
micro-batches and all data-parallel ranks, so gradient accumulation and the
DP layout change neither the gradients nor the logged loss.

The per-token loss is one method, :meth:`LMObjective.token_losses`: a
subclass that adds a term to it (z-loss, label smoothing) inherits the
masking, the normalisation, the metrics and the validation
(``docs/objectives.md`` has a worked example). Validation always reports the
cross-entropy and its perplexity, so runs with different training losses
stay comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

from ironcore import kernels
from ironcore.data.samples.batches import MicroBatch
from ironcore.objectives.base import Forward, Objective, StepResult, global_sum
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy


def lm_logits(forward: Forward, micro_batch: MicroBatch) -> torch.Tensor:
    """Vocab-parallel logits ``[B, T, V/tp]`` of a micro-batch (packed SFT samples bring positions and a mask)."""
    mb = micro_batch
    return forward(mb["input_ids"], mb.get("position_ids"), mb.get("attention_mask"), parallel_output=True)


@torch.no_grad()
def loss_sums(
    forward: Forward, batches: Iterable[list[MicroBatch]], autocast: AbstractContextManager | None = None
) -> tuple[float, float]:
    """(sum of the trained tokens' cross-entropy, number of trained tokens) over all micro-batches of this rank."""
    total, count = 0.0, 0.0
    for micro_batches in batches:
        for mb in micro_batches:
            with autocast or nullcontext():
                logits = lm_logits(forward, mb)
            total += float((vocab_parallel_cross_entropy(logits, mb["labels"]) * mb["loss_mask"]).sum())
            count += float(mb["loss_mask"].sum())
    return total, count


def perplexity(total: float, count: float) -> dict[str, float]:
    """``val_loss`` (mean cross-entropy per trained token) and ``val_ppl`` from the sums."""
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


class LMObjective(Objective):
    """Cross-entropy of the next token, over the tokens the loss mask trains."""

    task_types = ("pretrain", "sft")
    one_backward_per_micro_batch = True

    @property
    def fused_loss(self) -> bool:
        """The fused linear + cross-entropy applies: it is asked for and the token losses are the plain ones."""
        plain = type(self).token_losses is LMObjective.token_losses
        return plain and kernels.choice(self.config.model, "cross_entropy", self.device) != "torch"

    def token_losses(self, logits: torch.Tensor, micro_batch: MicroBatch) -> torch.Tensor:
        """Per-token losses ``[B, T]`` (fp32) from vocab-parallel logits; masking and normalisation come after."""
        return vocab_parallel_cross_entropy(logits, micro_batch["labels"])

    def backward(self, forward: Forward, micro_batches: list[MicroBatch]) -> StepResult:
        n_tokens = global_sum(sum(mb["loss_mask"].sum() for mb in micro_batches).float()).clamp(min=1.0)
        loss_sum = torch.zeros((), device=self.device)
        for mb in micro_batches:
            fused = self.fused_loss  # the model computes the masked sum, logits never whole (model.kernel_options)
            with self.autocast:
                out = forward(mb["input_ids"], mb.get("position_ids"), mb.get("attention_mask"), labels=mb["labels"],
                              loss_weights=mb["loss_mask"]) if fused else lm_logits(forward, mb)  # fmt: skip
            micro = out if fused else (self.token_losses(out, mb) * mb["loss_mask"]).sum()
            (micro / n_tokens).backward()
            loss_sum += micro.detach()
        loss = (global_sum(loss_sum) / n_tokens).item()
        return StepResult({"loss": loss}, int(n_tokens.item()))

    def evaluate(self, forward: Forward, batches: Iterable[list[MicroBatch]]) -> dict[str, float]:
        total, count = loss_sums(forward, batches, self.autocast)
        sums = global_sum(torch.tensor([total, count], dtype=torch.float64, device=self.device))
        return perplexity(*sums.tolist())
