"""Building the trainer of a run that starts from a file (``init.init_from``): seconds and peak host memory,
this tree against an earlier commit.

A ~1B LLaMA-shaped model (16 x 2048, GQA 32/8, FFN 8192, seed 0, fp32) is saved as an IronCore checkpoint.
Each run builds the ``Trainer`` of a LoRA run and of a full fine-tuning run from it (the example pretraining
data) in a fresh process whose working folder is the tree under test; the trees alternate (ABBA), ``--repeats``
times. Reported per row: the median and range of the seconds ``Trainer(cfg)`` takes, of the process's peak
anonymous memory and of its peak RSS (Linux; Python and torch's imports included; see ``CHILD``). ``--base``
is checked out into a temporary git worktree.

    python benchmarks/start_from_file.py --base 3cb6d1d            # this tree against 3cb6d1d, 3 repeats
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 2048, "num_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "ffn_hidden_size": 8192}  # fmt: skip
KINDS = {"LoRA": "model.lora={rank: 16, alpha: 32}", "full": "model.lora=null"}

# Run in the tree under test (its working folder, so `import ironcore` is that tree's): prints one JSON line.
# Two peaks: the RSS, which also counts the checkpoint file's mapped pages (safetensors maps the file, and the
# loaded tensors can stay those pages) as far as the kernel keeps them resident, and the anonymous memory the
# process allocated itself, sampled from /proc/self/status every 2 ms.
CHILD = """
import json, resource, sys, threading, time
from ironcore.config.loader import load_config
from ironcore.training.trainer import Trainer

def anon_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

peak, building = [anon_kib()], True
def sample():
    while building:
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.002)
cfg = load_config("configs/example.yaml", sys.argv[1:])
sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
Trainer(cfg)
seconds, building = time.perf_counter() - start, False
sampler.join()
print(json.dumps({"seconds": seconds, "anon_gib": max(peak[0], anon_kib()) / 2**20,
                  "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def prepare(folder: Path) -> tuple[Path, Path]:
    """The example data preprocessed and the ~1B checkpoint, in ``folder``: (data config, checkpoint)."""
    import torch

    from ironcore.checkpoints import native
    from ironcore.config import load_model_config
    from ironcore.data.preprocessing.config import load_data_config
    from ironcore.data.preprocessing.preprocess import preprocess
    from ironcore.models import TransformerModel

    data = yaml.safe_load((ROOT / "configs/data/pretrain_example.yaml").read_text())
    data.update(output_dir=str(folder / "data"), max_seq_length=256)
    (folder / "data.yaml").write_text(yaml.safe_dump(data))
    preprocess(load_data_config(folder / "data.yaml"), progress=False)
    torch.manual_seed(0)
    model = TransformerModel(dataclasses.replace(load_model_config("llama-tiny"), **SHAPE))
    return folder / "data.yaml", native.save_model(model, folder / "base")


def build(tree: Path, overrides: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, *overrides], cwd=tree, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="an earlier commit to compare with (default: this tree alone)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data, checkpoint = prepare(folder)
        trees = {"this tree": ROOT}
        if args.base:
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(folder / "tree"), args.base], cwd=ROOT,
                           check=True)  # fmt: skip
            trees[args.base] = folder / "tree"
        try:
            shape = [f"model.{key}={value}" for key, value in SHAPE.items()]
            common = [f"data.config_path={data}", "model=llama-tiny", *shape, f"init.init_from={checkpoint}",
                      f"trainer.output_dir={folder / 'run'}", "utils.tracking=false"]  # fmt: skip
            results = {(kind, name): [] for kind in KINDS for name in trees}
            for repeat in range(args.repeats):
                for kind, override in KINDS.items():
                    for name, tree in list(trees.items())[:: 1 if repeat % 2 == 0 else -1]:
                        results[kind, name].append(build(tree, [*common, override]))
        finally:
            if args.base:
                subprocess.run(["git", "worktree", "remove", "--force", str(folder / "tree")], cwd=ROOT, check=False)
    print(f"Trainer(cfg) of a ~1B model from an IronCore checkpoint, {args.repeats} fresh processes per row")
    print("run    tree       seconds           peak anonymous GiB   peak RSS GiB   (median (range))")
    for (kind, name), runs in results.items():
        cells = []
        for key, digits in (("seconds", 1), ("anon_gib", 2), ("rss_gib", 2)):
            values = [r[key] for r in runs]
            cells.append(f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})")
        print(f"{kind:6s} {name:10s} {cells[0]:17s} {cells[1]:20s} {cells[2]}")


if __name__ == "__main__":
    main()
