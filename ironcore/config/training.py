"""The training config groups: model, data, trainer, optim, operation, init, utils, and the whole Config.

An objective's options are ``trainer.objective_options``; the top-level ``dpo`` group that DPO once had is
still read, as those, with a deprecation warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

from ironcore.config.base import InvalidValue, did_you_mean, field
from ironcore.config.model import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BlendSource:
    """One data set of a mixture and its share of the training samples."""

    config_path: str = field(help="Path to a data config (configs/data/*.yaml) whose shards to draw from.")
    weight: float = field(help="Its share of the samples (the weights are normalised to sum to 1).")

    def validate(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise InvalidValue("weight", f"must be a positive number, got {self.weight}")


@dataclasses.dataclass
class DataGroup:
    """Which preprocessed data set(s) to train on."""

    config_path: str | None = field(None, help="Path to a data config (configs/data/*.yaml) whose shards to train on.")
    blend: list[BlendSource] = field(
        [],
        help="Instead of config_path: a mixture, [{config_path: A, weight: 0.7}, {config_path: B, weight: 0.3}], "
        "of data sets of one tokenizer and task type, drawn in those proportions (see docs/data_pipeline.md).",
    )
    packing: bool = field(
        False, help="SFT: pack several examples into each sequence (positions restart, no cross-attention)."
    )
    allow_other_tokenizer: bool = field(
        False,
        help="Train (resume, init_from) although the checkpoint's tokenizer differs from the one that tokenized "
        "the data; only for tokenizers whose ids mean the same text.",
    )

    def validate(self) -> None:
        if self.config_path and self.blend:
            raise InvalidValue("blend", "give data.config_path or data.blend, not both")


@dataclasses.dataclass
class TrainerConfig:
    """Batch geometry, parallel layout, precision and checkpointing."""

    micro_batch_size: int = field(4, help="Sequences per forward/backward pass on one data-parallel rank.")
    train_batch_size: int | None = field(
        None, help="Global batch in sequences = micro_batch_size x gradient_accumulation_steps x DP size."
    )
    gradient_accumulation_steps: int | None = field(
        None, help="Micro-batches per optimizer step (null: derived from train_batch_size, else 1)."
    )
    tensor_model_parallel_size: int = field(1, help="Ranks a layer is split across (Megatron-style TP).")
    objective: str | None = field(
        None,
        help="What training minimises: a built-in objective (lm, dpo, grpo, reward_model) or your own as "
        "module:Class (see docs/objectives.md); null: the data set's default (lm for pretrain and sft data, dpo "
        "for dpo data, grpo for rl data).",
    )
    objective_options: dict[str, Any] = field(
        {}, help="Options of the objective, checked against its Options dataclass (e.g. {z_loss_weight: 1e-4})."
    )
    output_dir: str = field("runs/default", help="Where config.yaml, metrics.jsonl and checkpoints/ go.")
    save_interval: int = field(100, help="Save a checkpoint every this many optimizer steps (0: only at the end).")
    keep_last_checkpoints: int = field(3, help="How many step_* checkpoints to keep (older ones are deleted).")
    precision: Literal["fp32", "bf16"] = field(
        "fp32",
        help="bf16: bf16 parameters and activations, fp32 main gradients, fp32 master weights and AdamW states "
        "in the optimizer (Megatron's mixed precision; checkpoints hold the master weights).",
    )
    device: str = field("auto", help="auto (cuda if available, else cpu), cpu or cuda.")
    compile: bool = field(False, help="Wrap the model in torch.compile.")
    activation_checkpointing: bool = field(False, help="Recompute each block's activations in the backward pass.")
    grad_clip: float = field(1.0, help="Clip the global gradient norm to this (0: no clipping).")
    data_parallel: Literal["ddp", "zero1", "fsdp"] | None = field(
        None,
        help="How the data-parallel ranks share the training state. ddp: every rank holds everything, gradients "
        "all-reduced. zero1: the optimizer state sharded (Megatron's distributed optimizer): gradients "
        "reduce-scattered, each rank steps its shard, parameters all-gathered. fsdp: parameters, gradients and "
        "optimizer state sharded per transformer block (PyTorch's FSDP2), each block's weights all-gathered "
        "for its forward and backward pass. Same losses either way; null: zero1 when "
        "trainer.distributed_optimizer is set, else ddp.",
    )
    distributed_optimizer: bool = field(
        False, help="Alias of trainer.data_parallel: zero1 (the optimizer state sharded over the DP ranks)."
    )
    reshard_after_forward: bool = field(
        True,
        help="With data_parallel fsdp: free each block's gathered weights after its forward pass and gather them "
        "again for its backward pass (the least memory). false keeps them from the forward to the backward pass: "
        "one all-gather less per step, every block's weights held whole during the step.",
    )
    offload: Literal["none", "params"] = field(
        "none",
        help="With data_parallel fsdp: params keeps the sharded fp32 parameters, their gradients and the "
        "optimizer state in host memory and runs the optimizer step there (FSDP2's CPUOffloadPolicy); the GPU "
        "holds the units gathered for compute and the activations. Also at DP size 1 (one GPU).",
    )
    checkpoint_format: Literal["auto", "full", "sharded"] = field(
        "auto",
        help="full: full (TP=1) tensors gathered and written by rank 0. sharded: every rank writes its own shards "
        "in parallel (torch.distributed.checkpoint), nothing gathered; both resume at any layout. auto: sharded "
        "with data_parallel fsdp, else full.",
    )
    sequence_parallel: bool = field(
        False,
        help="With tensor parallelism: split the activations between the TP regions (norms, dropout, residuals) "
        "over the TP ranks along the sequence; all-gather and reduce-scatter replace TP's all-reduce. Same "
        "losses; the sequence length must be a multiple of the TP size. No effect at TP 1.",
    )
    overlap_grad_reduce: bool = field(
        False,
        help="With the distributed optimizer (and TP 1): start each bucket's gradient reduction during the last "
        "micro-batch's backward pass, as soon as its gradients are done. Objectives that run one backward pass "
        "per micro-batch (lm, dpo, reward_model) use it; others reduce after the backward pass.",
    )
    max_consecutive_skips: int = field(
        5,
        help="Stop when this many steps in a row had a non-finite loss or gradient; `latest` then goes back to "
        "the newest healthy checkpoint.",
    )
    healthy_after_steps: int = field(
        5,
        help="A checkpoint counts as healthy (never pruned, gone back to after non-finite steps) once this many "
        "finite steps followed it, or when it is the end of the run.",
    )
    peak_tflops: float | None = field(
        None, help="Peak TFLOP/s of one device for MFU (null: GPU data-sheet table, or measured on CPU)."
    )
    retain_host_memory: bool = field(
        True,
        help="CPU training: keep freed host memory for reuse (Linux/glibc) instead of page-faulting it back "
        "every step; the process then holds its peak host memory until it exits.",
    )

    def validate(self) -> None:
        for key in ("save_interval", "keep_last_checkpoints"):
            if getattr(self, key) < 0:
                raise InvalidValue(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("max_consecutive_skips", "healthy_after_steps"):
            if getattr(self, key) < 1:
                raise InvalidValue(key, f"must be >= 1, got {getattr(self, key)}")
        if not self.grad_clip >= 0:
            raise InvalidValue("grad_clip", f"must be >= 0, got {self.grad_clip}")
        self._resolve_data_parallel()
        if self.overlap_grad_reduce and not self.distributed_optimizer:
            raise InvalidValue("overlap_grad_reduce", "needs trainer.data_parallel: zero1 (FSDP overlaps its own)")
        if self.overlap_grad_reduce and self.tensor_model_parallel_size > 1:
            raise InvalidValue("overlap_grad_reduce", "is not supported with tensor parallelism yet (the TP "
                               "gradient sums must come before the DP reduction)")  # fmt: skip

    def _resolve_data_parallel(self) -> None:
        """``distributed_optimizer`` is the old spelling of ``data_parallel: zero1``: fill in whichever is unset,
        refuse a contradiction, and the options that only one layout has."""
        if self.data_parallel is None:
            self.data_parallel = "zero1" if self.distributed_optimizer else "ddp"
        elif self.distributed_optimizer and self.data_parallel != "zero1":
            raise InvalidValue("distributed_optimizer", f"true means data_parallel: zero1, but data_parallel is "
                               f"{self.data_parallel}: set one of them")  # fmt: skip
        self.distributed_optimizer = self.data_parallel == "zero1"
        if not self.reshard_after_forward and self.data_parallel != "fsdp":
            raise InvalidValue("reshard_after_forward", f"needs trainer.data_parallel: fsdp (it is {self.data_parallel})")
        if self.offload != "none" and self.data_parallel != "fsdp":
            raise InvalidValue("offload", f"needs trainer.data_parallel: fsdp (it is {self.data_parallel})")
        flat_buffers = self.data_parallel == "zero1" or (self.data_parallel == "ddp" and self.precision == "bf16")
        if self.checkpoint_format == "sharded" and flat_buffers:
            raise InvalidValue("checkpoint_format", "sharded checkpoints are written by data_parallel fsdp, and by "
                               "ddp in fp32; this layout writes full ones (checkpoint_format: full)")

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether this run writes sharded checkpoints (``checkpoint_format``, auto resolved)."""
        if self.checkpoint_format == "auto":
            return self.data_parallel == "fsdp"
        return self.checkpoint_format == "sharded"


