"""Saving a checkpoint at DP=2: sharded (every rank writes its own pieces, torch.distributed.checkpoint) vs
today's gathered save (full tensors gathered on every rank, rank 0 writes), on gloo::

    torchrun --nproc_per_node 2 benchmarks/checkpoint_save.py                 # gpt2-small, 10 rounds
    torchrun --nproc_per_node 2 benchmarks/checkpoint_save.py --model qwen2.5-0.5b --rounds 10

Three saves of a model after one AdamW step (random weights, real shapes), interleaved round by round:

* ``fsdp, sharded``: ``trainer.data_parallel: fsdp`` with its default ``checkpoint_format: auto`` (sharded);
* ``fsdp, full``: the same FSDP state saved gathered (``checkpoint_format: full``);
* ``ddp, full``: plain data parallelism, the gathered save every run used before sharded checkpoints.

Per save: wall time (collective, all ranks done) and the growth of each rank's peak resident memory over what
it held before the save (Linux VmHWM, reset before each save), the larger of the two ranks. The ratio is the
per-round time of ``fsdp, sharded`` over ``ddp, full``: median and spread of ``--rounds`` rounds. The folder
goes to ``--dir`` (a temporary one by default; on tmpfs the disk is taken out of the comparison).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ironcore.config import build_config, load_model_config
from ironcore.config.base import to_dict
from ironcore.models import TransformerModel
from ironcore.parallel.setup import destroy_parallel, init_parallel
from ironcore.training.checkpointing import TrainState, save_checkpoint
from ironcore.training.memory import measured_state_bytes
from ironcore.training.optim import build_training_optimizer

ROOT = Path(__file__).resolve().parents[1]
SAVES = {"fsdp, sharded": ("fsdp", "auto"), "fsdp, full": ("fsdp", "full"), "ddp, full": ("ddp", "full")}


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def trained(model_name: str, layout: str, fmt: str, out: Path):  # noqa: ANN201 -- (config, model, optimizer)
    raw = {"model": to_dict(load_model_config(model_name)), "data": {"config_path": "unused"},
           "trainer": {"micro_batch_size": 1, "output_dir": str(out), "device": "cpu", "data_parallel": layout,
                       "checkpoint_format": fmt, "keep_last_checkpoints": 1},
           "operation": {"train_steps": 1}, "utils": {"tracking": False}}  # fmt: skip
    cfg = build_config(raw, world_size=dist.get_world_size())
    torch.manual_seed(0)
    model = TransformerModel(cfg.model)
    optimizer = build_training_optimizer(model, cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 33))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
    optimizer.finish_grad_sync()
    optimizer.step()
    optimizer.zero_grad()
    return cfg, model, optimizer


def timed_save(state: tuple, folder: Path, step: int) -> tuple[float, int]:
    cfg, model, optimizer = state
    gc.collect()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current resident size
    before = status("VmRSS")
    start = time.perf_counter()
    save_checkpoint(folder, state=TrainState(step=step), model=model, optimizer=optimizer, config=cfg,
                    tokenizer_dir=ROOT / "examples" / "data" / "gpt2")  # fmt: skip
    seconds = time.perf_counter() - start
    growth = torch.tensor([status("VmHWM") - before], dtype=torch.float64)
    dist.all_reduce(growth, op=dist.ReduceOp.MAX)
    return seconds, int(growth)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    args = p.parse_args()
    init_parallel(1, load_model_config(args.model), "cpu")
    rank0 = dist.get_rank() == 0
    root = Path(args.dir or tempfile.mkdtemp(prefix="ironcore-save-"))
    states = {name: trained(args.model, layout, fmt, root / name.replace(", ", "-"))
              for name, (layout, fmt) in SAVES.items()}  # fmt: skip
    own = {name: sum(measured_state_bytes(s[1], s[2])) for name, s in states.items()}
    times: dict[str, list[float]] = {name: [] for name in SAVES}
    growth: dict[str, list[int]] = {name: [] for name in SAVES}
    for step in range(1, args.rounds + 2):  # the first round warms up (imports, file system) and is not counted
        for name, state in states.items():
            seconds, grown = timed_save(state, root / name.replace(", ", "-") / "checkpoints", step)
            if step > 1:
                times[name].append(seconds)
                growth[name].append(grown)
    if rank0:
        mib = 2**20
        print(f"model {args.model}, DP=2 on gloo, CPU; {args.rounds} interleaved rounds; folder {root}")
        print("\n| save | wall time (s), median (min-max) | peak memory growth per rank (MiB) | state held per rank "
              "(MiB) |\n|---|---|---|---|")  # fmt: skip
        for name in SAVES:
            t = times[name]
            print(f"| {name} | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | "
                  f"{statistics.median(growth[name]) / mib:,.0f} | {own[name] / mib:,.0f} |")
        ratios = [a / b for a, b in zip(times["fsdp, sharded"], times["ddp, full"])]
        print(f"\nfsdp sharded / ddp full save time, per round: median {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}), {len(ratios)} rounds")
    dist.barrier()
    if rank0 and args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
