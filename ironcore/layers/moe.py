"""The mixture-of-experts MLP: a linear router, top-k gating, experts as stacked weights, token dropping optional.

Each token goes to its ``num_experts_per_token`` most probable experts
(softmax over all experts, top-k, renormalised over the k where the family
does so) and leaves as the gate-weighted sum of their outputs, plus the
shared experts' output when there are any. The tokens are *grouped by
expert*: one stable sort of the (token, expert) assignments puts each
expert's tokens in one contiguous block, each expert multiplies only its
block, and one ``index_add`` brings the results back to their tokens (no
pass of every expert over the whole batch).

Under tensor parallelism each expert is sharded like the dense MLP
(expert-tensor parallelism: gate/up split by output rows, down by input
columns, one all-reduce or reduce-scatter at the end); the router is
replicated and routes the gathered tokens identically on every rank. Each
rank's router gradient then covers its slice of the experts only, so the
router is marked for the TP sum of partial gradients.

The router statistics of each forward pass (:class:`RouterStats`) are kept
on the layer for the model's load-balancing loss, which needs all layers at
once (HF sums the counts of every layer before multiplying).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from ironcore.config.model import ModelConfig
from ironcore.layers.mlp import MLP, activate, glu_kernel
from ironcore.parallel.grad import mark_partial_grads
from ironcore.parallel.layers import init_from_full, local_size
from ironcore.parallel.mappings import column_input, row_output
from ironcore.parallel.sharding import TPSplit


@dataclasses.dataclass
class RouterStats:
    """What one MoE layer's routing of one forward pass contributes to the auxiliary losses."""

    counts: torch.Tensor  # [E] top-k assignments per expert (no gradient)
    prob_sums: torch.Tensor  # [E] router probabilities summed over the tokens (fp32, with gradient)
    z_sum: torch.Tensor  # sum over tokens of logsumexp(router logits)^2 (ST-MoE's z-loss)
    tokens: int
    dropped: int  # assignments over capacity (0 without token dropping)


class MoE(nn.Module):
    """Router + ``num_experts`` gated (or plain) MLP experts + optional shared experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_token
        self.renormalize, self.capacity_factor = cfg.moe_renormalize, cfg.moe_capacity_factor
        self.gated, self.activation, self.glu_kernel = cfg.gated_mlp, cfg.activation, glu_kernel(cfg)
        ffn, hidden = cfg.expert_ffn_size, cfg.hidden_size
        self.router = mark_partial_grads(nn.Linear(hidden, self.num_experts, bias=False))
        parts = (ffn, ffn) if self.gated else (ffn,)
        self.tp_splits = {"up": TPSplit(1, parts), "down": TPSplit(2, (ffn,))}
        local = local_size(TPSplit(0, (ffn,)), "expert hidden size")
        self.up = nn.Parameter(torch.empty(self.num_experts, local * len(parts), hidden))  # per expert [gate; up]
        self.down = nn.Parameter(torch.empty(self.num_experts, hidden, local))
        shared = cfg.num_shared_experts * ffn
        self.shared = MLP(cfg, shared) if shared else None
        self.stats: RouterStats | None = None

    def reset_parameters(self, std: float, out_std: float) -> None:
        E, hidden, ffn = self.num_experts, self.up.shape[2], self.tp_splits["down"].parts[0]
        init_from_full(self.up, (E, sum(self.tp_splits["up"].parts), hidden), std, self.tp_splits["up"])
        init_from_full(self.down, (E, hidden, ffn), out_std, self.tp_splits["down"])
        if not self.router.weight.is_meta:
            nn.init.normal_(self.router.weight, 0.0, std)
        if self.shared is not None:
            self.shared.up.reset_parameters(std)
            self.shared.down.reset_parameters(out_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and gate weights [N, k] of the tokens x [N, H]; records :class:`RouterStats`."""
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, experts.flatten(), torch.ones_like(experts.flatten()))
        z_sum = torch.logsumexp(logits, dim=-1).square().sum()
        self.stats = RouterStats(counts, probs.sum(dim=0), z_sum, x.shape[0], 0)
        return experts, weights.to(x.dtype)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        x = column_input(residual)  # under sequence parallelism: all positions, like a column-parallel layer's input
        flat = x.reshape(-1, x.shape[-1])
        experts, weights = self.route(flat)
        # Group the (token, expert) assignments by expert: each expert's tokens become one contiguous block.
        order = experts.flatten().argsort(stable=True)
        counts = self.stats.counts
        if self.capacity_factor is not None and not is_fake(order):  # (the planner: no dropping, an upper bound)
            order, counts = self._drop_over_capacity(order, counts, flat.shape[0])
        token = order // self.top_k
        out = self._experts(flat.index_select(0, token), _block_sizes(counts, order.numel()))
        out = out * weights.flatten().index_select(0, order).unsqueeze(-1)
        y = torch.zeros_like(flat).index_add_(0, token, out)
        y = row_output(y.view(*x.shape[:-1], -1))
        if self.shared is not None:
            y = y + self.shared(residual)
        return y

    def _experts(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each expert's MLP over its block of ``tokens`` (blocks of ``counts`` rows, in expert order)."""
        outputs = []
        # unbind, not up[e]: indexing would give each expert's gradient its own zero-filled copy of all experts'
        ups, downs = self.up.unbind(0), self.down.unbind(0)
        for e, block in enumerate(tokens.split(counts)):
            if not counts[e]:
                continue
            h = activate(F.linear(block, ups[e]), self.activation, self.gated, self.glu_kernel)
            outputs.append(F.linear(h, downs[e]))
        return torch.cat(outputs) if outputs else tokens.new_zeros(0, self.down.shape[1])

    def _drop_over_capacity(
        self, order: torch.Tensor, counts: torch.Tensor, tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep each expert's first ``capacity`` assignments (in token order, like GShard); the rest are dropped."""
        capacity = max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts.repeat_interleave(counts)
        keep = rank_in_expert < capacity
        kept = counts.clamp(max=capacity)
        self.stats.dropped = int(order.numel() - int(keep.sum()))
        return order[keep], kept


def _block_sizes(counts: torch.Tensor, total: int) -> list[int]:
    """The experts' block sizes as numbers; on the memory planner's fake tensors (shapes, no data) the balanced
    routing it plans for."""
    if not is_fake(counts):
        return counts.tolist()
    experts = counts.numel()
    return [total // experts + (e < total % experts) for e in range(experts)]


def attach_loss(x: torch.Tensor, loss: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """``x`` unchanged, but its backward pass also backpropagates ``loss`` with gradient ``grad_scale``.

    How an auxiliary loss computed inside the model joins the objective's
    loss without the objective knowing of it (Megatron's MoEAuxLossAutoScaler).
    """
    return _AttachLoss.apply(x, loss, grad_scale)


class _AttachLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, grad_scale: float) -> torch.Tensor:  # noqa: D102
        ctx.grad_scale = grad_scale
        ctx.save_for_backward(loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.grad_scale), None
