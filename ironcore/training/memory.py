"""How much memory a training step needs on one GPU, before buying or renting one: the memory planner.

Four parts, per rank of a TP x DP layout:

- **parameters**: the rank's share of every tensor (TP-split tensors in
  their slice, vocabulary padding included; replicated ones whole), fp32,
  or bf16 in a ``bf16`` run; with LoRA the frozen base is stored in that
  dtype too, or (QLoRA) its projections in NF4, ~0.52 bytes per weight;
- gradients and optimizer states below are those of the *trained* tensors
  only (with LoRA: the adapters and ``modules_to_save``);
- **gradients**: fp32, as many as parameters (``.grad``, or a ``bf16``
  run's main gradients); the distributed optimizer adds its buffer for the
  rank's shard of the reduced gradients;
- **optimizer states**: AdamW's two fp32 moments per parameter and a step
  counter per tensor (SGD: one momentum), plus a ``bf16`` run's fp32 master
  weights, for the rank's shard only with the distributed optimizer (its
  buckets' padding counted);
- under **FSDP** (``data_parallel="fsdp"``) parameters, gradients and
  optimizer states are the rank's shards (dim 0 split in DP chunks, padded
  alike), and ``gathered`` counts the units all-gathered for compute (the
  root unit and two blocks in the compute dtype, one block's gradients
  before their reduce-scatter); with ``offload="params"`` the shards and
  states are ``host`` memory instead; ``checkpoint`` is what a full save
  gathers on each rank (nothing for a sharded one);
- **activations**: what autograd keeps from the forward pass for the
  backward one, for one micro-batch, loss included. Not a formula: the
  planner runs the rank's forward pass and loss on *fake* tensors (shapes
  without memory, ``FakeTensorMode``) and adds up the tensors autograd
  saves, so every layer variant, dtype (autocast) and activation
  checkpointing is counted as the real step does it. A TP rank is modelled
  by the model with its local shapes (heads, KV heads, FFN width and
  vocabulary divided over TP; hidden size, norms and residuals whole). With
  activation checkpointing the backward pass recomputes one block at a time,
  so one block's activations are added to what is saved;
- the **objective's shape** (``objective``, an objective's
  :meth:`~ironcore.objectives.base.Objective.memory_shape`): its rows per sample
  (DPO's chosen and rejected; GRPO's ``num_generations`` completions per
  prompt) and the positions a rollout adds (GRPO: prompt + completion - 1)
  set the micro-batch the activations are traced for, with the loss the
  objectives take their token log-probs with (``vocab_parallel_token_logps``);
  a frozen **reference** (DPO's live one, GRPO's with ``beta`` > 0) adds its
  weights, fp32 (FSDP: its shards); a rollout's **KV cache** (GRPO) is
  added too: on a GPU the decode arena keeps it between steps, beside the
  update's activations (a CPU's eager decode frees it before the update).
  The reference's and the sampling policy's log-prob passes run without
  autograd before the policy's forward pass, so they hold nothing then.

The first three are exact on a CPU (``measured_state_bytes`` reads the real
tensors' bytes; the tests compare). Activations ignore the allocator's
fragmentation and the temporaries of the backward pass, and there is no
CUDA context or workspace in the sum: leave a margin of a few GB on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ironcore.config.model import ModelConfig
from ironcore.models import TransformerModel
from ironcore.models.lora import NF4_BLOCK, NF4_SCALER_BLOCK, base_projections, is_quantized, tensor_bytes
from ironcore.objectives.base import MemoryShape
from ironcore.parallel import state
from ironcore.parallel.comm import DEFAULT_BUCKET_BYTES
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_token_logps
from ironcore.parallel.fsdp import fsdp_shards
from ironcore.parallel.layers import padded_vocab_size
from ironcore.parallel.sharding import full_shapes, local_tensor, named_splits
from ironcore.training.distributed_optimizer import bucket_layout
from ironcore.training.optimizer import TrainingOptimizer, as_training_optimizer

FP32 = 4
BF16 = 2


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per GPU (rank 0 of the layout) of each part of a training step."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    gathered: int = 0  # FSDP: units all-gathered for compute (root, two blocks) and one block's unsharded gradients
    host: int = 0  # offload: sharded parameters, gradients and optimizer state in host memory (not in total)
    checkpoint: int = 0  # more while a checkpoint is saved: a full one gathers every full tensor on each rank
    reference: int = 0  # a frozen reference model's weights (DPO's live one, GRPO's with beta > 0)
    kv_cache: int = 0  # a rollout's KV cache (GRPO), kept by the decode arena on a GPU

    @property
    def states(self) -> int:
        """Parameters + gradients + optimizer states: what stays allocated between steps."""
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations + self.gathered + self.reference + self.kv_cache


@dataclasses.dataclass(frozen=True)
class LocalTensor:
    """A parameter tensor as one TP rank holds it."""

    name: str
    numel: int
    row: int  # elements in one slice along dim 0 (FSDP shards whole slices)
    trained: bool  # with LoRA only the adapters and modules_to_save train
    nf4: bool  # QLoRA's frozen projections are stored in NF4

    def fsdp_shard(self, dp: int) -> int:
        """Elements of rank 0's FSDP shard: dim 0 split in ``dp`` chunks, the last ones padded to the first's size."""
        rows = self.numel // self.row if self.row else 0
        return -(-rows // dp) * self.row


def local_numels(cfg: ModelConfig, tp: int) -> list[int]:
    """Elements of each parameter tensor on one TP rank (tied tensors once), in ``model.parameters()`` order."""
    return [t.numel for t in local_parameters(cfg, tp)]


def local_parameters(cfg: ModelConfig, tp: int) -> list[LocalTensor]:
    """Each parameter tensor of one TP rank, in ``model.parameters()`` order (tied tensors once)."""
    with torch.device("meta"):
        model = TransformerModel(cfg)
    shapes, splits = full_shapes(model), named_splits(model)
    nf4 = {name for name, _ in base_projections(model)} if cfg.lora and cfg.lora.quantize_base == "nf4" else set()
    found = []
    for name, param in model.named_parameters():
        split = splits.get(name)
        if split is not None and split.padded is not None:  # the padding grows with TP: a multiple of 128 x tp
            split = dataclasses.replace(split, padded=padded_vocab_size(split.parts[0], tp))
        shape = shapes[name] if split is None else split.local_shape(shapes[name], tp)
        found.append(LocalTensor(name, shape.numel(), shape[1:].numel(), param.requires_grad, name in nf4))
    return found


def nf4_bytes(numel: int, dtype_bytes: int) -> int:
    """Bytes of torchao's NF4 tensor of ``numel`` weights: 4 bits each, an int8 scale per 64 weights, a scale of
    those scales per 256 of them, their mean and the 16-value code book in the weights' dtype."""
    blocks = numel // NF4_BLOCK
    return numel // 2 + blocks + dtype_bytes * (blocks // math.gcd(blocks, NF4_SCALER_BLOCK) + 1 + 16)


