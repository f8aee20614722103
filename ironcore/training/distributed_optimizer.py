"""The distributed optimizer (ZeRO-1, Megatron-LM's ``DistributedOptimizer``): optimizer state sharded over DP.

Plain data parallelism keeps a whole copy of the optimizer on every rank:
with AdamW 8 bytes of state per parameter (``exp_avg``, ``exp_avg_sq``), more
than the fp32 weights themselves. Here each data-parallel rank owns a shard
of the parameters and keeps the optimizer state of that shard only:

1. The parameters and their gradients live in two flat buffers (the
   parameters become views into one, ``.grad`` views into the other), cut
   into buckets of whole parameters, last layers first (the order the
   backward pass finishes them). Each bucket is padded to a multiple of the DP
   size; rank r owns the r-th slice of every bucket.
2. After the backward pass (and the tensor-parallel gradient sums) each
   bucket's gradients are *reduce-scattered*: rank r receives the sum over
   ranks of its slice only (half the bytes of an all-reduce's result).
3. The global gradient norm is summed from the shards (over DP, then over
   TP for TP-split tensors); clipping scales the step as in plain training.
4. The inner optimizer (fused AdamW, with the run's weight-decay groups)
   steps the owned slices: one fragment per parameter that meets the shard,
   a view into the flat parameter buffer.
5. The updated slices are *all-gathered* into every rank's parameters.

With ``overlap`` the reduction of a bucket starts (asynchronously) as soon
as the backward pass has finished all its gradients, while the backward pass
goes on with earlier layers: a hook after each parameter's gradient
accumulation counts them. Only the last micro-batch of a step may start
reductions: the trainer calls :meth:`arm` before that micro-batch's forward
pass (accumulation steps before it communicate nothing), and
:meth:`reduce_gradients` waits for the reductions and runs those of buckets
that did not complete (parameters without a gradient in that pass).

The arithmetic is that of plain DP: the same sums, the same float64 gradient
norm (``parallel.grad.sum_of_squares``), the clipping factor applied the same
way (:func:`scaled_step`), the same AdamW update element by element. At DP=2
the losses and parameters are those of plain DP bit for bit (a reduction of
two numbers has one order); with more ranks the ring adds three or more in
another grouping than the all-reduce, and they agree to rounding.

``state_dict()`` gathers the shards into the per-parameter layout of the
inner optimizer's own state dict (``exp_avg`` with its parameter's shape), so
checkpoints are the same files with or without this optimizer, at any DP
size, and go through the TP gathering of ``parallel.sharding`` unchanged.

With TP, each TP rank shards its own (TP-local) parameters over its DP
group: the two compose without knowing of each other.

**Mixed precision the Megatron way** (``param_dtype=torch.bfloat16``, what
``trainer.precision: bf16`` builds, with or without sharding): the model's
parameters become bf16 views of the flat buffer, so forward and backward
run in bf16 without casting weights; each backward's bf16 gradient is
added into an fp32 *main gradient* (``param.main_grad``, a view of the fp32
flat gradient buffer) by a hook and dropped, so accumulation over
micro-batches and the DP reduction are fp32; the inner optimizer steps fp32
*master weights* of the owned shard, which are rounded into the bf16
parameters after each step. Checkpoints take the master weights
(:meth:`master_weights`) as the model's weights, so a resumed run continues
from the fp32 values. :class:`MixedPrecisionOptimizer` keeps all of it but
owns everything on every rank (plain data parallelism: an all-reduce per
bucket).

One class, :class:`FlatBufferOptimizer`, does both; the two names say which
one a run has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ironcore.parallel import comm, state
from ironcore.parallel.grad import sum_of_squares, sync_tensor_parallel_grads
from ironcore.parallel.sharding import full_optimizer_state, load_full_optimizer_state, named_splits
from ironcore.training.optimizer import scaled_step, state_tensors


@dataclasses.dataclass
class _Bucket:
    start: int  # first element in the flat buffers
    size: int  # elements, padded to a multiple of the DP size
    shard: int  # where this rank's slice starts in the flat shard

    def owned(self, dp: int, rank: int) -> tuple[int, int]:
        """This rank's slice of the bucket, as flat-buffer offsets."""
        n = self.size // dp
        return self.start + rank * n, self.start + (rank + 1) * n


