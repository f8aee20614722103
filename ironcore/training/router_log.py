"""What a mixture-of-experts run logs of its routing: the auxiliary losses per step and the experts' load.

The model computes the load-balancing loss (and z-loss) of every forward
pass and keeps the values of the last one (``TransformerModel.aux_losses``);
this log collects them over the forward passes of a step (those with
gradients: the ones whose losses were trained), averages them over the
passes and the data-parallel ranks, and sums each layer's expert
assignments between two log lines. The load goes out as a metric
(``train/expert_load_max``: the busiest expert's share times the number of
experts, 1.0 when perfectly balanced) and as a heatmap of layers x experts
(``expert_load.png``, an MLflow artifact, replaced at each log line).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ironcore.models.transformer import TransformerModel
from ironcore.parallel import comm, state


class RouterLog:
    """Auxiliary losses and expert loads of a MoE model over training steps (see the module doc)."""

    def __init__(self, model: TransformerModel) -> None:
        self.model = model
        # Summed on the model's device (no host sync per pass): aux and z of this step's passes, and each layer's
        # expert assignments [layers, experts] since the last log line.
        self.losses: torch.Tensor | None = None
        self.passes = 0
        self.load: torch.Tensor | None = None

    def record(self) -> None:
        """Take the model's last forward pass into this step (call after every forward pass with gradients)."""
        aux = self.model.aux_losses
        losses = torch.stack([aux["aux_loss"], aux["z_loss"]]).double()
        load = aux["expert_load"].double()
        self.losses = losses if self.losses is None else self.losses + losses
        self.load = load if self.load is None else self.load + load
        self.passes += 1

    def step_metrics(self, device: torch.device) -> dict[str, float]:
        """``aux_loss`` and ``z_loss`` of the step (mean over passes and DP ranks); starts the next step."""
        losses = self.losses if self.losses is not None else torch.zeros(2, dtype=torch.float64)
        mean = comm.all_reduce(losses.to(device) / max(self.passes, 1), state.dp_group()) / state.dp_size()
        self.losses, self.passes = None, 0
        return {"aux_loss": float(mean[0]), "z_loss": float(mean[1])}

    def load_metrics(self, device: torch.device) -> tuple[dict[str, float], torch.Tensor | None]:
        """``expert_load_max`` and the [layers, experts] shares of the assignments since the last call (all DP
        ranks), or nothing when no pass was recorded."""
        if self.load is None:
            return {}, None
        load = comm.all_reduce(self.load.to(device), state.dp_group()).cpu()
        self.load = None
        shares = load / load.sum(dim=1, keepdim=True).clamp(min=1)
        return {"expert_load_max": float(shares.max() * shares.shape[1])}, shares


def plot_expert_load(shares: torch.Tensor, step: int, path: Path) -> Path:
    """Heatmap of each layer's share of assignments per expert (white: 1/experts, the balanced share)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers, experts = shares.shape
    balanced = 1.0 / experts
    fig, ax = plt.subplots(figsize=(min(4 + experts * 0.25, 16), min(2 + layers * 0.3, 12)))
    image = ax.imshow(shares.numpy(), cmap="RdBu_r", vmin=0.0, vmax=2 * balanced, aspect="auto")
    fig.colorbar(image, ax=ax, label=f"share of assignments (balanced: {balanced:.3f})")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert load up to step {step}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
