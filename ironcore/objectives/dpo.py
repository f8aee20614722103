"""The DPO objective: preference losses, response log-probs, and the frozen reference's log-probs.

Notation and formulas follow TRL's ``DPOTrainer.dpo_loss``. For a pair
(prompt x, chosen y_w, rejected y_l), ``log π(y | x)`` is the *sum* of the
response tokens' log-probabilities: the data pipeline's loss masks select
them, so the prompt (and padding) is never scored. With

    logits = (log π(y_w) - log π(y_l)) - (log π_ref(y_w) - log π_ref(y_l))

* ``sigmoid``: ``-(1 - ε) log σ(β·logits) - ε log σ(-β·logits)`` — DPO; ε =
  ``label_smoothing`` > 0 is conservative DPO (labels flipped with prob. ε);
* ``ipo``: ``(logits - 1/(2β))²`` where every log-prob (policy and reference)
  is first divided by its response length, as TRL does — IPO's square would
  otherwise grow with the response length;
* ``hinge``: ``max(0, 1 - β·logits)`` (RSO).

``rewards/chosen = β (log π(y_w) - log π_ref(y_w))`` and ``rewards/rejected``
likewise; ``rewards/accuracies`` is the share of pairs whose chosen reward is
the larger, ``rewards/margins`` the mean difference, ``logps/*`` the policy's
mean log-probs (length-normalised for ipo, like the loss sees them). The
optional SFT term (``sft_weight``, TRL's ``rpo_alpha``) adds the mean NLL
of the chosen responses' tokens.

Normalisation follows the objectives' contract that the step loss belongs to the
whole global batch: each micro-batch backpropagates ``sum(pair losses) /
N_pairs`` (N_pairs over all micro-batches and DP ranks) and the SFT term
``sum(chosen NLL) / N_chosen_tokens``; DP gradients are summed. So gradient
accumulation and the DP layout change neither gradients nor logged metrics.

Options (:class:`DPOOptions`) are ``trainer.objective_options``, as for every
objective. The reference is the policy's *starting* weights (``init.init_from``,
else the seed's initialisation — also on resume). ``reference: live`` keeps a
frozen copy and runs it on every micro-batch; ``precomputed`` runs it once per
split before training and caches the log-probs beside the shards in
``reference_logps/SPLIT-KEY.npy``, where KEY hashes the data set's
fingerprint, the sequence length, the model config, the precision and the
reference weights (the bytes of the init_from files, or the seed). Pairs are
padded to the same length either way, so both give the same numbers; the
precomputed one saves a forward pass per step and the reference's memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ironcore.checkpoints.load import weight_files
from ironcore.config.base import InvalidValue, field, to_dict
from ironcore.config.model import ModelConfig
from ironcore.data.samples.batches import MicroBatch
from ironcore.data.samples.dpo import both_sides
from ironcore.objectives.base import (
    Forward,
    MemoryShape,
    Objective,
    ObjectiveContext,
    StepResult,
    frozen_reference,
    global_sum,
)
from ironcore.parallel import state
from ironcore.parallel.cross_entropy import vocab_parallel_token_logps

log = logging.getLogger(__name__)

REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")
CACHE_DIR = "reference_logps"


@dataclass
class DPOOptions:
    """``trainer.objective_options`` of the dpo objective (TRL ``DPOConfig`` names where TRL has the option)."""

    loss_type: Literal["sigmoid", "ipo", "hinge"] = field(
        "sigmoid",
        help="sigmoid (DPO; conservative DPO with label_smoothing), ipo (on length-normalised log-probs) "
        "or hinge (RSO); TRL's formulas.",
    )
    beta: float = field(0.1, help="Temperature: how far the policy may move from the reference (IPO's tau).")
    label_smoothing: float = field(
        0.0, help="sigmoid only: probability that a preference label is flipped (conservative DPO), in [0, 0.5)."
    )
    sft_weight: float = field(
        0.0, help="Weight of an added SFT term: the mean NLL of the chosen responses' tokens (TRL's rpo_alpha)."
    )
    reference: Literal["live", "precomputed"] = field(
        "live",
        help="live: a frozen copy of the starting weights runs beside the policy; precomputed: its log-probs "
        "are computed once and cached beside the shards (same numbers, no second model while training).",
    )

    def validate(self) -> None:
        if self.beta <= 0:
            raise InvalidValue("beta", f"must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise InvalidValue("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise InvalidValue("label_smoothing", f"only the sigmoid loss uses it, not {self.loss_type}")
        if self.sft_weight < 0:
            raise InvalidValue("sft_weight", f"must be >= 0, got {self.sft_weight}")


# ---- log-probs and losses --------------------------------------------------------------------------------


def response_logps(
    forward: Forward, mb: MicroBatch, autocast: AbstractContextManager
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs ``[B]`` of the chosen and the rejected responses of a pair micro-batch.

    Both sides go through one forward pass (``[2B, T]``), like TRL's
    concatenated forward: one launch of every kernel instead of two. The
    token log-probs are taken in chunks (no fp32 log-softmax of all the logits).
    """
    with autocast:
        logits = forward(both_sides(mb, "input_ids"), both_sides(mb, "position_ids"), None, parallel_output=True)
    token_logps, _ = vocab_parallel_token_logps(logits, both_sides(mb, "labels"))
    logps = (token_logps * both_sides(mb, "loss_mask")).sum(-1)
    chosen, rejected = logps.chunk(2)
    return chosen, rejected


