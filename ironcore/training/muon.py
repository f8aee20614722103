"""``optim.optimizer: muon``: torch.optim.Muon for the hidden weight matrices, AdamW for everything else.

Muon (Jordan et al. 2024) orthogonalises each matrix's momentum with Newton-Schulz iterations, which only
means something for 2-D weights that map hidden states to hidden states; embeddings, the output head, norms and
biases keep AdamW (the standard hybrid: Moonlight, modded-nanogpt). Which parameter goes where is decided once,
in :func:`ironcore.training.optim.parameter_rule`.

The two torch optimizers are presented as one (:class:`MuonWithAdamW`), so the trainer's learning-rate loop,
gradient clipping, ``zero_grad`` and checkpoints see one ``param_groups`` list and one ``state``.

Under tensor parallelism a rank holds a slice of a split matrix (fused q/k/v and gate/up rows, or columns), and
Newton-Schulz on a slice is not Newton-Schulz on the matrix. :class:`TensorParallelMuon` keeps the momentum
local (it is elementwise), all-gathers each split matrix's update into its full, single-process layout,
orthogonalises it whole on every rank and applies this rank's slice: TP=2 takes the steps of one process. Cost
per step and split matrix: an all-gather of the full matrix, and Newton-Schulz on it repeated on every TP rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch
from torch import nn
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
from torch.optim.optimizer import _to_scalar

from ironcore.parallel import state as parallel_state
from ironcore.parallel.sharding import TPSplit, gather_tensor, named_splits, shard_tensor


def parameter_splits(model: nn.Module) -> dict[int, TPSplit]:
    """Parameter id -> its TP split, for the TP-split parameters of ``model`` (the layers, not the parameters,
    record their splits)."""
    splits = named_splits(model)
    return {id(p): splits[name] for name, p in model.named_parameters() if name in splits}


class TensorParallelMuon(torch.optim.Muon):
    """``torch.optim.Muon`` whose TP-split matrices (``splits``: parameter id -> its split) are orthogonalised
    whole (module doc); torch's own step does every other matrix, so without splits it is torch.optim.Muon."""

    def __init__(self, params: list[dict[str, Any]], splits: Mapping[int, TPSplit], **options: Any) -> None:
        self.splits = dict(splits)
        super().__init__(params, **options)

    def _init_group(self, group: MutableMapping, *lists: list[torch.Tensor]) -> bool:
        """torch's gathering of a group's parameters for its step, without the split ones (done apart)."""
        return super()._init_group({**group, "params": [p for p in group["params"] if id(p) not in self.splits]},
                                   *lists)  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """torch's step on the whole matrices, then each split one gathered (a collective per matrix)."""
        loss = super().step(closure)
        for group in self.param_groups:  # the same order on every TP rank
            for param in group["params"]:
                if id(param) in self.splits and param.grad is not None:
                    self._split_step(param, group)
        return loss

    def _split_step(self, param: torch.Tensor, group: MutableMapping) -> None:
        """torch's ``_single_tensor_muon`` for one TP slice, Newton-Schulz and the lr's shape on the full matrix."""
        grad, momentum, split = param.grad, group["momentum"], self.splits[id(param)]
        buf = self.state[param].setdefault("momentum_buffer", torch.zeros_like(grad))
        buf.lerp_(grad, 1 - momentum)
        full = gather_tensor(grad.lerp(buf, momentum) if group["nesterov"] else buf, split)
        update = _zeropower_via_newtonschulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
        lr = _to_scalar(group["lr"])
        param.mul_(1 - lr * group["weight_decay"])
        param.add_(shard_tensor(update, split), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], full.shape))


class MuonWithAdamW(torch.optim.Optimizer):
    """One torch optimizer over two: ``torch.optim.Muon`` on the groups marked ``"muon": True``,
    ``torch.optim.AdamW`` on the others. Its ``param_groups`` are the very dicts of the two (Muon's first), so
    setting a group's ``lr`` sets the inner optimizer's, and the two share its ``state`` dict (their parameters
    are disjoint), so ``state_dict``/``load_state_dict`` are torch's own. ``splits`` (parameter id -> TPSplit)
    names the TP-split parameters, orthogonalised whole when TP > 1 (:class:`TensorParallelMuon`)."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, muon: dict[str, Any], adamw: dict[str, Any],
                 splits: Mapping[int, TPSplit] | None = None) -> None:  # fmt: skip
        split = splits if splits and parallel_state.tp_size() > 1 else {}
        self.muon = TensorParallelMuon([g for g in groups if g.get("muon")], split, lr=lr, **muon)
        self.adamw = torch.optim.AdamW([g for g in groups if not g.get("muon")], lr=lr, **adamw)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={"lr": lr})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (again after ``load_state_dict``, which
        replaces both)."""
        count = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:count], self.param_groups[count:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Muon's step on the hidden matrices, then AdamW's on the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss
