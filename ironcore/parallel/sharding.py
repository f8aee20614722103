"""How a tensor-parallel tensor's full form maps onto ranks, and moving between the two.

A TP-split layer records a :class:`TPSplit` for each split tensor in its
``tp_splits`` dict (parameter name -> split). Everything else is replicated:
every rank holds the whole tensor. The split knows

* the dimension that is split and the *logical parts* along it (fused q/k/v,
  fused gate/up): each part is split on its own, so a rank holds matching
  slices of every part;
* per part, how many neighbouring ranks share one slice (``replicas``): 1 for
  a plain split, ``tp / kv_heads`` for the key/value heads of GQA/MQA when
  there are fewer of them than ranks;
* for vocabulary tensors, the padded size (a multiple of 128 x tp): padding
  rows are zeros, exist only in the sharded form and never in the full form.

The full form is exactly the TP=1 tensor *without* vocab padding, so a full
state dict is independent of the layout that wrote it: saved at TP=2, it
loads at TP=1 or TP=4, and HF export needs nothing else. Optimizer states
(``exp_avg``, ``exp_avg_sq``) have their parameter's shape and go through the
same functions.

``gather_tensor`` and everything built on it is a collective: every rank of
the tensor-parallel group must call it, in the same order.

Under FSDP (``trainer.data_parallel: fsdp``) a parameter is a DTensor: its
TP-local form sharded over the data-parallel ranks along dim 0. The functions
here take it as its TP-local form (gathered over DP where they gather, split
back where they load), and :func:`full_pieces` says where each rank's piece
lies in the full tensor, for sharded checkpoints and the gradient norm.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Collection, Mapping

import torch
from torch import nn

from ironcore.errors import CheckpointError
from ironcore.parallel import comm, state


@dataclasses.dataclass(frozen=True)
class TPSplit:
    """Layout of one TP-split tensor: split along ``dim`` into ``parts`` (full sizes), see the module doc."""

    dim: int
    parts: tuple[int, ...]
    replicas: tuple[int, ...] | None = None  # ranks sharing one slice of each part (None: all 1)
    padded: int | None = None  # full size along dim after vocab padding (single part only)

    def __post_init__(self) -> None:
        if self.replicas is None:
            object.__setattr__(self, "replicas", (1,) * len(self.parts))
        if self.padded is not None and len(self.parts) != 1:
            raise ValueError("only a single-part (vocabulary) split can be padded")

    def _padded_parts(self) -> tuple[int, ...]:
        return self.parts if self.padded is None else (self.padded,)

    def local_sizes(self, tp: int) -> list[int]:
        """Size along ``dim`` of this rank's slice of each part; ValueError when a part does not split evenly."""
        sizes = []
        for full, reps in zip(self._padded_parts(), self.replicas):
            if tp % reps or full % (tp // reps):
                raise ValueError(
                    f"a tensor part of size {full} cannot be split over the tensor-parallel size {tp}"
                    + (f" with {reps} ranks sharing each slice" if reps > 1 else "")
                )
            sizes.append(full // (tp // reps))
        return sizes

    def local_shape(self, full_shape: torch.Size | tuple[int, ...], tp: int) -> torch.Size:
        shape = list(full_shape)
        shape[self.dim] = sum(self.local_sizes(tp))
        return torch.Size(shape)

    def full_shape(self, local_shape: torch.Size | tuple[int, ...]) -> torch.Size:
        shape = list(local_shape)
        shape[self.dim] = sum(self.parts)
        return torch.Size(shape)

    def shard(self, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
        """Rank ``rank``'s slice of the full tensor (vocab padding appended as zeros)."""
        if self.padded is not None and self.padded > full.shape[self.dim]:
            pad_shape = list(full.shape)
            pad_shape[self.dim] = self.padded - full.shape[self.dim]
            full = torch.cat([full, full.new_zeros(pad_shape)], dim=self.dim)
        pieces = [
            part.chunk(tp // reps, dim=self.dim)[rank // reps]
            for part, reps in zip(full.split(list(self._padded_parts()), dim=self.dim), self.replicas)
        ]
        return torch.cat(pieces, dim=self.dim) if len(pieces) > 1 else pieces[0]

    def assemble(self, locals_by_rank: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's slice (the inverse of ``shard``), padding dropped."""
        tp = len(locals_by_rank)
        by_rank = [t.split(self.local_sizes(tp), dim=self.dim) for t in locals_by_rank]
        full = torch.cat(
            [
                torch.cat([by_rank[owner][i] for owner in range(0, tp, reps)], dim=self.dim)
                for i, reps in enumerate(self.replicas)
            ],
            dim=self.dim,
        )
        return full.narrow(self.dim, 0, sum(self.parts))

    def owned_pieces(self, local: torch.Tensor, tp: int, rank: int) -> list[torch.Tensor]:
        """The pieces of ``local`` this rank is the one owner of (first of the ranks sharing a slice)."""
        pieces = local.split(self.local_sizes(tp), dim=self.dim)
        return [p for p, reps in zip(pieces, self.replicas) if rank % reps == 0]


@dataclasses.dataclass(frozen=True)
class FullPiece:
    """A rectangular piece of a full tensor that this rank holds: where it starts in the full tensor, a view of
    it in the rank's own tensor, and whether this rank is its one owner (the first of the ranks holding it)."""

    offsets: tuple[int, ...]
    view: torch.Tensor
    owner: bool


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Is ``tensor`` a DTensor (an FSDP parameter)? Asked without importing :mod:`torch.distributed.tensor`, which
    costs every command 0.7 s at start-up: no DTensor exists before something (FSDP, DCP) imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: an FSDP DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_pieces(tensor: torch.Tensor, split: TPSplit | None) -> list[FullPiece]:
    """Where this rank's part of ``tensor`` (TP-local; a DTensor: its DP shard of that) lies in the full (TP=1,
    unpadded) tensor, as rectangles: one per logical part of a split (fused q/k/v, gate/up), vocab padding
    left out. No communication."""
    local = local_tensor(tensor)
    offsets = list(tensor.__create_chunk_list__()[0].offsets) if is_dtensor(tensor) else [0] * local.dim()
    tp, rank = state.tp_size(), state.tp_rank()
    if split is None:
        return [FullPiece(tuple(offsets), local, rank == 0)] if local.numel() else []
    dim, start, pieces = split.dim, offsets[split.dim], []
    segment = full_start = 0  # where the part's slice starts here, and where its part starts in the full tensor
    for full, size, reps in zip(split.parts, split.local_sizes(tp), split.replicas):
        first = (rank // reps) * size  # this rank's slice of the part starts here in the full part
        valid = max(0, min(size, full - first))  # padding rows beyond the full part are left out
        lo, hi = max(start, segment), min(start + local.shape[dim], segment + valid)
        if lo < hi:
            at = list(offsets)
            at[dim] = full_start + first + lo - segment
            pieces.append(FullPiece(tuple(at), local.narrow(dim, lo - start, hi - lo), rank % reps == 0))
        segment, full_start = segment + size, full_start + full
    return pieces


def owned_full_pieces(tensor: torch.Tensor, split: TPSplit | None) -> list[torch.Tensor]:
    """The views of :func:`full_pieces` this rank owns: every element of the full tensor on exactly one rank."""
    return [piece.view for piece in full_pieces(tensor, split) if piece.owner]


def grad_free(model: nn.Module) -> torch.no_grad | torch.inference_mode:
    """The context (or decorator) for running ``model`` without autograd: ``torch.inference_mode()``, or
    ``torch.no_grad()`` when FSDP shards it -- FSDP all-gathers a unit's weights into buffers it reuses, and
    training's forward pass could not write into buffers created as inference tensors."""
    sharded = any(is_dtensor(p) for p in model.parameters())
    return torch.no_grad() if sharded else torch.inference_mode()


def like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` (a TP-local tensor) in ``param``'s layout: sharded like an FSDP DTensor parameter (each rank
    keeps its own slice, no communication), or as it is."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(local.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def shard_tensor(full: torch.Tensor, split: TPSplit | None) -> torch.Tensor:
    """This rank's form of a full tensor (replicated tensors are returned as they are)."""
    return full if split is None else split.shard(full, state.tp_size(), state.tp_rank())


def gather_tensor(local: torch.Tensor, split: TPSplit | None) -> torch.Tensor:
    """The full form of this rank's tensor (a replicated one is returned as it is). Collective over TP (and
    over DP for an FSDP DTensor)."""
    if is_dtensor(local):
        local = local.full_tensor()
    if split is None:
        return local
    return split.assemble(comm.all_gather(local.detach(), state.tp_group()))


def named_splits(model: nn.Module) -> dict[str, TPSplit]:
    """State-dict name -> TPSplit for every TP-split tensor of ``model``; absent names are replicated."""
    splits = {}
    for prefix, module in model.named_modules():
        for name, split in getattr(module, "tp_splits", {}).items():
            splits[f"{prefix}.{name}" if prefix else name] = split
    return splits


def full_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Shape of every state-dict entry in its full (TP=1, unpadded) form; works on the meta device."""
    splits = named_splits(model)
    return {
        name: splits[name].full_shape(t.shape) if name in splits else t.shape
        for name, t in model.state_dict().items()
    }


def full_state_dict(model: nn.Module, local: Mapping[str, torch.Tensor] | None = None,
                    only: Collection[str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The model's state dict as a TP=1 model without vocab padding would have it. Collective over TP.

    Every rank receives the full tensors (an all-gather, simple and symmetric);
    the caller decides which rank writes them. ``local`` replaces entries of the
    model's own (TP-local) state dict, e.g. by fp32 master weights; ``only`` keeps those names (a LoRA
    checkpoint's adapters).
    """
    splits = named_splits(model)
    tensors = {**model.state_dict(), **(local or {})}
    return {name: gather_tensor(t.detach(), splits.get(name)) for name, t in tensors.items()
            if only is None or name in only}  # fmt: skip


def load_full_state_dict(model: nn.Module, full: Mapping[str, torch.Tensor],
                         absent: Collection[str] = ()) -> dict[str, torch.Tensor]:  # fmt: skip
    """Load a full (TP=1, unpadded) state dict into ``model`` built at any TP size; returns this rank's shards
    (in the checkpoint's dtype, for fp32 master weights beside low-precision parameters).

    A model built on the meta device gets the shards assigned as its
    parameters; otherwise they are copied in place (an optimizer holding the
    parameters stays valid). Missing, unexpected or misshapen tensors raise
    CheckpointError naming them; the names in ``absent`` may be missing and keep their values (a LoRA
    model's adapters when its base loads, its base when the adapters load).
    """
    expected = {name: shape for name, shape in full_shapes(model).items() if name not in absent or name in full}
    missing, unexpected = sorted(set(expected) - set(full)), sorted(set(full) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    wrong = [f"{n} {tuple(full[n].shape)} != {tuple(s)}" for n, s in expected.items() if full[n].shape != s]
    if wrong:
        raise CheckpointError(f"state dict does not fit the model: shapes {', '.join(wrong)}")
    splits = named_splits(model)
    own = model.state_dict()
    local = {name: like_param(shard_tensor(t, splits.get(name)), own[name]) for name, t in full.items()}
    on_meta = any(t.is_meta for t in own.values())
    if on_meta:  # assigned: each parameter must own compact memory, not be a TP shard's view of the full tensor
        local = {name: _compact(t) for name, t in local.items()}
    model.load_state_dict(local, strict=not absent, assign=on_meta)
    return local


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy of it where it is a strided view or a slice of a larger storage (which a
    parameter would keep alive whole, and which optimizers and collectives may not expect)."""
    if is_dtensor(t) or (t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _named_optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the order of its state dict's indices)."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not the model's") from None


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict keyed by parameter name, its tensors as this rank holds them (no communication):
    ``{"state": {param_name: {key: value}}, "param_groups": [... "params": [param_name, ...]]}``."""
    names = _named_optimizer_params(model, optimizer)
    sd = optimizer.state_dict()
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {names[i]: values for i, values in sd["state"].items()}, "param_groups": groups}


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: Mapping) -> None:
    """Load a state keyed by parameter name, its tensors in this rank's layout (:func:`named_optimizer_state`)."""
    index = {n: i for i, n in enumerate(_named_optimizer_params(model, optimizer))}
    unknown = sorted(set(named["state"]) - set(index))
    if unknown:
        raise CheckpointError(f"optimizer state names parameters the model does not have: {unknown}")
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    optimizer.load_state_dict({"state": {index[n]: v for n, v in named["state"].items()}, "param_groups": groups})


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """:func:`named_optimizer_state` with the tensors of their parameter's shape (``exp_avg``, ``exp_avg_sq``,
    momentum) gathered to full form, scalars (``step``) kept. Collective over TP (and DP under FSDP)."""
    named = named_optimizer_state(model, optimizer)
    params, splits = dict(model.named_parameters()), named_splits(model)
    state = {
        name: {k: gather_tensor(v, splits.get(name)) if param_shaped(v, params[name]) else v
               for k, v in values.items()}  # fmt: skip
        for name, values in named["state"].items()
    }
    return {"state": state, "param_groups": named["param_groups"]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: Mapping) -> None:
    """Load what ``full_optimizer_state`` produced (at any TP size) into ``optimizer``."""
    params, splits = dict(model.named_parameters()), named_splits(model)
    unknown = sorted(set(full["state"]) - set(params))
    if unknown:
        raise CheckpointError(f"optimizer state names parameters the model does not have: {unknown}")
    state = {
        name: {k: like_param(shard_tensor(v, splits.get(name)), params[name])
               if _full_param_shaped(v, params[name], splits.get(name)) else v for k, v in values.items()}  # fmt: skip
        for name, values in full["state"].items()
    }
    load_named_optimizer_state(model, optimizer, {"state": state, "param_groups": full["param_groups"]})


def param_shaped(value: object, param: torch.Tensor) -> bool:
    """Is ``value`` an optimizer state of ``param``'s shape (a moment), not a scalar (a step count)?"""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape


def _full_param_shaped(value: object, param: torch.Tensor, split: TPSplit | None) -> bool:
    full = param.shape if split is None else split.full_shape(param.shape)
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == full