def rank_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """A model with the shapes one TP rank computes: heads, KV heads, FFN width and (padded) vocabulary divided
    over ``tp``; hidden size and head width whole."""
    if tp == 1:
        return cfg
    kv = cfg.kv_heads * max(1, tp // cfg.kv_heads) // tp
    return dataclasses.replace(
        cfg, num_attention_heads=cfg.num_attention_heads // tp, num_key_value_heads=kv, head_dim=cfg.head_size,
        ffn_hidden_size=cfg.ffn_size // tp, vocab_size=padded_vocab_size(cfg.vocab_size, tp) // tp,
    )  # fmt: skip


def activation_bytes(cfg: ModelConfig, micro_batch_size: int, seq_len: int, precision: str = "fp32",
                     activation_checkpointing: bool = False, token_logps: bool = False) -> int:  # fmt: skip
    """Bytes autograd saves in one micro-batch's forward pass and loss (run on fake tensors: no memory used);
    ``token_logps``: the loss is taken as DPO and GRPO take it (:func:`vocab_parallel_token_logps`, which saves
    the logits), not as the language model's cross-entropy (which saves an fp32 log-softmax)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ironcore.training.trainer import apply_activation_checkpointing

    def saved(model_cfg: ModelConfig, checkpointing: bool) -> int:
        with FakeTensorMode():
            model = TransformerModel(model_cfg)
            for p in model.parameters() if precision == "bf16" else ():  # what the bf16 optimizer does to them
                p.data = p.data.to(torch.bfloat16)
            if checkpointing:
                apply_activation_checkpointing(model)
            weights = {p.untyped_storage()._cdata for p in model.parameters()}
            storages: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                if storage._cdata not in weights:
                    storages[storage._cdata] = storage.nbytes()
                return t

            tokens = torch.zeros(micro_batch_size, seq_len + 1, dtype=torch.long)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                out = model(tokens[:, :-1], parallel_output=True)
                if model_cfg.score_head:  # a reward model's head is a column: no vocabulary
                    pass
                elif token_logps:
                    vocab_parallel_token_logps(out, tokens[:, 1:])[0].sum()
                else:
                    vocab_parallel_cross_entropy(out, tokens[:, 1:]).sum()
        return sum(storages.values())

    total = saved(cfg, activation_checkpointing)
    if activation_checkpointing:  # the backward pass recomputes one block's activations at a time
        one, two = (saved(dataclasses.replace(cfg, num_layers=n), False) for n in (1, 2))
        total += two - one
    return total


@contextmanager
def _as_one_process() -> Iterator[None]:
    """No process groups while planning: the planner builds TP=1 models and divides their shapes itself (in a
    TP process the layers would be split twice, and the loss would communicate)."""
    tp, dp = state.tp_group(), state.dp_group()
    state.set_tensor_parallel_group(None)
    state.set_data_parallel_group(None)
    try:
        yield
    finally:
        state.set_tensor_parallel_group(tp)
        state.set_data_parallel_group(dp)


def plan_memory(cfg: ModelConfig, *, tp: int = 1, dp: int = 1, distributed_optimizer: bool = False,
                data_parallel: str | None = None, offload: str = "none", reshard_after_forward: bool = True,
                sharded_checkpoints: bool | None = None,
                precision: str = "fp32", activation_checkpointing: bool = False, micro_batch_size: int = 1,
                seq_len: int | None = None, optimizer: str = "adamw",
                bucket_bytes: int = DEFAULT_BUCKET_BYTES, objective: MemoryShape | None = None) -> MemoryPlan:  # fmt: skip
    """The bytes of one training step on rank 0 of a TP x DP layout (see the module doc); a ConfigError when the
    trainer would refuse to split the model ``tp`` ways. ``data_parallel`` (ddp, zero1, fsdp; None: zero1 when
    ``distributed_optimizer``), ``offload``, ``reshard_after_forward`` and ``sharded_checkpoints`` (None: with
    fsdp) as in the trainer's config. ``micro_batch_size`` counts samples (prompts, pairs) and ``seq_len`` is
    the data's; ``objective`` (None: a language model's) says what a sample becomes."""
    cfg.check_tensor_parallel(tp, "tp")
    layout = data_parallel or ("zero1" if distributed_optimizer else "ddp")
    base = BF16 if precision == "bf16" else FP32  # LoRA's frozen base: stored in the compute dtype
    with _as_one_process():
        tensors = local_parameters(cfg, tp)
        if fsdp_shards(layout, dp, offload):
            params, grads, states, gathered = _fsdp_bytes(tensors, dp, base, optimizer, reshard_after_forward)
        else:
            trained = [t.numel for t in tensors if t.trained]
            params, grads, states = _state_bytes(trained, dp=dp, precision=precision, optimizer=optimizer,
                                                 distributed_optimizer=layout == "zero1", bucket_bytes=bucket_bytes)
            params += sum(nf4_bytes(t.numel, base) if t.nf4 else t.numel * base for t in tensors if not t.trained)
            gathered = 0
        shape = objective or MemoryShape()
        positions = (seq_len or cfg.max_position_embeddings) + max(0, shape.new_tokens - 1)
        local = rank_config(cfg, tp)
        activations = activation_bytes(local, micro_batch_size * shape.rows_per_sample, positions, precision,
                                       activation_checkpointing, token_logps=objective is not None)
        sharded_dp = dp if fsdp_shards(layout, dp, offload) else 1
        reference = sum(t.fsdp_shard(sharded_dp) for t in tensors) * FP32 if shape.reference else 0
        kv_cache = (kv_cache_bytes(local, micro_batch_size * shape.rows_per_sample, positions + 1, precision)
                    if shape.kv_cache else 0)  # fmt: skip
        sharded = layout == "fsdp" if sharded_checkpoints is None else sharded_checkpoints
        checkpoint = 0 if sharded else _full_checkpoint_bytes(tensors if tp == 1 else local_parameters(cfg, 1),
                                                              optimizer)
    host = 0
    if offload == "params" and fsdp_shards(layout, dp, offload):
        host, params, grads, states = params + grads + states, 0, 0, 0
    return MemoryPlan(params, grads, states, activations, gathered, host, checkpoint, reference, kv_cache)


def kv_cache_bytes(cfg: ModelConfig, rows: int, positions: int, precision: str = "fp32") -> int:
    """Keys and values of every layer for ``rows`` x ``positions`` (one TP rank's KV heads, ``cfg`` from
    :func:`rank_config`), in the compute dtype."""
    return 2 * cfg.num_layers * rows * positions * cfg.kv_heads * cfg.head_size * (BF16 if precision == "bf16" else FP32)


def _fsdp_bytes(tensors: list[LocalTensor], dp: int, base: int, optimizer: str,
                reshard: bool = True) -> tuple[int, int, int, int]:  # fmt: skip
    """Parameters, gradients, optimizer states and gathered units of rank 0 under FSDP: every tensor's shard
    (:meth:`LocalTensor.fsdp_shard`), fp32 for the trained ones (they are the master weights), the frozen in
    ``base``; the root unit (everything outside the blocks) and two blocks (one prefetched; without
    ``reshard`` after the forward pass: every block) gathered in the compute dtype ``base``, one block's
    gradients unsharded in fp32 before their reduce-scatter."""
    trained = [t.fsdp_shard(dp) for t in tensors if t.trained]
    params = sum(trained) * FP32 + sum(t.fsdp_shard(dp) * base for t in tensors if not t.trained)
    states = _optimizer_bytes(trained, optimizer)
    blocks: dict[str, int] = {}
    for t in tensors:
        unit = ".".join(t.name.split(".")[:2]) if t.name.startswith("layers.") else "root"
        blocks[unit] = blocks.get(unit, 0) + t.numel
    root, block = blocks.pop("root", 0), max(blocks.values(), default=0)
    held = 2 * block if reshard else sum(blocks.values())
    return params, sum(trained) * FP32, states, (root + held) * base + block * FP32


def _full_checkpoint_bytes(tensors: list[LocalTensor], optimizer: str) -> int:
    """What a full save gathers on each rank: every trained tensor in full, fp32, and its optimizer moments."""
    return (1 + _moments(optimizer)) * sum(t.numel for t in tensors if t.trained) * FP32


def _state_bytes(numels: list[int], *, dp: int, distributed_optimizer: bool, precision: str, optimizer: str,
                 bucket_bytes: int) -> tuple[int, int, int]:  # fmt: skip
    """Parameters, gradients and optimizer states of one rank whose parameter tensors have ``numels``."""
    params = grads = sum(numels) * FP32
    master = 0
    if distributed_optimizer or precision == "bf16":  # parameters and gradients in flat buffers of padded buckets
        shards = dp if distributed_optimizer else 1
        buckets, offsets = bucket_layout(numels, shards, bucket_bytes // FP32)
        total = sum(b.size for b in buckets)
        params, grads = total * (BF16 if precision == "bf16" else FP32), total * FP32
        owned = [0] * len(numels)  # elements of each tensor in rank 0's slices
        for i, n in enumerate(numels):
            start, size = next((b.start, b.size) for b in buckets if b.start <= offsets[i] < b.start + b.size)
            low, high = start, start + size // shards
            owned[i] = max(0, min(offsets[i] + n, high) - max(offsets[i], low))
        if shards > 1:
            grads += total // shards * FP32  # the shard's reduced gradients
        if precision == "bf16":
            master = total // shards * FP32
        counted = [n for n in owned if n]
    else:
        counted = numels
    states = master + _optimizer_bytes(counted, optimizer)
    return params, grads, states


def measured_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | TrainingOptimizer
                         ) -> tuple[int, int, int]:  # fmt: skip
    """The bytes that parameters, gradients and optimizer states hold now (each storage once): what
    :func:`plan_memory` predicts, read from the real tensors."""

    def nbytes(tensors: list[torch.Tensor]) -> int:
        tensors = [local_tensor(t) for t in tensors]  # an FSDP shard's storage, padding included
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors if not is_quantized(t)}
        return sum(storages.values()) + sum(tensor_bytes(t) for t in tensors if is_quantized(t))

    params = [p for p in model.parameters()]
    buffers, states = as_training_optimizer(optimizer, model).memory_tensors()
    grads = [p.grad for p in params if p.grad is not None] + buffers
    return nbytes(params), nbytes(grads), nbytes(states)


def _moments(optimizer: str) -> int:
    """fp32 tensors of its parameter's size that the optimizer keeps per parameter (AdamW 2, SGD's momentum 1)."""
    return 1 if optimizer == "sgd" else 2


def _optimizer_bytes(numels: list[int], optimizer: str) -> int:
    """The optimizer state of tensors of ``numels`` elements: its moments, and AdamW's step count per tensor."""
    return _moments(optimizer) * sum(numels) * FP32 + (FP32 * len(numels) if optimizer != "sgd" else 0)
