"""The training loop for pretraining, SFT and DPO.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on every
data-parallel rank. The loss of a step is token-weighted over the whole global
batch: each micro-batch contributes ``sum(token losses * mask) / N`` where N
is the number of trained tokens in the global batch (all micro-batches, all DP
ranks), and DP gradients are summed. So gradient accumulation and the DP
layout change neither the gradients nor the logged loss. DPO data (task type
``dpo``) swaps in :class:`~ironcore.dpo.DPOObjective`, which normalises the
same way by the pairs of the global batch; the rest of the step is shared.

A run writes into ``trainer.output_dir``: ``config.yaml`` (resolved),
``metrics.jsonl`` and ``checkpoints/step_NNNNNNN/`` with a ``latest`` pointer;
it resumes from ``latest`` automatically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ironcore import __version__, checkpoint
from ironcore.config import Config, dump_config, to_dict
from ironcore.config.data import load_data_config
from ironcore.data.batches import StepBatches, build_dataset
from ironcore.data.metadata import load_metadata
from ironcore.dpo import CACHE_DIR, DPOObjective, reference_cache_key, with_reference_logps
from ironcore.errors import ConfigError, UserError
from ironcore.evaluate import loss_sums, summarize, token_losses
from ironcore.hf import load_hf_model
from ironcore.models import TransformerModel
from ironcore.models.stats import model_stats
from ironcore.optim import build_optimizer, learning_rate, step_with_scaled_grads, total_steps
from ironcore.parallel import comm, state
from ironcore.parallel.grad import clip_factor, finalize_grads, grad_norm
from ironcore.parallel.setup import init_parallel
from ironcore.parallel.sharding import (
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
    load_full_state_dict,
)
from ironcore.perf import peak_flops, retain_freed_host_memory
from ironcore.tracking import Tracker, git_tags

log = logging.getLogger("ironcore.train")


class TrainingStopped(UserError):
    """Training stopped early (too many non-finite steps, or a signal); a checkpoint was saved."""


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped ones included)
    consumed_samples: int = 0  # global samples drawn from the training data
    tokens: int = 0  # trained (loss-mask) tokens seen
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient


class Trainer:
    """Builds model, optimizer, data and tracking from a Config, then :meth:`train` runs the loop."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # Process groups first: the layers read the TP layout when they are built.
        self.ctx = init_parallel(cfg.trainer.tensor_model_parallel_size, cfg.model, cfg.trainer.device)
        self.device = self.ctx.device
        if cfg.trainer.retain_host_memory and self.device.type == "cpu":
            retain_freed_host_memory()  # before the model exists, so its first allocations already follow it
        self.rank, self.world_size = self.ctx.rank, self.ctx.world_size
        self.dp_rank, self.dp_size = self.ctx.dp_rank, self.ctx.dp_size
        self.is_main = self.ctx.is_main
        self.out_dir = Path(cfg.trainer.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.state = TrainState()
        self._stop_signal: int | None = None

        self.data_cfg = load_data_config(cfg.data.config_path) if cfg.data.config_path else None
        if self.data_cfg is None:
            raise ConfigError("data.config_path: a training run needs a data config (configs/data/*.yaml)")
        self.metadata = load_metadata(self.data_cfg.output_dir)
        self.task_type = self.metadata["task_type"]
        check_data_fits_model(self.metadata, cfg, self.data_cfg.output_dir)
        self.seq_len = self.data_cfg.max_seq_length

        torch.manual_seed(cfg.init.seed)
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if cfg.trainer.precision == "bf16"
            else nullcontext()
        )
        reference = self._build_reference() if self.task_type == "dpo" else None
        self.train_data = self._batches("train", shuffle=True, reference=reference)
        self.valid_data = (
            self._batches("valid", shuffle=False, reference=reference) if self.metadata["splits"].get("valid") else None
        )
        self.dpo: DPOObjective | None = None
        if self.task_type == "dpo":
            live = reference if cfg.dpo.reference == "live" else None  # precomputed: the model is dropped here
            self.dpo = DPOObjective(cfg.dpo, live, self.device)
        sequences_per_sample = 2 if self.dpo is not None else 1  # a DPO sample is a (chosen, rejected) pair
        self.tokens_per_step = cfg.trainer.train_batch_size * self.seq_len * sequences_per_sample
        self.total_steps = total_steps(cfg.operation, self.tokens_per_step)
        self.flops_per_token = model_stats(cfg.model, self.seq_len).train_flops_per_token
        self.peak = peak_flops(self.device, cfg.trainer.precision, cfg.trainer.peak_tflops)
        self.forward = torch.compile(self.model) if cfg.trainer.compile else self.model
        self.tracker: Tracker | None = None

    # ---- set-up -----------------------------------------------------------------------------------------
    def _build_model(self) -> TransformerModel:
        model = TransformerModel(self.cfg.model)
        init_from = self.cfg.init.init_from
        if init_from and not self._latest_exists():
            try:
                load_full_state_dict(model, load_initial_weights(init_from))
            except UserError as err:
                raise UserError(f"init.init_from {init_from}: {err}") from None
        if self.cfg.trainer.activation_checkpointing:
            apply_activation_checkpointing(model)
        return model.to(self.device)

    def _build_reference(self) -> TransformerModel:
        """DPO's frozen reference: the run's starting weights, also when the policy resumes from a checkpoint.

        That is ``init.init_from`` when set, else the seed's initialisation
        (rebuilt under a forked RNG so the policy's random streams are untouched).
        """
        cfg = self.cfg
        if not cfg.init.init_from:
            log.warning("DPO without init.init_from: policy and reference start from random weights")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init.seed)
            reference = TransformerModel(cfg.model)
        if cfg.init.init_from:
            try:
                load_full_state_dict(reference, load_initial_weights(cfg.init.init_from))
            except UserError as err:
                raise UserError(f"init.init_from {cfg.init.init_from}: {err}") from None
        return reference.requires_grad_(False).eval().to(self.device)

    def _batches(self, split: str, shuffle: bool, reference: TransformerModel | None = None) -> StepBatches:
        cfg = self.cfg
        dataset = build_dataset(
            self.data_cfg.output_dir, self.metadata, split, self.seq_len, cfg.init.seed, cfg.data.packing
        )
        if reference is not None and cfg.dpo.reference == "precomputed":
            key = reference_cache_key(self.metadata, self.seq_len, cfg.model, cfg.trainer.precision,
                                      cfg.init.init_from, cfg.init.seed)
            cache = Path(self.data_cfg.output_dir) / CACHE_DIR / f"{split}-{key}.npy"
            dataset = with_reference_logps(dataset, reference, cache, cfg.trainer.micro_batch_size, self.autocast)
        return StepBatches(
            dataset, cfg.trainer.train_batch_size, cfg.trainer.micro_batch_size, self.dp_rank, self.dp_size,
            cfg.init.seed, shuffle, self.device,
        )

    def _latest_exists(self) -> bool:
        return (self.ckpt_dir / checkpoint.LATEST).is_file()

    def _start_tracking(self) -> Tracker:
        cfg = self.cfg
        tags = {
            **git_tags(),
            "ironcore_version": __version__,
            "task_type": self.task_type,
            "model_name": cfg.model.name,
            "tensor_parallel_size": str(cfg.trainer.tensor_model_parallel_size),
            "data_parallel_size": str(self.dp_size),
            "world_size": str(self.world_size),
        }
        run_name = cfg.utils.run_name or self.out_dir.name
        return Tracker(self.is_main and cfg.utils.tracking, cfg.utils.experiment_name, run_name, to_dict(cfg), tags)

    # ---- the loop ---------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run (or resume) to the last step; returns the final validation metrics."""
        cfg = self.cfg
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_config(cfg))
        resumed = self._resume()
        self.tracker = self._start_tracking()
        self.tracker.log_artifact(self.out_dir / "config.yaml")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        status = "FAILED"
        try:
            if resumed and self.is_main:
                log.info("resumed from %s at step %d", resumed, self.state.step)
            self._loop()
            final = self.evaluate() if self.valid_data is not None else {}
            if final:
                self._write_metrics({"step": self.state.step, **final})
                self._track(final, self.state.step)
            self.save()
            if self.is_main and final:
                (self.out_dir / "final_eval.json").write_text(json.dumps({"step": self.state.step, **final}, indent=2))
                self.tracker.log_artifact(self.out_dir / "final_eval.json")
            status = "FINISHED"
            return final
        except TrainingStopped:
            status = "KILLED" if self._stop_signal is not None else "FAILED"
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.tracker.finish(status)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Finish the current step, then save and stop (see _loop): never stop mid-update.
        self._stop_signal = signum

    def _loop(self) -> None:
        cfg, op = self.cfg, self.cfg.operation
        window_start, window_tokens = time.perf_counter(), 0
        run_start = time.perf_counter()
        start_step = self.state.step
        consecutive_bad = 0
        while self.state.step < self.total_steps:
            metrics = self.train_step()
            window_tokens += self.tokens_per_step
            if metrics is None:
                consecutive_bad += 1
                if consecutive_bad >= cfg.trainer.max_consecutive_skips:
                    self.save()
                    raise TrainingStopped(
                        f"stopped at step {self.state.step}: {consecutive_bad} steps in a row had a non-finite "
                        f"loss or gradient; the last good state is saved in {self.ckpt_dir}"
                    )
            else:
                consecutive_bad = 0
            step = self.state.step
            if metrics is not None and (step % op.log_interval == 0 or step == self.total_steps):
                elapsed = time.perf_counter() - window_start
                tokens_per_sec = window_tokens / max(elapsed, 1e-9)
                metrics.update(
                    tokens_per_sec=tokens_per_sec,
                    mfu=tokens_per_sec * self.flops_per_token / (self.peak * self.world_size),
                )
                self._log_line(metrics, time.perf_counter() - run_start, step - start_step)
                self._write_metrics({"step": step, **metrics, "skipped_steps": self.state.skipped_steps})
                self._track(metrics, step)
                window_start, window_tokens = time.perf_counter(), 0
            if self.valid_data is not None and op.eval_interval and step % op.eval_interval == 0 and step < self.total_steps:
                result = self.evaluate()
                self._write_metrics({"step": step, **result})
                self._track(result, step)
                window_start = time.perf_counter()
            if cfg.trainer.save_interval and step % cfg.trainer.save_interval == 0 and step < self.total_steps:
                self.save()
            if self._stop_requested():
                self.save()
                raise TrainingStopped(
                    f"stopped by signal {signal.Signals(self._stop_signal or signal.SIGTERM).name} at step {step}; "
                    f"checkpoint saved in {self.ckpt_dir}, rerun to resume"
                )

    def _stop_requested(self) -> bool:
        """Did any rank get SIGTERM/SIGINT? All ranks must agree, since saving is collective."""
        if not dist.is_initialized():
            return self._stop_signal is not None
        flag = torch.tensor([self._stop_signal or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return bool(flag.item())

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; returns its metrics, or None when it was skipped (non-finite)."""
        cfg = self.cfg
        self.model.train()
        micro_batches = self.train_data.step(self.state.consumed_samples)
        if self.dpo is not None:
            metrics, n_tokens = self.dpo.backward(self.forward, micro_batches, self.autocast)
        else:
            metrics, n_tokens = self._lm_backward(micro_batches)
        finalize_grads(self.model, dp_reduction="sum")  # the only gradient communication of the step
        loss = metrics["loss"]
        norm = grad_norm(self.model).item()
        lr = learning_rate(self.state.step, self.total_steps, cfg.optim)
        self.state.step += 1
        self.state.consumed_samples += cfg.trainer.train_batch_size
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): step skipped",
                        self.state.step, loss, norm)
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_with_scaled_grads(self.optimizer, clip_factor(norm, cfg.trainer.grad_clip))  # clipping
        self.optimizer.zero_grad(set_to_none=True)
        self.state.tokens += n_tokens
        return {**metrics, "lr": lr, "grad_norm": norm}

    def _lm_backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, float], int]:
        """Pretrain/SFT: backpropagate the token-weighted loss of the global batch; its loss and trained tokens."""
        # The trained tokens of the whole global batch (all micro-batches, all DP ranks) normalise the loss.
        n_tokens = comm.all_reduce(sum(mb["loss_mask"].sum() for mb in micro_batches).float(), state.dp_group())
        n_tokens = n_tokens.clamp(min=1.0)
        loss_sum = torch.zeros((), device=self.device)
        for mb in micro_batches:
            with self.autocast:
                logits = self.forward(
                    mb["input_ids"], mb.get("position_ids"), mb.get("attention_mask"), parallel_output=True
                )
            micro = (token_losses(logits, mb["labels"]) * mb["loss_mask"]).sum()
            (micro / n_tokens).backward()
            loss_sum += micro.detach()
        loss = (comm.all_reduce(loss_sum, state.dp_group()) / n_tokens).item()
        return {"loss": loss}, int(n_tokens.item())

    def evaluate(self) -> dict[str, float]:
        """Validation metrics over ``operation.eval_steps`` global batches.

        Pretrain/SFT: the token-weighted loss and its perplexity; DPO: the
        loss and reward metrics, ``val_``-prefixed.
        """
        self.model.eval()
        if self.dpo is not None:
            result = self.dpo.evaluate(
                self.forward, self.valid_data.eval_steps(self.cfg.operation.eval_steps), self.autocast
            )
            self.model.train()
            return result
        total, count = loss_sums(self.forward, self.valid_data.eval_steps(self.cfg.operation.eval_steps), self.autocast)
        self.model.train()
        sums = comm.all_reduce(torch.tensor([total, count], dtype=torch.float64, device=self.device), state.dp_group())
        return summarize(*sums.tolist())

    # ---- output -----------------------------------------------------------------------------------------
    def _log_line(self, m: dict[str, float], elapsed: float, steps_done: int) -> None:
        if not self.is_main:
            return
        remaining = (self.total_steps - self.state.step) * elapsed / max(steps_done, 1)
        print(
            f"step {self.state.step:>{len(str(self.total_steps))}}/{self.total_steps} | loss {m['loss']:.4f} | "
            f"lr {m['lr']:.2e} | grad {m['grad_norm']:.3f} | {m['tokens_per_sec']:,.0f} tok/s | "
            f"MFU {m['mfu']:.1%} | {_clock(elapsed)} elapsed | ETA {_clock(remaining)}"
            + (f" | acc {m['rewards/accuracies']:.2f} | margin {m['rewards/margins']:.3f}"
               if "rewards/margins" in m else ""),
            flush=True,
        )

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _track(self, metrics: dict[str, float], step: int) -> None:
        names = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                 "tokens_per_sec": "train/tokens_per_sec", "mfu": "train/mfu", "val_loss": "val/loss",
                 "val_ppl": "val/ppl", "nll_loss": "train/nll_loss", "val_nll_loss": "val/nll_loss"}
        tracked = {names[k]: v for k, v in metrics.items() if k in names}
        for key, value in metrics.items():
            if "/" in key:  # DPO metrics keep TRL's names (rewards/chosen, …); validation ones go under val/
                tracked[f"val/{key.removeprefix('val_')}" if key.startswith("val_") else key] = value
        self.tracker.log_metrics(tracked, step)
        self.tracker.flush()

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write checkpoints/step_NNNNNNN atomically, then move ``latest`` to it, then prune old ones.

        Collective: every rank takes part in gathering the full (TP=1) tensors
        and its RNG state; rank 0 writes.
        """
        folder = checkpoint.step_dir(self.ckpt_dir, self.state.step)
        if self._latest_exists() and checkpoint.resolve(self.ckpt_dir) == folder:
            return folder  # this step is already saved
        weights = full_state_dict(self.model)
        optimizer = full_optimizer_state(self.model, self.optimizer)
        rngs = gather_objects(rng_states())
        if self.is_main:

            def write(tmp: Path) -> None:
                checkpoint.write_model_files(tmp, weights, self.cfg.model)
                torch.save(optimizer, tmp / checkpoint.OPTIMIZER)
                torch.save(rngs, tmp / checkpoint.RNG)
                (tmp / checkpoint.TRAINER_STATE).write_text(json.dumps(dataclasses.asdict(self.state), indent=2) + "\n")
                (tmp / "config.yaml").write_text(dump_config(self.cfg))
                checkpoint.copy_tokenizer(self.data_cfg.output_dir, tmp)

            checkpoint.write_atomically(folder, write)
            checkpoint.update_latest(self.ckpt_dir, folder)
            checkpoint.prune(self.ckpt_dir, self.cfg.trainer.keep_last_checkpoints)
        barrier()
        return folder

    def _resume(self) -> Path | None:
        """Load the ``latest`` checkpoint, whatever TP/DP layout wrote it (tensors are stored full)."""
        if not self._latest_exists():
            return None
        folder = checkpoint.resolve(self.ckpt_dir)
        load_full_state_dict(self.model, checkpoint.load_model_state(folder, self.device)[1])
        optimizer = torch.load(folder / checkpoint.OPTIMIZER, map_location=self.device, weights_only=True)
        load_full_optimizer_state(self.model, self.optimizer, optimizer)
        self.state = TrainState(**json.loads((folder / checkpoint.TRAINER_STATE).read_text()))
        rngs = torch.load(folder / checkpoint.RNG, weights_only=False)
        set_rng_states(rngs[self.rank % len(rngs)])  # a resized world reuses the saved states cyclically
        self._truncate_metrics(self.state.step)
        return folder

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after the checkpoint we resume from: they will be logged again."""
        path = self.out_dir / "metrics.jsonl"
        if self.is_main and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(f"{line}\n" for line in kept))


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (just ``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_initial_weights(source: str) -> dict[str, torch.Tensor]:
    """Full state dict from an HF checkpoint folder or an IronCore checkpoint / run folder."""
    path = Path(source)
    if (path / "config.json").is_file():
        return full_state_dict(load_hf_model(path))
    return checkpoint.load_model_state(path)[1]


def apply_activation_checkpointing(model: TransformerModel) -> None:
    """Recompute each block's activations in the backward pass (parameter names unchanged)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint as recompute

    for block in model.layers:
        block.forward = partial(recompute, block.forward, use_reentrant=False)


def check_data_fits_model(metadata: dict[str, Any], cfg: Config, where: str) -> None:
    """Refuse at start-up what would otherwise crash (or silently mislearn) at step 1,000."""
    tokenizer = metadata.get("tokenizer", {})
    vocab, eod = tokenizer.get("vocab_size"), tokenizer.get("eod_id")
    if vocab is None or vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"{where}: tokenizer vocabulary {vocab} is larger than model.vocab_size {cfg.model.vocab_size}"
        )
    if metadata.get("append_eod", True) and (eod is None or not 0 <= eod < cfg.model.vocab_size):
        raise ConfigError(f"{where}: end-of-document id {eod} is missing or outside model.vocab_size")
    seq_len = metadata.get("max_seq_length")
    if seq_len is None or seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"{where}: max_seq_length {seq_len} exceeds model.max_position_embeddings "
            f"{cfg.model.max_position_embeddings}"
        )


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
