"""``optim.optimizer: muon``: torch.optim.Muon for the hidden weight matrices, AdamW for everything else.

Muon (Jordan et al. 2024) orthogonalises each matrix's momentum with Newton-Schulz iterations, which only
means something for 2-D weights that map hidden states to hidden states; embeddings, the output head, norms and
biases keep AdamW (the standard hybrid: Moonlight, modded-nanogpt). Which parameter goes where is decided once,
in :func:`ironcore.training.optim.parameter_rule`.

The two torch optimizers are presented as one (:class:`MuonWithAdamW`), so the trainer's learning-rate loop,
gradient clipping, ``zero_grad`` and checkpoints see one ``param_groups`` list and one ``state``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    """One torch optimizer over two: ``torch.optim.Muon`` on the groups marked ``"muon": True``,
    ``torch.optim.AdamW`` on the others. Its ``param_groups`` are the very dicts of the two (Muon's first), so
    setting a group's ``lr`` sets the inner optimizer's, and the two share its ``state`` dict (their parameters
    are disjoint), so ``state_dict``/``load_state_dict`` are torch's own."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, muon: dict[str, Any], adamw: dict[str, Any]) -> None:
        self.muon = torch.optim.Muon([g for g in groups if g.get("muon")], lr=lr, **muon)
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
