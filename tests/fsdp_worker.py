"""Measurements under torchrun for tests/test_fsdp.py: the bytes a rank holds under ddp and fsdp, and the memory
a rank needs while it saves a checkpoint, full or sharded::

    torchrun --nproc_per_node 2 tests/fsdp_worker.py bytes OUT_DIR
    torchrun --nproc_per_node 2 tests/fsdp_worker.py save OUT_DIR TOKENIZER_DIR

Rank 0 writes what it measured to ``OUT_DIR/<scenario>.json``.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ironcore.config import Config, build_config
from ironcore.models import TransformerModel
from ironcore.parallel.setup import destroy_parallel, init_parallel
from ironcore.training.checkpointing import TrainState, save_checkpoint
from ironcore.training.memory import measured_state_bytes, plan_memory
from ironcore.training.optim import build_training_optimizer

# Odd row counts (hidden 63: the norms, the attention output and MLP down projections, the fused q/k/v's 105
# rows), so that FSDP pads those shards: rank 0 holds 32 of 63 rows, rank 1 31 and a padding row.
SMALL = {"name": "bytes", "vocab_size": 301, "hidden_size": 63, "num_layers": 2, "num_attention_heads": 3,
         "num_key_value_heads": 1, "ffn_hidden_size": 88, "max_position_embeddings": 32,
         "position_embedding": "learned", "norm_type": "layernorm", "gated_mlp": False, "activation": "gelu_tanh",
         "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}  # fmt: skip
# Most of the state in two large tensors (embeddings and output head: 2 x 16 MiB), so that a full save's
# gathered tensors dwarf what one rank holds.
LARGE = {"name": "large", "vocab_size": 65536, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "ffn_hidden_size": 88, "max_position_embeddings": 32,
         "position_embedding": "rope", "norm_type": "rmsnorm", "gated_mlp": True, "activation": "silu",
         "tie_word_embeddings": False}  # fmt: skip


def config(model: dict[str, Any], out: Path, **trainer: Any) -> Config:
    raw = {"model": model, "data": {"config_path": "unused"},
           "trainer": {"micro_batch_size": 2, "output_dir": str(out), "device": "cpu", **trainer},
           "operation": {"train_steps": 1}, "optim": {"weight_decay": 0.1}, "utils": {"tracking": False}}  # fmt: skip
    return build_config(raw, world_size=dist.get_world_size())


def one_step(cfg: Config) -> tuple[TransformerModel, Any]:
    """The model and optimizer of ``cfg`` after one training step on random tokens."""
    torch.manual_seed(0)
    model = TransformerModel(cfg.model)
    optimizer = build_training_optimizer(model, cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
    optimizer.finish_grad_sync()
    optimizer.grad_norm()
    optimizer.step()
    return model, optimizer


def measure_bytes(out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for layout in ("ddp", "fsdp"):
        cfg = config(SMALL, out, data_parallel=layout)
        model, optimizer = one_step(cfg)
        plan = plan_memory(cfg.model, dp=dist.get_world_size(), data_parallel=layout, micro_batch_size=2, seq_len=16)
        results[layout] = {"measured": measured_state_bytes(model, optimizer),
                           "planned": [plan.parameters, plan.gradients, plan.optimizer]}  # fmt: skip
    return results


def peak_rss_bytes() -> int:
    """This process's peak resident memory since the last :func:`reset_peak_rss` (Linux: VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def measure_save(out: Path, tokenizer: Path) -> dict[str, Any]:
    """Each rank's memory growth while saving, sharded and full, from the same FSDP state; and the save times."""
    results: dict[str, Any] = {}
    for fmt in ("sharded", "full"):
        cfg = config(LARGE, out / fmt, data_parallel="fsdp", checkpoint_format=fmt)
        model, optimizer = one_step(cfg)
        own = sum(measured_state_bytes(model, optimizer))
        gc.collect()
        dist.barrier()
        reset_peak_rss()
        before = rss_bytes()
        start = time.perf_counter()
        save_checkpoint(out / fmt / "checkpoints", state=TrainState(step=1), model=model, optimizer=optimizer,
                        config=cfg, tokenizer_dir=tokenizer)  # fmt: skip
        seconds = time.perf_counter() - start
        growth = torch.tensor([peak_rss_bytes() - before], dtype=torch.float64)
        dist.all_reduce(growth, op=dist.ReduceOp.MAX)
        results[fmt] = {"growth": int(growth), "own": own, "seconds": seconds}
        del model, optimizer
    return results


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    init_parallel(1, build_config({"model": SMALL, "operation": {"train_steps": 1}}, world_size=1).model, "cpu")
    result = measure_bytes(out) if scenario == "bytes" else measure_save(out, Path(sys.argv[3]))
    if dist.get_rank() == 0:
        (out / f"{scenario}.json").write_text(json.dumps(result))
    destroy_parallel()


if __name__ == "__main__":
    main()
