"""Low-rank adapters (LoRA) on a tensor-parallel linear layer: ``y = base(x) + B(A(dropout(x)) * scale)``.

PEFT's LoRA (Hu et al. 2021) with its initialisation (A Kaiming-uniform, B zero, so training starts at the
base model) and scale ``alpha / rank`` (``alpha / sqrt(rank)`` rank-stabilised). Our column-parallel layers
fuse several projections (q/k/v, gate/up), so one :class:`LoRA` holds one adapter per *group* of the layer's
output parts: ``q``, ``k`` and ``v`` are three groups of one part (three adapters, as PEFT on q_proj,
k_proj, v_proj), GPT-2's ``c_attn`` one group of three parts (one adapter over the fused output). Parts in no
group get no update. The groups' A matrices are stacked into one weight (one matmul), their B matrices too.

Tensor parallelism: the adapters split the way their base layer does.

* Column-parallel base (output split): B is split by output rows exactly like the base weight's parts
  (``TPSplit`` with the same parts and replicas); A sees the whole input and is replicated, and each rank's
  gradient of A covers its own output rows only, so it is summed over TP ranks (``mark_partial_grads``).
* Row-parallel base (input split): A is split by input columns like the base weight; each rank's
  ``B(A x_local)`` is a partial sum added to the base's partial product *before* the TP reduction, so the one
  all-reduce of the layer adds both; B's gradient is then partial per rank and summed over TP.

Either way TP=2 trains the same adapters as one process. A :class:`LoRA` is switched off (``enabled``) to run
the frozen base alone (DPO's and GRPO's reference without a second copy of the weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ironcore.parallel import state
from ironcore.parallel.grad import mark_partial_grads
from ironcore.parallel.layers import ColumnParallelLinear, RowParallelLinear
from ironcore.parallel.sharding import TPSplit


class LoRAFactor(nn.Module):
    """One stacked factor (all groups' A, or all groups' B) as ``weight``, with its TP split if it has one."""

    def __init__(self, full_shape: tuple[int, int], split: TPSplit | None) -> None:
        super().__init__()
        shape = full_shape if split is None else tuple(split.local_shape(full_shape, state.tp_size()))
        self.weight = nn.Parameter(torch.zeros(shape))
        self.tp_splits = {} if split is None else {"weight": split}


class LoRA(nn.Module):
    """The adapters of one linear layer (see the module doc); ``groups``: tuples of the base's output parts."""

    def __init__(self, base: ColumnParallelLinear | RowParallelLinear, groups: list[tuple[int, ...]], rank: int,
                 alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.rank, self.enabled = rank, True
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        if isinstance(base, RowParallelLinear):
            self.groups, self.slots = [(0,)], [(0, base.out_features)]
            self.A = LoRAFactor((rank, base.in_features), base.tp_splits["weight"])
            self.B = mark_partial_grads(LoRAFactor((base.out_features, rank), None))
            return
        split, tp = base.tp_splits["weight"], state.tp_size()
        local = split.local_sizes(tp)
        self.groups = sorted(groups)
        owner = {part: g for g, group in enumerate(self.groups) for part in group}
        # Output order: (group, local rows) for each group's consecutive parts, (None, rows) for parts without.
        self.slots: list[tuple[int | None, int]] = []
        for part, rows in enumerate(local):
            g = owner.get(part)
            if self.slots and self.slots[-1][0] == g:
                self.slots[-1] = (g, self.slots[-1][1] + rows)
            else:
                self.slots.append((g, rows))
        targeted = [part for group in self.groups for part in group]
        b_split = TPSplit(0, tuple(split.parts[p] for p in targeted), tuple(split.replicas[p] for p in targeted))
        self.A = mark_partial_grads(LoRAFactor((len(self.groups) * rank, base.in_features), None))
        self.B = LoRAFactor((sum(b_split.parts), rank), b_split)

    def reset_parameters(self) -> None:
        """PEFT's start: each group's A Kaiming-uniform (a = sqrt 5) drawn in full, B zero."""
        a_full = self.A.tp_splits.get("weight")
        rows, columns = len(self.groups) * self.rank, self.A.weight.shape[1]
        if a_full is not None:  # row-parallel: drawn in full from the global RNG, this rank keeps its columns
            columns = sum(a_full.parts)
        full = torch.empty(rows, columns, device=self.A.weight.device)
        for block in full.split(self.rank):
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        with torch.no_grad():
            self.A.weight.copy_(full if a_full is None else a_full.shard(full, state.tp_size(), state.tp_rank()))
            self.B.weight.zero_()

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` (the base's local, pre-reduction output for input ``x`` as the base sees it) plus the update,
        added in place into the columns of each group: no zeros for the parts without an adapter, no
        concatenation, and the scale applied to the rank-wide ``A x`` instead of the output (10 % of a LoRA step
        of a 0.5B model on CPU went into those full-width copies)."""
        h = F.linear(self.drop(x), self.A.weight) * self.scale
        if len(self.slots) == 1:
            return y.add_(F.linear(h, self.B.weight))
        hs, column, row = h.split(self.rank, dim=-1), 0, 0
        for g, rows in self.slots:
            if g is not None:
                y.narrow(-1, column, rows).add_(F.linear(hs[g], self.B.weight[row : row + rows]))
                row += rows
            column += rows
        return y

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``B A * scale`` in the base weight's local shape (what merging adds to it)."""
        if len(self.slots) == 1:  # one group over the whole output
            return self.B.weight @ self.A.weight * self.scale
        a, pieces, row = self.A.weight.split(self.rank), [], 0
        for g, rows in self.slots:
            if g is None:
                pieces.append(a[0].new_zeros(rows, a[0].shape[1]))
            else:
                pieces.append(self.B.weight[row : row + rows] @ a[g])
                row += rows
        return torch.cat(pieces) * self.scale