@dataclasses.dataclass
class _Fragment:
    param: nn.Parameter
    begin: int  # the fragment's first element within the parameter (flattened)
    end: int
    tensor: torch.Tensor  # the owned elements: a view of the flat parameter buffer, stepped by the inner optimizer
    counted: torch.Tensor | None  # which elements count in the gradient norm on this TP rank (None: all)
    split: bool  # the parameter is TP-split: its squares are summed over TP ranks too


def bucket_layout(numels: list[int], dp: int, bucket_numel: int) -> tuple[list[_Bucket], list[int]]:
    """Buckets of whole tensors of ``numels`` elements, the last tensors first (the backward pass finishes them
    first), each padded to a multiple of ``dp``; and where each tensor starts in the flat buffers."""
    buckets, offsets, start, filled, shard = [], [0] * len(numels), 0, 0, 0
    for i in reversed(range(len(numels))):
        offsets[i] = start + filled
        filled += numels[i]
        if filled >= bucket_numel or i == 0:
            size = -(-filled // dp) * dp
            buckets.append(_Bucket(start, size, shard))
            start, shard, filled = start + size, shard + size // dp, 0
    return buckets, offsets


class FlatBufferOptimizer:
    """``build(groups)``'s optimizer over flat parameter and gradient buffers (see the module doc); with
    ``shard`` each DP rank owns a shard of them (:class:`DistributedOptimizer`), without every rank owns
    everything (:class:`MixedPrecisionOptimizer`).

    A :class:`~ironcore.training.optimizer.TrainingOptimizer`: :meth:`finish_grad_sync` (the TP sums, then
    :meth:`reduce_gradients`) and :meth:`grad_norm` replace the DP all-reduce and the norm of plain training.
    ``state_dict`` and ``load_state_dict`` speak torch's per-parameter layout, so the TP gathering of
    ``parallel.sharding`` takes this optimizer as it takes a torch one.
    """

    def __init__(self, model: nn.Module, groups: list[dict], build: Callable[[list[dict]], torch.optim.Optimizer],
                 *, bucket_bytes: int = comm.DEFAULT_BUCKET_BYTES, overlap: bool = False,
                 param_dtype: torch.dtype | None = None, shard: bool = True) -> None:  # fmt: skip
        self.model, self.param_groups = model, groups
        params = [p for g in groups for p in g["params"]]
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"the flat-buffer optimizer needs parameters of one dtype, got {sorted(map(str, dtypes))}")
        self.dp, self.rank = state.dp_size(), state.dp_rank()
        # Ranks the state is sharded over, and this rank's place among them (1 and 0: every rank owns all).
        self.shards, self.shard_rank = (self.dp, self.rank) if shard else (1, 0)
        self.buckets, starts = bucket_layout([p.numel() for p in params], self.shards,
                                             bucket_bytes // params[0].element_size())  # fmt: skip
        self._offsets = dict(zip(params, starts, strict=True))
        self._bucket_of = {p: next(i for i, b in enumerate(self.buckets)
                                   if b.start <= self._offsets[p] < b.start + b.size) for p in params}  # fmt: skip
        original = self._flat_buffers(params, param_dtype or params[0].dtype)
        self.fragments: list[_Fragment] = []
        self.inner = build([self._shard_group(group, original) for group in groups])
        self.defaults = self.inner.defaults
        # Overlap: how many of each bucket's parameters are done, the running reductions.
        self.overlap = overlap and self.shards > 1
        self._armed = False
        self._sizes = [sum(1 for p in params if self._bucket_of[p] == i) for i in range(len(self.buckets))]
        self._done = [0] * len(self.buckets)
        self._pending: dict[int, object] = {}  # bucket -> its collective's handle
        self.early = 0  # buckets whose reduction the last step started during its backward pass
        if self.overlap:
            for p in params:
                p.register_post_accumulate_grad_hook(self._ready)

    def _flat_buffers(self, params: list[nn.Parameter], dtype: torch.dtype) -> dict[nn.Parameter, torch.Tensor]:
        """Allocate the flat buffers and make the parameters (in ``dtype``) and their gradients views of them;
        returns the parameters' original values (the master weights start from these, before rounding)."""
        device, main_dtype = params[0].device, params[0].dtype
        self.mixed = dtype != main_dtype  # low-precision parameters, fp32 main gradients and master weights
        total = self.buckets[-1].start + self.buckets[-1].size
        self.params = torch.zeros(total, dtype=dtype, device=device)
        self.grads = torch.zeros(total, dtype=main_dtype, device=device)
        # With one shard the shard is everything: no second gradient buffer, no reduce-scatter.
        shard_numel = sum(b.size for b in self.buckets) // self.shards
        self.shard_grads = self.grads if self.shards == 1 else torch.zeros(shard_numel, dtype=main_dtype, device=device)
        self.master = torch.zeros(shard_numel, dtype=main_dtype, device=device) if self.mixed else None
        original = {p: p.data for p in params}
        for p in params:  # parameters and gradients become views of the flat buffers
            start = self._offsets[p]
            view = self.params[start : start + p.numel()].view_as(p)
            view.copy_(p.data)
            p.data = view
            grad = self.grads[start : start + p.numel()].view_as(p)
            if self.mixed:
                p.main_grad = grad
                p.register_post_accumulate_grad_hook(_accumulate_main_grad)
            else:
                p.grad = grad
        return original

    def _shard_group(self, group: dict, original: dict[nn.Parameter, torch.Tensor]) -> dict:
        """``group`` for the inner optimizer: one fragment per parameter that meets this rank's slices (added to
        ``self.fragments``), a view of the flat parameter buffer or of the master weights."""
        names = {p: n for n, p in self.model.named_parameters()}
        splits = named_splits(self.model)
        tp, tp_rank = state.tp_size(), state.tp_rank()
        fragments = []
        for p in group["params"]:
            offset, bucket = self._offsets[p], self.buckets[self._bucket_of[p]]
            low, high = bucket.owned(self.shards, self.shard_rank)
            begin, end = max(offset, low) - offset, min(offset + p.numel(), high) - offset
            if begin >= end:
                continue
            split = splits.get(names[p])
            counted = None
            if split is not None and max(split.replicas) > 1:  # replicated KV heads count on one rank only
                mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
                index = torch.arange(p.numel(), device=p.device).view_as(p)
                for piece in split.owned_pieces(index, tp, tp_rank):
                    mask[piece.reshape(-1)] = True
                counted = mask[begin:end]
            at = bucket.shard + offset + begin - low  # the fragment's place in the shard
            if self.master is None:
                tensor = self.params[offset + begin : offset + end]
            else:
                tensor = self.master[at : at + end - begin]
                tensor.copy_(original[p].reshape(-1)[begin:end])
            tensor.grad = self.shard_grads[at : at + end - begin]
            fragments.append(_Fragment(p, begin, end, tensor, counted, split is not None))
        self.fragments += fragments
        return {**{k: v for k, v in group.items() if k != "params"}, "params": [f.tensor for f in fragments]}

    def arm(self) -> None:
        """The next backward pass is the step's last: with ``overlap`` its finished buckets start their reductions
        at once (without, nothing happens)."""
        self._armed = self.overlap

    def _ready(self, param: nn.Parameter) -> None:
        if not self._armed:
            return
        i = self._bucket_of[param]
        if i in self._pending:
            raise RuntimeError("a gradient was accumulated after its bucket's reduction had started: more than one "
                               "backward pass followed arm() (the objective's backward loop)")  # fmt: skip
        self._done[i] += 1
        if self._done[i] == self._sizes[i]:
            self._pending[i] = self._reduce(i, async_op=True)

    def _reduce(self, i: int, async_op: bool = False) -> object:
        """Start (or run) bucket ``i``'s reduction into this rank's shard (unsharded: an all-reduce)."""
        b = self.buckets[i]
        if self.shards == 1:
            return comm.all_reduce(self.grads[b.start : b.start + b.size], state.dp_group())
        low, high = b.owned(self.shards, self.shard_rank)
        return comm.reduce_scatter(self.grads[b.start : b.start + b.size],
                                   self.shard_grads[b.shard : b.shard + high - low], state.dp_group(),
                                   async_op=async_op)  # fmt: skip

    def finish_grad_sync(self) -> None:
        """The TP sums of the gradients, then their DP reduction into the shards (:meth:`reduce_gradients`)."""
        sync_tensor_parallel_grads(self.model)
        self.reduce_gradients()

    def reduce_gradients(self) -> None:
        """Each rank receives the sum over DP ranks of its shard's gradients (call after the TP sums)."""
        if self.dp == 1:
            return
        for i in range(len(self.buckets)):
            if i in self._pending:
                self._pending[i].wait()
            else:
                self._reduce(i)
        self.early = len(self._pending)
        self._armed, self._done, self._pending = False, [0] * len(self.buckets), {}

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of the whole model's reduced gradient, from the shards (collective over DP and TP)."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.grads.device)  # TP-split, replicated
        if state.tp_size() == 1:  # every element counts once: one pass over the shard (its padding is zeros)
            sums[1] = sum_of_squares([self.shard_grads], sums.device)
        else:
            for f in self.fragments:
                grad = f.tensor.grad if f.counted is None else f.tensor.grad[f.counted]
                sums[0 if f.split else 1] += sum_of_squares([grad], sums.device)
        if self.shards > 1:
            comm.all_reduce(sums, state.dp_group())
        split = comm.all_reduce(sums[:1].clone(), state.tp_group())
        return (split[0] + sums[1]).sqrt().float()

    @torch.no_grad()
    def step(self, scale: float = 1.0) -> None:
        """Step the shard (gradients times ``scale``, the clipping factor), then all-gather the parameters."""
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner.update({k: v for k, v in outer.items() if k != "params"})
        scaled_step(self.inner, scale)
        for b in self.buckets:
            low, high = b.owned(self.shards, self.shard_rank)
            if self.master is not None:  # round the stepped master weights into the parameters
                self.params[low:high] = self.master[b.shard : b.shard + high - low]
            if self.shards > 1:
                comm.all_gather_into(self.params[b.start : b.start + b.size], self.params[low:high], state.dp_group())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffer (the ``.grad`` views stay: ``set_to_none`` is ignored; the shard's gradients
        are overwritten by the next reduce-scatter)."""
        self.grads.zero_()

    def state_dict(self) -> dict:
        """The inner optimizer's state dict as plain (non-sharded) training would write it: per parameter,
        state tensors of the parameter's shape (gathered over DP), indexed in ``param_groups`` order."""
        inner = self.inner.state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        per_fragment = {id(f.tensor): self.inner.state.get(f.tensor, {}) for f in self.fragments}
        keys = {k for s in per_fragment.values() for k, v in s.items() if _shardable(v)}
        full = {k: self._gather({id(f.tensor): per_fragment[id(f.tensor)][k] for f in self.fragments
                                 if k in per_fragment[id(f.tensor)]}) for k in sorted(keys)}  # fmt: skip
        scalars = next((dict(s) for s in per_fragment.values() if s), {})
        out = {}
        if keys or scalars:
            for i, p in enumerate(params):
                # One step counter per parameter, as AdamW keeps them: a shared one would be bumped once per
                # parameter by the optimizer that loads it.
                out[i] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in scalars.items()
                          if not _shardable(v)}  # fmt: skip
                out[i].update({k: full[k][self._offsets[p] : self._offsets[p] + p.numel()].view_as(p).clone()
                               for k in keys})  # fmt: skip
        groups, index = [], 0
        for outer, group in zip(self.param_groups, inner["param_groups"], strict=True):
            groups.append({**group, "params": list(range(index, index + len(outer["params"])))})
            index += len(outer["params"])
        return {"state": out, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict in the layout :meth:`state_dict` writes (from this optimizer or a plain one)."""
        params = [p for g in self.param_groups for p in g["params"]]
        inner_state = {}
        index = {id(f.tensor): i for i, f in enumerate(self.fragments)}
        for i, values in state_dict["state"].items():
            p = params[int(i)]
            for f in (f for f in self.fragments if f.param is p):
                inner_state[index[id(f.tensor)]] = {
                    k: v.reshape(-1)[f.begin : f.end].clone() if _shardable(v) else  # not views of the whole
                    v.clone() if isinstance(v, torch.Tensor) else v for k, v in values.items()}  # fmt: skip
        groups, start = [], 0
        for outer, group in zip(self.param_groups, state_dict["param_groups"], strict=True):
            count = sum(1 for f in self.fragments if any(f.param is p for p in outer["params"]))
            groups.append({**group, "params": list(range(start, start + count))})
            start += count
            outer.update({k: v for k, v in group.items() if k != "params"})
        self.inner.load_state_dict({"state": inner_state, "param_groups": groups})

    def _gather(self, shard_values: dict[int, torch.Tensor]) -> torch.Tensor:
        """A state tensor of the whole flat layout from every rank's fragments (collective over DP)."""
        shard = torch.zeros_like(self.shard_grads, dtype=torch.float32)
        for f in self.fragments:
            if id(f.tensor) in shard_values:
                b = self.buckets[self._bucket_of[f.param]]
                at = b.shard + self._offsets[f.param] + f.begin - b.owned(self.shards, self.shard_rank)[0]
                shard[at : at + f.end - f.begin] = shard_values[id(f.tensor)]
        if self.shards == 1:
            return shard
        full = torch.zeros(self.params.numel(), dtype=torch.float32, device=self.params.device)
        for b in self.buckets:
            n = b.size // self.shards
            comm.all_gather_into(full[b.start : b.start + b.size], shard[b.shard : b.shard + n], state.dp_group())
        return full

    def full_state_dict(self) -> dict:
        """The checkpoint's optimizer state: :meth:`state_dict` keyed by parameter name, gathered over TP."""
        return full_optimizer_state(self.model, self)

    def load_full_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint's optimizer state (written at any TP/DP layout, with or without this optimizer)."""
        load_full_optimizer_state(self.model, self, state_dict)

    def local_state_dict(self) -> dict:
        """Not kept per parameter (flat shards): this optimizer's runs write full checkpoints."""
        raise NotImplementedError("the flat-buffer optimizers write full checkpoints (trainer.checkpoint_format)")

    def load_local_state_dict(self, state_dict: dict) -> None:
        """Not kept per parameter: a sharded checkpoint is read in full (:meth:`load_full_state_dict`)."""
        raise NotImplementedError("the flat-buffer optimizers load full states")

    def master_weights(self) -> dict[str, torch.Tensor]:
        """With low-precision parameters: the fp32 master weights by parameter name, in the parameters' (TP-local)
        shapes, gathered over DP (collective); without: {} (the parameters are the weights)."""
        if self.master is None:
            return {}
        full = self._gather({id(f.tensor): f.tensor for f in self.fragments})
        return {name: full[self._offsets[p] : self._offsets[p] + p.numel()].view_as(p).clone()
                for name, p in self.model.named_parameters() if p in self._offsets}  # fmt: skip

    @torch.no_grad()
    def load_master_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the master weights from fp32 values in the parameters' (TP-local) shapes, e.g. a checkpoint's
        (the parameters hold them rounded already); nothing to do without low-precision parameters."""
        if self.master is None:
            return
        names = {p: n for n, p in self.model.named_parameters()}
        for f in self.fragments:
            f.tensor.copy_(weights[names[f.param]].reshape(-1)[f.begin : f.end])

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (the shard's AdamW moments, and master weights if any)."""
        master = 0 if self.master is None else self.master.numel() * self.master.element_size()
        return master + sum(v.numel() * v.element_size() for s in self.inner.state.values() for v in s.values()
                            if _shardable(v))  # fmt: skip

    def memory_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The flat gradient buffers (main gradients, the shard's reduced ones); the inner optimizer's state and
        the master weights."""
        master = [] if self.master is None else [self.master]
        return [self.grads, self.shard_grads], state_tensors(self.inner) + master

    def report(self) -> str | None:
        """With ``overlap``: how many buckets the last step reduced during its backward pass."""
        if not self.overlap:
            return None
        return f"gradient reduction: {self.early} of {len(self.buckets)} buckets started during the backward pass"


class DistributedOptimizer(FlatBufferOptimizer):
    """ZeRO-1 (Megatron-LM's ``DistributedOptimizer``): the optimizer state, and with ``param_dtype`` the master
    weights, sharded over the data-parallel ranks; ``overlap`` starts each bucket's reduce-scatter during the
    step's last backward pass."""

    def __init__(self, model: nn.Module, groups: list[dict], build: Callable[[list[dict]], torch.optim.Optimizer],
                 *, bucket_bytes: int = comm.DEFAULT_BUCKET_BYTES, overlap: bool = False,
                 param_dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__(model, groups, build, bucket_bytes=bucket_bytes, overlap=overlap, param_dtype=param_dtype,
                         shard=True)  # fmt: skip


class MixedPrecisionOptimizer(FlatBufferOptimizer):
    """Low-precision (bf16) parameters with fp32 main gradients and master weights, unsharded: every rank keeps
    all of the state and all-reduces each bucket (Megatron's ``Float16OptimizerWithFloat16Params``)."""

    def __init__(self, model: nn.Module, groups: list[dict], build: Callable[[list[dict]], torch.optim.Optimizer],
                 *, bucket_bytes: int = comm.DEFAULT_BUCKET_BYTES, param_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(model, groups, build, bucket_bytes=bucket_bytes, param_dtype=param_dtype, shard=False)


def _shardable(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _accumulate_main_grad(param: nn.Parameter) -> None:
    """Add a backward pass's low-precision gradient into the fp32 main gradient and drop it."""
    param.main_grad.add_(param.grad)
    param.grad = None
