"""What a mixture-of-experts run needs from each training step: its auxiliary losses' weight and its routing log.

A :class:`~ironcore.training.hooks.StepHook`, so the loop knows nothing of
experts. Before a step's backward passes it sets the weight of the
auxiliary losses (``TransformerModel.aux_loss_scale``): 1 / (forward passes
of the global batch), each pass's share, since the DP reduction sums the
ranks' gradients.

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
    """Auxiliary-loss weight, auxiliary losses and expert loads of a MoE model over training steps (see the
    module doc); ``out_dir`` receives the heatmap on the main rank."""

    def __init__(self, model: TransformerModel, device: torch.device, out_dir: Path, is_main: bool) -> None:
        self.model, self.device, self.out_dir, self.is_main = model, device, out_dir, is_main
        # Summed on the model's device (no host sync per pass): aux and z of this step's passes, and each layer's
        # expert assignments [layers, experts] since the last log line.
        self.losses: torch.Tensor | None = None
        self.passes = 0
        self.load: torch.Tensor | None = None

    def start_step(self, passes: int) -> None:
        """Each of the global batch's ``passes`` forward passes weighs its auxiliary losses 1 / passes."""
        self.model.aux_loss_scale = 1.0 / passes

    def after_forward(self) -> None:
        """Take the model's last forward pass into this step (call after every forward pass with gradients)."""
        aux = self.model.aux_losses
        losses = torch.stack([aux["aux_loss"], aux["z_loss"]]).double()
        load = aux["expert_load"].double()
        self.losses = losses if self.losses is None else self.losses + losses
        self.load = load if self.load is None else self.load + load
        self.passes += 1

    def step_metrics(self) -> dict[str, float]:
        """``aux_loss`` and ``z_loss`` of the step (mean over passes and DP ranks); starts the next step."""
        losses = self.losses if self.losses is not None else torch.zeros(2, dtype=torch.float64)
        mean = comm.all_reduce(losses.to(self.device) / max(self.passes, 1), state.dp_group()) / state.dp_size()
        self.losses, self.passes = None, 0
        return {"aux_loss": float(mean[0]), "z_loss": float(mean[1])}

    def log_metrics(self, step: int) -> tuple[dict[str, float], list[Path]]:
        """At a log line: ``expert_load_max`` over the assignments since the last one (all DP ranks), and (main
        rank) the heatmap of their shares; nothing when no pass was recorded."""
        if self.load is None:
            return {}, []
        load = comm.all_reduce(self.load.to(self.device), state.dp_group()).cpu()
        self.load = None
        shares = load / load.sum(dim=1, keepdim=True).clamp(min=1)
        plots = [plot_expert_load(shares, step, self.out_dir / "expert_load.png")] if self.is_main else []
        return {"expert_load_max": float(shares.max() * shares.shape[1])}, plots


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