SCHEDULES = ("cosine", "linear", "constant", "wsd")  # optim.lr_schedule's built-ins (ironcore/training/optim.py)


@dataclasses.dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: str = field(
        "adamw", help="adamw (adam is an alias: decoupled weight decay either way), sgd, muon (torch.optim.Muon for "
        "the transformer blocks' 2-D weights, AdamW for the rest), or any torch.optim.Optimizer as module:Class."
    )
    max_lr: float = field(6e-4, help="Peak learning rate, reached after warmup.")
    min_lr: float = field(0.0, help="Floor of the decay schedule.")
    warmup_steps: int = field(0, help="Linear warmup from 0 to max_lr over this many steps.")
    lr_schedule: str = field(
        "cosine", help="After warmup, from max_lr to min_lr: cosine, linear or constant over the rest of the run; "
        "wsd (warmup-stable-decay: max_lr until the last decay_fraction of the run, then decay_shape down to "
        "min_lr); or your own as module:function, called as function(step, total_steps, optim) -> lr."
    )
    decay_fraction: float = field(0.1, help="wsd: the share of the run's steps that decay (the last ones).")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = field(
        "linear", help="wsd: how the decay falls from max_lr to min_lr (1-sqrt: Hägele et al. 2024)."
    )
    weight_decay: float = field(0.1, help="Decoupled weight decay (never on norms, biases and embeddings).")
    beta1: float = field(0.9, help="Adam beta1.")
    beta2: float = field(0.95, help="Adam beta2.")
    eps: float = field(1e-8, help="Adam epsilon.")
    momentum: float = field(0.9, help="SGD momentum.")
    optimizer_options: dict[str, Any] = field(
        {}, help="Keyword arguments of the optimizer (never lr: max_lr and the schedule set it). adamw: amsgrad, "
        "maximize; sgd: dampening, nesterov, maximize; muon (its own, the AdamW part uses the keys above): momentum, "
        "nesterov, ns_steps, ns_coefficients, eps, adjust_lr_fn, weight_decay; module:Class: its __init__'s.",
    )
    implementation: str | None = field(
        None,
        help="Your own optimizer as module:Class, built as Class(model, config): the TrainingOptimizer interface "
        "of ironcore/training/optimizer.py (docs/training.md); null: the built-in one (optim.optimizer, "
        "trainer.distributed_optimizer, trainer.precision).",
    )

    def validate(self) -> None:
        for key in ("max_lr", "min_lr", "weight_decay", "warmup_steps", "momentum"):
            if not getattr(self, key) >= 0:  # also refuses nan
                raise InvalidValue(key, f"must be >= 0, got {getattr(self, key)}")
        if not self.eps > 0:
            raise InvalidValue("eps", f"must be positive, got {self.eps}")
        if self.lr_schedule not in SCHEDULES and ":" not in self.lr_schedule:
            raise InvalidValue("lr_schedule", f"'{self.lr_schedule}' is none of {', '.join(SCHEDULES)} nor "
                               f"module:function{did_you_mean(self.lr_schedule, SCHEDULES)}")
        if not 0 < self.decay_fraction <= 1:
            raise InvalidValue("decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise InvalidValue(key, f"must be in [0, 1), got {getattr(self, key)}")
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        """The optimizer is a built-in or a torch optimizer class, and takes every key of optimizer_options, so
        that a typo fails before the model is built rather than as a TypeError (or not at all)."""
        if self.optimizer in OPTIMIZER_OPTIONS:
            allowed: set[str] | None = set(OPTIMIZER_OPTIONS[self.optimizer])
        elif ":" in self.optimizer:  # its class and keywords: checked where it is built (training/optim.py)
            allowed = None
        else:
            raise InvalidValue("optimizer", f"'{self.optimizer}' is neither a built-in optimizer "
                               f"({', '.join(OPTIMIZER_OPTIONS)}) nor module:Class"
                               f"{did_you_mean(self.optimizer, OPTIMIZER_OPTIONS)}")
        for name in self.optimizer_options:
            if name == "lr":
                raise InvalidValue("optimizer_options", "lr is optim.max_lr, scaled by the schedule every step")
            if allowed is not None and name not in allowed:
                raise InvalidValue("optimizer_options", f"{self.optimizer} takes no option '{name}'"
                                   f"{did_you_mean(name, allowed)} (it takes: {', '.join(sorted(allowed))})")
        adjust = self.optimizer_options.get("adjust_lr_fn")
        if self.optimizer == "muon" and adjust not in (None, "original", "match_rms_adamw"):
            raise InvalidValue("optimizer_options", f"adjust_lr_fn must be original, match_rms_adamw or null, "
                               f"got {adjust!r}")


# optim.optimizer's built-ins and the optim.optimizer_options each takes (the rest are config keys: lr, betas, eps,
# weight_decay, momentum; muon's weight_decay and eps are its own, its AdamW part uses the config's).
OPTIMIZER_OPTIONS = {
    "adamw": ("amsgrad", "maximize"),
    "adam": ("amsgrad", "maximize"),
    "sgd": ("dampening", "nesterov", "maximize"),
    "muon": ("momentum", "nesterov", "ns_steps", "ns_coefficients", "eps", "adjust_lr_fn", "weight_decay"),
}


@dataclasses.dataclass
class OperationConfig:
    """How long to train and how often to evaluate and log."""

    train_steps: int | None = field(100, help="Optimizer steps to run (null: use train_tokens).")
    train_tokens: int | None = field(None, help="Token budget; converted to steps when train_steps is null.")
    eval_interval: int = field(100, help="Evaluate on the validation split every this many steps (0: only at the end).")
    eval_steps: int = field(10, help="Validation batches per evaluation.")
    eval_at_start: bool = field(
        False, help="Also evaluate before the first step of a fresh run: where fine-tuning starts (HF's eval_on_start)."
    )
    log_interval: int = field(1, help="Log (stdout, metrics.jsonl, MLflow) every this many steps.")
    eval_tasks: list[str] = field(
        [], help="Tasks evaluated with the validation (ironcore eval --task specs: a task YAML or NAME=DATA), logged "
        "as eval/<task>/<metric>; the first data-parallel replica runs them and sends the numbers to the others."
    )
    stop_metric: str | None = field(
        None, help="Stop early once this evaluation metric (e.g. eval/synthetic/accuracy or val_loss) reaches "
        "operation.stop_threshold: the run ends there as if it were its last step (final checkpoint and final_eval.json)."
    )
    stop_threshold: float = field(0.0, help="The value of operation.stop_metric that stops the run.")
    stop_mode: Literal["max", "min"] = field(
        "max", help="max: stop once the metric is >= stop_threshold (an accuracy); min: once it is <= (a loss)."
    )

    def validate(self) -> None:
        if self.stop_metric is not None and not math.isfinite(self.stop_threshold):
            raise InvalidValue("stop_threshold", f"must be a finite number, got {self.stop_threshold}")
        for key in ("train_steps", "train_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise InvalidValue(key, f"must be >= 1 (or null), got {value}")
        if self.eval_interval < 0:
            raise InvalidValue("eval_interval", f"must be >= 0, got {self.eval_interval}")
        for key in ("eval_steps", "log_interval"):
            if getattr(self, key) < 1:
                raise InvalidValue(key, f"must be >= 1, got {getattr(self, key)}")


@dataclasses.dataclass
class InitConfig:
    """Where the starting weights come from."""

    seed: int = field(1234, help="Seed of weight init, dropout and data order.")
    init_from: str | None = field(
        None, help="HF checkpoint folder, IronCore checkpoint or run folder to start from (null: random); without "
        "a model: key, it is also the model."
    )


@dataclasses.dataclass
class UtilsConfig:
    """Logging and experiment tracking."""

    experiment_name: str = field("ironcore", help="MLflow experiment.")
    run_name: str | None = field(None, help="MLflow run name (null: derived from the output dir).")
    tracking: bool = field(True, help="Record the run in MLflow.")
    log_level: Literal["debug", "info", "warning", "error"] = field("info", help="Python logging level.")


# The ``dpo`` group that every run's config.yaml held before it moved to trainer.objective_options (whatever
# the objective): a saved config whose group says nothing more is read without a warning, also beside a GRPO
# run's options. A record of the past, not the dpo objective's defaults (DPOOptions in ironcore.objectives.dpo).
_DUMPED_DPO_DEFAULTS = {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "sft_weight": 0.0,
                        "reference": "live"}


@dataclasses.dataclass
class Config:
    """A whole training run. ``model`` is resolved to a full ModelConfig when loaded."""

    model: ModelConfig = field(
        ModelConfig(), help="Model name (configs/model/NAME.yaml), path to a model YAML, HF folder or IronCore "
        "checkpoint/run, or a mapping; left out with init.init_from given: init.init_from's model."
    )
    data: DataGroup = field(DataGroup(), help="Training data.")
    trainer: TrainerConfig = field(TrainerConfig(), help="Batches, parallelism, checkpoints.")
    optim: OptimConfig = field(OptimConfig(), help="Optimizer and schedule.")
    operation: OperationConfig = field(OperationConfig(), help="Steps and intervals.")
    init: InitConfig = field(InitConfig(), help="Seed and starting weights.")
    utils: UtilsConfig = field(UtilsConfig(), help="Logging and tracking.")
    dpo: dict[str, Any] | None = field(
        None, help="Deprecated: the dpo objective's options, now trainer.objective_options (same keys, docs/dpo.md); "
        "still read as those, with a warning, when trainer.objective_options is not given too.",
    )

    def validate(self) -> None:
        """Fold the deprecated ``dpo`` group into ``trainer.objective_options``, where every objective reads
        its options, so that the run (and the config.yaml it saves) has them in one place."""
        dpo, self.dpo = self.dpo, None
        if not dpo or dpo == _DUMPED_DPO_DEFAULTS:
            return
        if self.trainer.objective_options:
            raise InvalidValue("dpo", "deprecated, and trainer.objective_options is given too: give the DPO "
                               "options as trainer.objective_options only")
        log.warning("config group 'dpo' is deprecated: give its keys as trainer.objective_options (read as such)")
        self.trainer.objective_options = dict(dpo)
