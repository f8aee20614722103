"""The training loop, the same for every objective.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on every
data-parallel rank. The objective (:mod:`ironcore.objectives`, chosen by
``trainer.objective`` or the data set) runs the forward and backward passes
of the step's micro-batches and normalises them over the whole global batch;
the optimizer (a :class:`~ironcore.training.optimizer.TrainingOptimizer`,
whatever it shards or casts underneath) sums the gradients over the DP ranks
and measures their global norm; the trainer clips it, skips a step whose loss
or gradient is not finite, and steps the optimizer on the learning-rate
schedule. What a model family needs of a step is in its step hooks
(:mod:`ironcore.training.hooks`). Around that: validation, logging (console,
``metrics.jsonl``, MLflow), checkpoints (their health:
:class:`~ironcore.training.checkpointing.CheckpointHealth`), automatic resume
and a clean stop on SIGTERM/SIGINT.

A run writes into ``trainer.output_dir``: ``config.yaml`` (resolved),
``metrics.jsonl`` and ``checkpoints/step_NNNNNNN/`` with a ``latest`` pointer;
it resumes from ``latest`` automatically.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as recompute

from ironcore.checkpoints import native
from ironcore.checkpoints.load import init_unloaded, load_weights, locate, meta_model, reward_model_start
from ironcore.config import Config, dump_config
from ironcore.config.training import TrainerConfig
from ironcore.data.demo.mixture import summary_line, write_mixture_report
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.metadata import load_metadata
from ironcore.data.preprocessing.tokenizer import Tokenizer, check_data_set_tokenizer, check_same_tokenizer
from ironcore.data.samples.batches import StepBatches
from ironcore.data.samples.blend import BlendedDataset, check_blendable, mix_metrics
from ironcore.data.samples.build import build_dataset
from ironcore.errors import ConfigError, UserError
from ironcore.evaluation.task_config import TaskConfig, load_task
from ironcore.evaluation.tasks import check_task, evaluate_task
from ironcore.files import (
    OutputError,
    check_writable,
    describe_os_error,
    remove_stale_temps,
    write_text_atomically,
)
from ironcore.models import TransformerModel
from ironcore.models.lora import cast_base, quantize_base, trainable_names
from ironcore.models.stats import model_stats
from ironcore.objectives import ObjectiveContext, build_objective
from ironcore.parallel import state
from ironcore.parallel.fsdp import fsdp_shards
from ironcore.parallel.grad import clip_factor
from ironcore.parallel.setup import init_parallel
from ironcore.parallel.sharding import full_state_dict, load_full_state_dict
from ironcore.training.checkpointing import (
    CheckpointHealth,
    TrainState,
    load_checkpoint,
    load_objective_state,
    resume_folder,
    save_checkpoint,
)
from ironcore.training.hooks import step_hooks
from ironcore.training.memory import measured_state_bytes, plan_memory
from ironcore.training.optim import build_training_optimizer, learning_rate, total_steps
from ironcore.training.perf import device_peak, format_rate, retain_freed_host_memory
from ironcore.training.tracking import RUN_FILE, Tracker, run_params, run_tags, tracked_names

log = logging.getLogger("ironcore.train")


class TrainingStopped(UserError):
    """Training stopped early (too many non-finite steps, or a signal); a checkpoint was saved."""


class Trainer:
    """Builds model, optimizer, objective, data and tracking from a Config, then :meth:`train` runs the loop."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # Process groups first: the layers read the TP layout when they are built.
        self.ctx = init_parallel(cfg.trainer.tensor_model_parallel_size, cfg.model, cfg.trainer.device,
                                 sequence_parallel=cfg.trainer.sequence_parallel)
        self.device = self.ctx.device
        if cfg.trainer.retain_host_memory and self.device.type == "cpu":
            retain_freed_host_memory()  # before the model exists, so its first allocations already follow it
        self.rank, self.world_size = self.ctx.rank, self.ctx.world_size
        self.dp_rank, self.dp_size = self.ctx.dp_rank, self.ctx.dp_size
        self.is_main = self.ctx.is_main
        self.out_dir = Path(cfg.trainer.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.state = TrainState()
        self.base: dict[str, str] | None = None  # LoRA: the frozen base's record (_build_model)
        self._stop_signal: int | None = None
        self._memory_logged = False  # the memory plan is logged beside the first step's bytes
        self.health = CheckpointHealth(self.ckpt_dir, cfg.trainer.healthy_after_steps, self.is_main)
        check_writable(self.out_dir, "folder")  # before any work: a bad output path must not cost it

        if not cfg.data.config_path and not cfg.data.blend:
            raise ConfigError("data.config_path: a training run needs a data config (configs/data/*.yaml) "
                              "or a data.blend of several")
        # A blend's data sets share a tokenizer and task type: the first stands for them all where one is needed.
        self.data_cfgs = [load_data_config(path) for path in
                          ([s.config_path for s in cfg.data.blend] if cfg.data.blend else [cfg.data.config_path])]
        self.data_dirs = [Path(data_cfg.output_dir) for data_cfg in self.data_cfgs]
        self.data_dir = self.data_dirs[0]
        metadatas = [load_metadata(folder) for folder in self.data_dirs]
        self.metadata = metadatas[0]
        for metadata, folder in zip(metadatas, self.data_dirs):
            check_data_fits_model(metadata, cfg, folder)
        if cfg.data.blend:
            check_blendable([(c.name, d, m, c.max_seq_length)
                             for c, d, m in zip(self.data_cfgs, self.data_dirs, metadatas)])  # fmt: skip
        self.seq_len = self.data_cfgs[0].max_seq_length
        if state.sequence_parallel() and self.seq_len % self.ctx.tp_size:
            raise ConfigError(f"trainer.sequence_parallel: the data's max_seq_length {self.seq_len} is not a "
                              f"multiple of tensor_model_parallel_size {self.ctx.tp_size}")
        self.init_folder = _starting_folder(cfg.init.init_from)
        self._check_tokenizers()

        torch.manual_seed(cfg.init.seed)
        self.model = self._build_model()
        self.optimizer = build_training_optimizer(self.model, cfg)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if cfg.trainer.precision == "bf16"
            else nullcontext()
        )
        self.objective = build_objective(
            ObjectiveContext(cfg, self.device, self.autocast, self.data_dir, self.metadata, self.seq_len, self.model,
                             lambda: self.state.step)
        )
        self.tokens_per_step = cfg.trainer.train_batch_size * self.seq_len * self.objective.sequences_per_sample
        self.total_steps = total_steps(cfg.operation, self.tokens_per_step)
        self.blend_weights = {c.name: s.weight for c, s in zip(self.data_cfgs, cfg.data.blend)}
        self.train_data, self.valid_data = self._data(metadatas)
        learning_rate(0, self.total_steps, cfg.optim)  # a bad module:function schedule: one line, before any work
        self.flops_per_token = model_stats(cfg.model, self.seq_len).train_flops_per_token
        peak = device_peak(self.device, cfg.trainer.precision, cfg.trainer.peak_tflops)
        self.peak = peak.flops
        if self.is_main:
            log.info("MFU is taken against %s per %s (%s)", format_rate(peak.flops),
                     "GPU" if self.device.type == "cuda" else "process", peak.basis)  # fmt: skip
        self.forward = torch.compile(self.model) if cfg.trainer.compile else self.model
        self.hooks = step_hooks(self.model, self.device, self.out_dir, self.is_main)
        self.tracker: Tracker | None = None
        self._step_tokens = self.tokens_per_step
        self.tasks = [load_task(spec) for spec in cfg.operation.eval_tasks]  # checked now, not at the first eval
        for task in self.tasks:
            check_task(task)
        self.task_tokenizer = Tokenizer.from_path(self.data_dir) if self.tasks else None
        if self.is_main and self.world_size > 1:
            log.info("layout: TP %d x DP %d%s%s on %s", self.ctx.tp_size, self.dp_size,
                     ", sequence parallel" if state.sequence_parallel() else "",
                     layout_name(cfg.trainer, self.dp_size), self.device)

    # ---- set-up -----------------------------------------------------------------------------------------
    def _check_tokenizers(self) -> None:
        """The data's token ids must mean what they meant to the weights we start or resume from."""
        identity = self.metadata["tokenizer"]["identity"]
        for folder in self.data_dirs:
            check_data_set_tokenizer(folder, identity)
        if self.cfg.data.allow_other_tokenizer:
            return
        latest = resume_folder(self.ckpt_dir)
        for folder in (latest,) if latest is not None and latest.is_dir() else (self.init_folder,):
            if folder is not None:
                check_same_tokenizer(folder, identity, f"the one that tokenized {self.data_dir}",
                                     "data.allow_other_tokenizer=true")

    def _build_model(self) -> TransformerModel:
        """The model at its starting weights; with LoRA also the record of its frozen base (``self.base``),
        which every checkpoint carries and a resumed run's base must match."""
        init_from, lora = self.cfg.init.init_from, self.cfg.model.lora is not None
        # A resumed run loads its checkpoint instead; with LoRA that holds the adapters only: the base loads too.
        from_file = bool(init_from) and (lora or resume_folder(self.ckpt_dir) is None)
        # Started from a file, the model is built on the meta device and takes the file's tensors: only what the
        # file lacks is drawn (adapters, a reward model's score head), not a random copy of every weight beside
        # the loaded ones (for an 8B base: 32 GB of host memory and a minute of drawing).
        model = meta_model(self.cfg.model) if from_file else TransformerModel(self.cfg.model)
        adapters = set(trainable_names(model)) if lora else set()
        weights = None
        if from_file:
            try:
                weights = reward_model_start(load_weights(init_from), model)
                # Assigned, the tensors would keep the file's dtype: in the model's (a bf16 checkpoint trains fp32).
                dtypes = {name: t.dtype for name, t in model.state_dict().items()}
                weights = {name: t.to(dtypes.get(name, t.dtype)) for name, t in weights.items()}
                absent = adapters | ({"score.weight"} if model.score is not None else set())
                load_full_state_dict(model, weights, absent=absent)
            except UserError as err:
                raise UserError(f"init.init_from {init_from}: {err}") from None
            init_unloaded(model)
        if lora:
            base = weights if weights is not None else full_state_dict(model)
            self.base = native.base_record(init_from, {n: t for n, t in base.items() if n not in adapters})
            del weights, base  # the model holds the tensors now: cast_base frees each as it replaces it
            if self.cfg.trainer.precision == "bf16":
                cast_base(model, torch.bfloat16)
            if self.cfg.model.lora.quantize_base == "nf4":
                quantize_base(model, self.device)
        if self.cfg.trainer.activation_checkpointing:
            apply_activation_checkpointing(model)
        return model.to(self.device)

    def _data(self, metadatas: list[dict[str, Any]]) -> tuple[StepBatches, dict[str, StepBatches]]:
        """The training batches, and the validation sets by the name their metrics carry: "" for the one data
        set, each data config's name in a blend (see :meth:`evaluate`)."""
        cfg = self.cfg
        valid_data: dict[str, StepBatches] = {}
        if not cfg.data.blend:
            splits = [split for split in ("train", "valid") if self.metadata["splits"].get(split)]
            datasets = self.objective.prepare({
                split: build_dataset(self.data_dir, self.metadata, split, self.seq_len, cfg.init.seed, cfg.data.packing)
                for split in splits
            })
            if "valid" in datasets:
                valid_data[""] = self._batches(datasets["valid"], shuffle=False)
            return self._batches(datasets["train"], shuffle=True), valid_data
        sources = [build_dataset(d, m, "train", self.seq_len, cfg.init.seed, cfg.data.packing)
                   for d, m in zip(self.data_dirs, metadatas)]  # fmt: skip
        # Read in order (the blend shuffles within each source): each batch holds the exact proportions.
        blend = BlendedDataset(sources, [s.weight for s in cfg.data.blend],
                               self.total_steps * cfg.trainer.train_batch_size, cfg.init.seed)
        for c, d, m in zip(self.data_cfgs, self.data_dirs, metadatas):
            if m["splits"].get("valid"):
                valid = build_dataset(d, m, "valid", self.seq_len, cfg.init.seed, cfg.data.packing)
                valid_data[c.name] = self._batches(self.objective.prepare({"valid": valid})["valid"], shuffle=False)
        return self._batches(self.objective.prepare({"train": blend})["train"], shuffle=False), valid_data

    def _report_mixture(self) -> None:
        """The blend's mixture report (``mixture/``, MLflow ``data/``) and its line in the log: what each data set
        gets of this run, counted from the blend itself. Written at every start (a resume rewrites the same)."""
        cfg = self.cfg
        report = write_mixture_report(self.train_data.dataset, [c.name for c in self.data_cfgs],
                                      [s.config_path for s in cfg.data.blend], self.data_dir,
                                      cfg.trainer.train_batch_size, self.seq_len, self.out_dir)  # fmt: skip
        log.info("%s", summary_line(report))
        for path in report["files"].values():
            self.tracker.log_artifact(path, "data")

    def _batches(self, dataset: torch.utils.data.Dataset, shuffle: bool) -> StepBatches:
        cfg = self.cfg
        return StepBatches(dataset, global_batch_size=cfg.trainer.train_batch_size,
                           micro_batch_size=cfg.trainer.micro_batch_size, device=self.device, dp_rank=self.dp_rank,
                           dp_size=self.dp_size, seed=cfg.init.seed, shuffle=shuffle)

    def _start_tracking(self) -> Tracker:
        cfg = self.cfg
        tags = run_tags(cfg, self.metadata, type(self.objective).__name__, self.dp_size, self.world_size)
        run_name = cfg.utils.run_name or self.out_dir.name
        params = run_params(cfg, self.objective.options)
        return Tracker(self.is_main and cfg.utils.tracking, cfg.utils.experiment_name, run_name, params, tags)

    # ---- the loop ---------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run (or resume) to the last step; returns the final validation metrics."""
        cfg = self.cfg
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.out_dir)
            remove_stale_temps(self.ckpt_dir)
            write_text_atomically(self.out_dir / "config.yaml", dump_config(cfg))
        resumed = self._resume()
        self.tracker = self._start_tracking()
        self.tracker.record(self.out_dir / RUN_FILE)
        self.tracker.log_artifact(self.out_dir / "config.yaml")
        if cfg.data.blend and self.is_main:
            self._report_mixture()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        status = "FAILED"
        try:
            if resumed and self.is_main:
                log.info("resumed from %s at step %d", resumed, self.state.step)
            if cfg.operation.eval_at_start and not resumed and self.valid_data:
                start = self.evaluate()
                self._eval_line(start, 0)
                self._write_metrics({"step": 0, **start})
                self._track(start, 0)
            stopped = self._loop()
            final = stopped or (self.evaluate() if self.valid_data else {})
            if final and not stopped:
                self._eval_line(final, self.state.step)
                self._write_metrics({"step": self.state.step, **final})
                self._track(final, self.state.step)
            self.save()
            self.health.run_done()
            if self.is_main and final:
                result = json.dumps({"step": self.state.step, **final}, indent=2)
                write_text_atomically(self.out_dir / "final_eval.json", result)
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

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Finish the current step, then save and stop (see _loop): never stop mid-update.
        self._stop_signal = signum

    def _loop(self) -> dict[str, float] | None:
        """Train to the last step; returns the evaluation that met ``operation.stop_metric`` if one stopped it."""
        cfg, op = self.cfg, self.cfg.operation
        window_start, window_tokens = time.perf_counter(), 0
        run_start = time.perf_counter()
        start_step = self.state.step
        consecutive_bad = 0
        while self.state.step < self.total_steps and not self.state.stopped_early:
            metrics = self.train_step()
            window_tokens += self._step_tokens
            self.health.step_done(finite=metrics is not None)
            consecutive_bad = 0 if metrics is not None else consecutive_bad + 1
            if consecutive_bad >= cfg.trainer.max_consecutive_skips:
                raise TrainingStopped(
                    f"stopped at step {self.state.step}: {consecutive_bad} steps in a row had a non-finite "
                    f"loss or gradient; {self.health.back_to_healthy()}"
                )
            step = self.state.step
            if metrics is not None and (step % op.log_interval == 0 or step == self.total_steps):
                elapsed = time.perf_counter() - window_start
                tokens_per_sec = window_tokens / max(elapsed, 1e-9)
                metrics.update(
                    tokens_per_sec=tokens_per_sec,
                    mfu=tokens_per_sec * self.flops_per_token / (self.peak * self.world_size),
                )
                metrics.update(self._hook_log_metrics(step))
                self._log_line(metrics, time.perf_counter() - run_start, step - start_step)
                self._write_metrics({"step": step, **metrics, "skipped_steps": self.state.skipped_steps})
                self._track(metrics, step)
                self._log_artifacts()
                window_start, window_tokens = time.perf_counter(), 0
            if self.valid_data and op.eval_interval and step % op.eval_interval == 0 and step < self.total_steps:
                result = self.evaluate()
                self._eval_line(result, step)
                self._write_metrics({"step": step, **result})
                self._track(result, step)
                if self._stop_metric_reached(result):
                    self.state.stopped_early = True
                    return result
                window_start = time.perf_counter()
            if cfg.trainer.save_interval and step % cfg.trainer.save_interval == 0 and step < self.total_steps:
                self.save()
            if self._stop_requested():
                saved = self.save()
                where = f"checkpoint saved in {saved}, rerun to resume" if saved else self.health.back_to_healthy()
                raise TrainingStopped(
                    f"stopped by signal {signal.Signals(self._stop_signal or signal.SIGTERM).name} at step {step}; "
                    + where
                )

    def _stop_metric_reached(self, result: dict[str, float]) -> bool:
        """Has ``operation.stop_metric`` reached its threshold (the same answer on every rank: evaluation metrics
        are reduced or broadcast)?"""
        op = self.cfg.operation
        if op.stop_metric is None:
            return False
        if op.stop_metric not in result:
            raise ConfigError(f"config key 'operation.stop_metric': {op.stop_metric!r} is not an evaluation metric "
                              f"of this run (it has {', '.join(sorted(result))})")
        value = result[op.stop_metric]
        reached = value >= op.stop_threshold if op.stop_mode == "max" else value <= op.stop_threshold
        if reached and self.is_main:
            log.info("step %d: %s %.4g reached operation.stop_threshold %.4g: stopping here", self.state.step,
                     op.stop_metric, value, op.stop_threshold)
        return reached

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
        for hook in self.hooks:
            hook.start_step(len(micro_batches) * self.dp_size)
        result = self.objective.backward(self._hooked_forward(len(micro_batches)), micro_batches)
        for hook in self.hooks:
            result.metrics.update(hook.step_metrics())
        self._step_tokens = result.processed or self.tokens_per_step  # what tok/s and MFU count
        self.optimizer.finish_grad_sync()  # TP sums, DP reduction (or waits for overlapped ones)
        norm = self.optimizer.grad_norm().item()
        loss = result.metrics["loss"]
        lr = learning_rate(self.state.step, self.total_steps, cfg.optim)
        self.state.step += 1
        self.state.consumed_samples += cfg.trainer.train_batch_size
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad()
            self.state.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): step skipped",
                        self.state.step, loss, norm)
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step(clip_factor(norm, cfg.trainer.grad_clip))  # clipping
        if not self._memory_logged:  # everything a step holds exists now
            self._log_memory()
        self.optimizer.zero_grad()
        self.state.tokens += result.tokens
        return {**result.metrics, "lr": lr, "grad_norm": norm}

    def _hooked_forward(self, micro_batches: int) -> Callable[..., torch.Tensor]:
        """The forward pass the objective runs. With one backward pass per micro-batch, the last micro-batch's
        pass (counted among those with gradients) arms the optimizer, whose reductions may then start during its
        backward pass; the step hooks see every pass with gradients."""
        arming = self.objective.one_backward_per_micro_batch
        if not arming and not self.hooks:
            return self.forward
        passes = 0

        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            nonlocal passes
            trained = torch.is_grad_enabled()
            if arming and trained:
                passes += 1
                if passes == micro_batches:
                    self.optimizer.arm()
            out = self.forward(*args, **kwargs)
            for hook in self.hooks if trained else ():
                hook.after_forward()
            return out

        return forward

    def _hook_log_metrics(self, step: int) -> dict[str, float]:
        """The step hooks' metrics for a log line; the files they wrote go to the tracker."""
        metrics: dict[str, float] = {}
        for hook in self.hooks:
            values, files = hook.log_metrics(step)
            metrics.update(values)
            for path in files if self.tracker is not None else ():
                self.tracker.log_artifact(path)
        return metrics

    def _log_memory(self) -> None:
        """The memory planner's bytes per GPU (per process on a CPU) for this run, beside what the first step
        holds (exact bytes of the parameters, gradients and optimizer states; on a GPU also the peak allocated)."""
        self._memory_logged = True
        if not self.is_main:
            return
        report = self.optimizer.report()
        if report:
            log.info("%s", report)
        t = self.cfg.trainer
        try:  # a plan is information: a model the planner cannot trace must still train
            plan = plan_memory(self.cfg.model, tp=self.ctx.tp_size, dp=self.dp_size,
                               data_parallel=t.data_parallel, offload=t.offload,
                               reshard_after_forward=t.reshard_after_forward,
                               sharded_checkpoints=t.sharded_checkpoints, precision=t.precision,
                               activation_checkpointing=t.activation_checkpointing,
                               micro_batch_size=t.micro_batch_size, seq_len=self.seq_len,
                               optimizer=self.cfg.optim.optimizer,
                               objective=self.objective.memory_shape())  # fmt: skip
        except Exception as err:  # noqa: BLE001
            log.warning("memory plan unavailable: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
            return
        params, grads, states = measured_state_bytes(self.model, self.optimizer)
        mib = 2**20
        peak = (f"; peak allocated {torch.cuda.max_memory_allocated(self.device) / mib:,.1f} MiB"
                if self.device.type == "cuda" else "")  # fmt: skip
        extra = "".join(f", {what} {n / mib:,.1f}" for what, n in (
            ("reference", plan.reference), ("rollout KV cache", plan.kv_cache), ("gathered units", plan.gathered),
            ("in host memory", plan.host)) if n)
        log.info("memory per %s: planned %s MiB (parameters %s, gradients %s, optimizer %s, activations %s of a "
                 "micro-batch%s); measured after step 1: parameters %s, gradients %s, optimizer %s%s",
                 "GPU" if self.device.type == "cuda" else "process",
                 *(f"{n / mib:,.1f}" for n in (plan.total, plan.parameters, plan.gradients, plan.optimizer,
                                               plan.activations)), extra,
                 *(f"{n / mib:,.1f}" for n in (params, grads, states)), peak)  # fmt: skip

    def evaluate(self) -> dict[str, float]:
        """The objective's validation metrics over ``operation.eval_steps`` global batches (of a blend: of each
        data set, as ``val_<name>/x``, and mixed by the blend's weights as ``val_x``), and the metrics of
        ``operation.eval_tasks`` (``eval/<task>/<metric>``)."""
        self.model.eval()
        try:
            steps = self.cfg.operation.eval_steps
            per_source = {name: self.objective.evaluate(self.forward, batches.eval_steps(steps))
                          for name, batches in self.valid_data.items()}  # fmt: skip
            metrics = per_source.pop("") if "" in per_source else mix_metrics(per_source, self.blend_weights)
            for task in self.tasks:
                metrics |= self._task_metrics(task)
            return metrics
        finally:
            self.model.train()
            self._log_artifacts()

    def _log_artifacts(self) -> None:
        """The tables the objective wrote since it was last asked (GRPO's samples and completions), as MLflow
        artifacts in folders named like theirs (``samples/``, ``completions/``)."""
        for path in self.objective.artifacts():
            if self.is_main and self.tracker is not None:
                self.tracker.log_artifact(path, path.parent.name)

    def _task_metrics(self, task: TaskConfig) -> dict[str, float]:
        """``eval/<task>/<metric>`` of one of ``operation.eval_tasks``, computed once: by the first data-parallel
        replica (all ranks of its tensor-parallel group generate together) and sent to the others, so that the
        numbers are one process's and no replica repeats the work; its error, if any, is raised on every rank."""
        result: dict[str, float] | None = None
        error: UserError | None = None
        if self.dp_rank == 0:
            try:
                with self.autocast:
                    done = evaluate_task(self.model, self.task_tokenizer, task)
                result = {f"eval/{task.name}/{k}": v for k, v in done.items() if k not in ("items", "seconds")}
            except UserError as err:
                error = err
        if self.dp_size > 1:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)  # global rank 0 is a rank of the first replica
            result, error = box[0]
        if error is not None:
            raise error
        assert result is not None
        return result

    # ---- output -----------------------------------------------------------------------------------------
    def _log_line(self, m: dict[str, float], elapsed: float, steps_done: int) -> None:
        if not self.is_main:
            return
        remaining = (self.total_steps - self.state.step) * elapsed / max(steps_done, 1)
        print(
            f"step {self.state.step:>{len(str(self.total_steps))}}/{self.total_steps} | loss {m['loss']:.4f} | "
            f"lr {m['lr']:.2e} | grad {m['grad_norm']:.3f} | {m['tokens_per_sec']:,.0f} tok/s | "
            f"MFU {m['mfu']:.1%} | {_clock(elapsed)} elapsed | ETA {_clock(remaining)}"
            + self.objective.log_fields(m),
            flush=True,
        )

    def _eval_line(self, m: dict[str, float], step: int) -> None:
        """An evaluation's metrics on the console, beside the step lines (also the one of eval_at_start)."""
        if self.is_main and m:
            fields = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) and abs(v) < 1e5 else f"{k} {v:.6g}"
                                for k, v in m.items() if isinstance(v, (int, float)))  # fmt: skip
            print(f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} | eval | {fields}", flush=True)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.is_main:
            path = self.out_dir / "metrics.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(json_finite(record), allow_nan=False) + "\n")
            except OSError as err:  # a full disk: one line, and the last checkpoint stays as it was
                raise OutputError(describe_os_error(err, path)) from None

    def _track(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(tracked_names(metrics), step)
        self.tracker.flush()

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint the current step (collective; see :func:`~ironcore.training.checkpointing.save_checkpoint`).

        Not when the last step was non-finite: weights that just produced a NaN
        are no state to resume from (returns None then).
        """
        if not self.health.last_step_finite:
            log.warning("step %d had a non-finite loss or gradient: not saving a checkpoint of it", self.state.step)
            return None
        if self.health.saved_step == self.state.step:  # e.g. a signal right after a periodic save
            return native.step_dir(self.ckpt_dir, self.state.step)
        folder = save_checkpoint(self.ckpt_dir, state=self.state, model=self.model, optimizer=self.optimizer,
                                 config=self.cfg, tokenizer_dir=self.data_dir, generation_source=self.init_folder,
                                 objective_state=self.objective.state_dict(), base=self.base)  # fmt: skip
        self.health.saved(folder, self.state.step)
        return folder

    def _resume(self) -> Path | None:
        """Load the ``latest`` checkpoint, whatever TP/DP layout wrote it (tensors are stored full)."""
        loaded = load_checkpoint(self.ckpt_dir, model=self.model, optimizer=self.optimizer, device=self.device,
                                 rank=self.rank, base=self.base)
        if loaded is None:
            return None
        folder, self.state = loaded
        self.objective.load_state_dict(load_objective_state(folder, self.rank, self.world_size))
        self.health.resumed(folder)
        self._truncate_metrics(self.state.step)
        return folder

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be logged again) and a torn
        last line (a crash mid-write); the file is replaced atomically."""
        path = self.out_dir / "metrics.jsonl"
        if not (self.is_main and path.is_file()):
            return
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as err:
            raise OutputError(describe_os_error(err, path)) from None
        kept, torn = [], []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                torn.append(number)
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line)
        if torn:
            log.warning("%s: dropping %d unreadable line(s) (writes cut short): line %s", path, len(torn),
                        ", ".join(map(str, torn[:5])) + (", ..." if len(torn) > 5 else ""))
        write_text_atomically(path, "".join(f"{line}\n" for line in kept))


def layout_name(trainer: TrainerConfig, dp_size: int) -> str:
    """How the DP ranks share the state, for the layout line (nothing to say for plain DP)."""
    if fsdp_shards(trainer.data_parallel, dp_size, trainer.offload):
        return ", fully sharded (FSDP)" + (", offloaded to host memory" if trainer.offload != "none" else "")
    return ", distributed optimizer" if trainer.data_parallel == "zero1" and dp_size > 1 else ""


def _starting_folder(init_from: str | None) -> Path | None:
    """The folder of the starting weights, whose generation_config.json travels into every checkpoint.

    None without one, or when it cannot be found (a resumed run whose starting point was deleted: loading
    it, when needed, reports that).
    """
    if not init_from:
        return None
    try:
        return locate(init_from)[1]
    except UserError:
        return None


def apply_activation_checkpointing(model: TransformerModel) -> None:
    """Recompute each block's activations in the backward pass (parameter names unchanged)."""
    for block in model.layers:
        block.forward = partial(recompute, block.forward, use_reentrant=False)


def check_data_fits_model(metadata: dict[str, Any], cfg: Config, where: str | Path) -> None:
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


def json_finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) as None, so that it is valid JSON (``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_finite(item) for item in value]
    return value


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