def preference_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair losses ``[B]`` from the four log-probs (already length-normalised for ipo)."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


@dataclass
class PairTerms:
    """Per-pair quantities ``[B]`` of one micro-batch."""

    losses: torch.Tensor  # preference loss (carries the gradient)
    chosen_nll: torch.Tensor  # summed NLL of the chosen response's tokens (carries the gradient)
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor  # as the loss sees them (length-normalised for ipo)
    rejected_logps: torch.Tensor

    def sums(self) -> torch.Tensor:
        """The sums the metrics are built from, detached, in :data:`_SUMS` order."""
        return torch.stack([
            self.losses.sum(), self.chosen_nll.sum(), self.chosen_rewards.sum(), self.rejected_rewards.sum(),
            (self.chosen_rewards > self.rejected_rewards).float().sum(), self.chosen_logps.sum(),
            self.rejected_logps.sum(),
        ]).detach().double()


class DPOObjective(Objective):
    """Direct preference optimisation: per-pair terms, global-batch normalisation, TRL's metrics."""

    sequences_per_sample = 2  # a (chosen, rejected) pair
    task_types = ("dpo",)
    one_backward_per_micro_batch = True
    Options = DPOOptions

    def __init__(self, context: ObjectiveContext, options: DPOOptions | None = None) -> None:
        super().__init__(context, options or DPOOptions())
        # Live: the frozen reference runs beside the policy. Precomputed: built in prepare() only when a
        # split's log-probs are not cached yet, and dropped once they are.
        self.reference: torch.nn.Module | None = self._reference() if self.options.reference == "live" else None

    def _reference(self) -> torch.nn.Module:
        if not self.config.init.init_from:
            log.warning("DPO without init.init_from: policy and reference start from random weights")
        return frozen_reference(self.context)

    def prepare(self, datasets: dict[str, torch.utils.data.Dataset]) -> dict[str, torch.utils.data.Dataset]:
        """Precomputed reference: each split's pairs with their cached reference log-probs."""
        if self.options.reference == "live":
            return datasets
        cfg = self.config
        key = reference_cache_key(self.context.metadata, self.context.seq_len, cfg.model, cfg.trainer.precision,
                                  cfg.init.init_from, cfg.init.seed)
        prepared = {}
        reference = None
        for split, pairs in datasets.items():
            cache = self.context.data_dir / CACHE_DIR / f"{split}-{key}.npy"
            logps = read_reference_logps(cache, len(pairs))
            if logps is None:
                if reference is None:
                    reference = self._reference()
                logps = compute_reference_logps(pairs, reference, cfg.trainer.micro_batch_size, self.autocast)
                write_reference_logps(cache, logps)
            prepared[split] = WithReferenceLogps(pairs, logps)
        return prepared

    def terms(self, forward: Forward, mb: MicroBatch) -> PairTerms:
        opts = self.options
        if self.reference is None:
            ref_chosen, ref_rejected = (mb[key] for key in REFERENCE_KEYS)
        else:  # first: its logits come and go before the policy's activations are held
            with torch.no_grad():
                ref_chosen, ref_rejected = response_logps(self.reference, mb, self.autocast)
        chosen, rejected = response_logps(forward, mb, self.autocast)
        chosen_nll = -chosen
        if opts.loss_type == "ipo":
            chosen_len, rejected_len = mb["chosen_loss_mask"].sum(-1), mb["rejected_loss_mask"].sum(-1)
            chosen, ref_chosen = chosen / chosen_len, ref_chosen / chosen_len
            rejected, ref_rejected = rejected / rejected_len, ref_rejected / rejected_len
        losses = preference_losses(
            chosen, rejected, ref_chosen, ref_rejected, opts.loss_type, opts.beta, opts.label_smoothing
        )
        return PairTerms(
            losses=losses,
            chosen_nll=chosen_nll,
            chosen_rewards=opts.beta * (chosen - ref_chosen).detach(),
            rejected_rewards=opts.beta * (rejected - ref_rejected).detach(),
            chosen_logps=chosen.detach(),
            rejected_logps=rejected.detach(),
        )

    def backward(self, forward: Forward, micro_batches: list[MicroBatch]) -> StepResult:
        n_pairs, n_chosen, n_tokens = self._counts(micro_batches)
        sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            terms = self.terms(forward, mb)
            loss = terms.losses.sum() / n_pairs
            if self.options.sft_weight:
                loss = loss + self.options.sft_weight * terms.chosen_nll.sum() / n_chosen
            loss.backward()
            sums += terms.sums()
        sums = global_sum(sums)
        return StepResult(self._metrics(sums, n_pairs.item(), n_chosen.item()), int(n_tokens.item()))

    @torch.no_grad()
    def evaluate(self, forward: Forward, batches: Iterable[list[MicroBatch]]) -> dict[str, float]:
        """The loss and reward metrics over ``batches``, each name prefixed with ``val_`` (``val_loss``, …)."""
        sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=self.device)
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)  # pairs, chosen tokens
        for micro_batches in batches:
            for mb in micro_batches:
                sums += self.terms(forward, mb).sums()
                counts += torch.stack([self._pairs(mb), mb["chosen_loss_mask"].sum()]).double()
        sums, counts = global_sum(torch.cat([sums, counts])).split([len(_SUMS), 2])
        metrics = self._metrics(sums, max(counts[0].item(), 1.0), max(counts[1].item(), 1.0))
        return {f"val_{name}": value for name, value in metrics.items()}

    def memory_shape(self) -> MemoryShape:
        live = self.reference is not None and self.config.model.lora is None  # LoRA's reference: adapters off
        return MemoryShape(rows_per_sample=2, reference=live)

    def log_fields(self, metrics: dict[str, float]) -> str:
        return f" | acc {metrics['rewards/accuracies']:.2f} | margin {metrics['rewards/margins']:.3f}"

    def _counts(self, micro_batches: list[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs, chosen response tokens and all response tokens of the global batch (over DP)."""
        counts = torch.zeros(3, device=self.device)
        for mb in micro_batches:
            chosen, rejected = mb["chosen_loss_mask"].sum(), mb["rejected_loss_mask"].sum()
            counts += torch.stack([self._pairs(mb), chosen, chosen + rejected])
        counts = global_sum(counts).clamp(min=1.0)
        return counts[0], counts[1], counts[2]

    def _metrics(self, sums: torch.Tensor, n_pairs: float, n_chosen: float) -> dict[str, float]:
        s = dict(zip(_SUMS, sums.tolist(), strict=True))
        nll = s["chosen_nll"] / n_chosen
        metrics = {"loss": s["losses"] / n_pairs + self.options.sft_weight * nll}
        if self.options.sft_weight:
            metrics["nll_loss"] = nll
        return metrics | {
            "rewards/chosen": s["chosen_rewards"] / n_pairs,
            "rewards/rejected": s["rejected_rewards"] / n_pairs,
            "rewards/accuracies": s["correct"] / n_pairs,
            "rewards/margins": (s["chosen_rewards"] - s["rejected_rewards"]) / n_pairs,
            "logps/chosen": s["chosen_logps"] / n_pairs,
            "logps/rejected": s["rejected_logps"] / n_pairs,
        }

    def _pairs(self, mb: MicroBatch) -> torch.Tensor:
        return torch.tensor(float(len(mb["chosen_loss_mask"])), device=self.device)


_SUMS = ("losses", "chosen_nll", "chosen_rewards", "rejected_rewards", "correct", "chosen_logps", "rejected_logps")


# ---- precomputed reference log-probs ---------------------------------------------------------------------


class WithReferenceLogps(torch.utils.data.Dataset):
    """A pair data set whose samples also carry the reference's summed log-probs (``REFERENCE_KEYS``)."""

    def __init__(self, pairs: torch.utils.data.Dataset, logps: np.ndarray) -> None:
        if logps.shape != (len(pairs), 2):
            raise ValueError(f"reference log-probs of shape {logps.shape} for {len(pairs)} pairs")
        self.pairs, self.logps = pairs, torch.from_numpy(logps)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        chosen, rejected = self.logps[index]
        return {**self.pairs[index], REFERENCE_KEYS[0]: chosen, REFERENCE_KEYS[1]: rejected}


def reference_cache_key(
    metadata: dict[str, Any],
    seq_len: int,
    model: ModelConfig,
    precision: str,
    init_from: str | None,
    seed: int,
) -> str:
    """What the cached log-probs depend on: data, sequence length, architecture, precision, reference weights."""
    weights = {"checkpoint": _weights_digest(init_from)} if init_from else {"seed": seed}
    parts = {"data": metadata.get("fingerprint"), "seq_len": seq_len, "model": to_dict(model),
             "precision": precision, "reference": weights}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _weights_digest(source: str) -> str:
    """Hash of the bytes of the files that hold a model's architecture and weights."""
    digest = hashlib.blake2b()
    for file in weight_files(source):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def read_reference_logps(cache_file: Path, num_pairs: int) -> np.ndarray | None:
    """The cached log-probs ``[num_pairs, 2]``, or None when there are none (or they are damaged or of another
    size)."""
    try:  # a damaged cache is recomputed like a missing one
        logps = np.load(cache_file)
    except (OSError, ValueError, EOFError):
        return None
    return logps if logps.shape == (num_pairs, 2) else None


def write_reference_logps(cache_file: Path, logps: np.ndarray) -> None:
    """Rank 0 writes the cache atomically (every rank computed the same gathered array)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, logps)
    os.replace(tmp, cache_file)
    log.info("cached reference log-probs of %d pairs in %s", len(logps), cache_file)


@torch.no_grad()
def compute_reference_logps(
    pairs: torch.utils.data.Dataset, reference: torch.nn.Module, batch_size: int, autocast: AbstractContextManager
) -> np.ndarray:
    """Summed reference log-probs ``[N, 2]`` (chosen, rejected) of every pair, float32 like the live path."""
    device = next(reference.parameters()).device
    share = -(-len(pairs) // state.dp_size())
    start = state.dp_rank() * share
    mine = range(start, min(start + share, len(pairs)))
    values = []
    for first in range(mine.start, mine.stop, batch_size):
        samples = [pairs[i] for i in range(first, min(first + batch_size, mine.stop))]
        mb = {key: torch.stack([s[key] for s in samples]).to(device) for key in samples[0]}
        values.append(torch.stack(response_logps(reference, mb, autocast), dim=-1).float().cpu())
    local = torch.cat(values).numpy() if values else np.zeros((0, 2), np.float32)
    if not dist.is_initialized():
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (start, local))
    logps = np.zeros((len(pairs), 2), np.float32)
    for offset, block in gathered:  # the TP ranks of a DP group send the same block
        logps[offset : offset + len(block)] = block
    return logps
