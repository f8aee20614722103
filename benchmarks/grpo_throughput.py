"""GRPO training throughput: IronCore's trainer against TRL's ``GRPOTrainer`` on the same model and work.

The model is built once by IronCore from a seed and exported with
``save_hf_model``; TRL loads that HF folder, IronCore starts from it
(``init.init_from``), so both hold identical weights. Both run GRPO on the
synthetic addition prompts with the same reward (``ironcore.rewards.exact``),
the same number of prompts per step and completions per prompt (G), the same
completion length, temperature 1, no KL term (beta 0), DAPO's loss, one
update per generation, and AdamW with the same settings at a constant
learning rate, in fp32 (bf16 with ``--precision bf16`` on a GPU). TRL
generates with HF ``generate`` (no vLLM), as the issue asks.

The steps are interleaved: a TRL callback runs one IronCore step after each
TRL step, so machine noise hits both alike. A pair is (TRL step time,
IronCore step time); the first ``--warmup`` pairs are dropped, and the
median and spread of the per-pair ratio TRL/IronCore is reported, with each
side's split into rollout (generation, rewards, advantages) and update
(forward, backward, optimizer). Prints a table and JSON; asserts nothing.

    pip install -e ".[bench]"  # TRL, the peer (1.16 measured); transformers and accelerate come with it
    python benchmarks/grpo_throughput.py                          # CPU, 2 threads, the addition model
    python benchmarks/grpo_throughput.py --device cuda --model gpt2-small --precision bf16 --completion-len 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

# The 1.2M-parameter LLaMA-style model of benchmarks/grpo_learning.py (vocab set from the tokenizer).
MODEL = {
    "name": "adder", "hidden_size": 128, "num_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "ffn_hidden_size": 384, "max_position_embeddings": 512, "position_embedding": "rope", "norm_type": "rmsnorm",
    "gated_mlp": True, "activation": "silu", "tie_word_embeddings": False,
}
LR = 1e-5


def prepare(root: Path, args: argparse.Namespace) -> tuple[Path, Path, list[dict]]:
    """Addition prompts preprocessed for IronCore, the shared model as an HF folder, the prompts as rows."""
    from ironcore.checkpoints.hf import save_hf_model
    from ironcore.config.model import ModelConfig
    from ironcore.data.demo.synthetic import write_task
    from ironcore.data.preprocessing.config import load_data_config
    from ironcore.data.preprocessing.preprocess import preprocess
    from ironcore.models import TransformerModel

    write_task(root / "task", "addition", 4000, 64, seed=0, overrides={"digits": "2"})
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({
        "name": "addition", "task_type": "rl", "source": {"path": str(root / "task" / "train.jsonl")},
        "reward_fields": ["answer"], "tokenizer": {"train": {"vocab_size": 258}}, "max_seq_length": 32,
        "output_dir": str(root / "data"), "num_workers": 0,
    }))
    metadata = preprocess(load_data_config(data), progress=False)
    torch.manual_seed(0)
    model = TransformerModel(ModelConfig(**model_fields(args, metadata["tokenizer"]["vocab_size"])))
    hf_dir = save_hf_model(model, root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / name).write_bytes((root / "data" / name).read_bytes())
    rows = [json.loads(line) for line in (root / "task" / "train.jsonl").read_text().splitlines()]
    return data, hf_dir, rows


def model_fields(args: argparse.Namespace, vocab_size: int) -> dict:
    """The benchmark's model: the addition model, or a model YAML's shape (configs/model/NAME.yaml) with the
    task's vocabulary and room for prompt + completion."""
    if args.model == "adder":
        return {**MODEL, "vocab_size": vocab_size}
    from ironcore.config import load_model_config, to_dict

    fields = to_dict(load_model_config(args.model))
    return {**fields, "vocab_size": vocab_size,
            "max_position_embeddings": max(fields["max_position_embeddings"], 64 + args.completion_len)}


def ironcore_trainer(root: Path, data: Path, hf_dir: Path, args: argparse.Namespace):
    from ironcore.config import build_config
    from ironcore.training.trainer import Trainer

    with open(hf_dir / "config.json") as f:
        vocab = json.load(f)["vocab_size"]
    cfg = build_config({
        "model": model_fields(args, vocab), "data": {"config_path": str(data)},
        "trainer": {"micro_batch_size": args.prompts, "output_dir": str(root / "ironcore"), "save_interval": 0,
                    "device": args.device, "precision": args.precision, "grad_clip": 1.0,
                    "objective_options": {
                        "num_generations": args.generations, "max_completion_length": args.completion_len,
                        "temperature": 1.0, "loss_type": "dapo", "beta": 0.0,
                        "rewards": [{"function": "exact"}]}},
        "optim": {"optimizer": "adamw", "max_lr": LR, "min_lr": LR, "lr_schedule": "constant", "warmup_steps": 0,
                  "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
        "operation": {"train_steps": 10**6, "eval_interval": 0}, "init": {"seed": 0, "init_from": str(hf_dir)},
        "utils": {"tracking": False},
    }, world_size=1)
    return Trainer(cfg)


def trl_trainer(root: Path, hf_dir: Path, rows: list[dict], args: argparse.Namespace, callback):
    import datasets
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from ironcore.rewards.exact import exact_answer

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)  # bf16: autocast, like ours
    config = GRPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1, num_generations=args.generations, max_completion_length=args.completion_len,
        temperature=1.0, top_p=1.0, beta=0.0, loss_type="dapo", num_iterations=1, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=args.warmup + args.pairs, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=args.device == "cpu", seed=0, disable_tqdm=True,
        dataloader_num_workers=0, bf16=args.precision == "bf16",
    )
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_answer], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback])
    rollout = trainer._generate_and_score_completions

    def timed(*a, **k):  # TRL's rollout: generation, rewards, advantages
        start = time.perf_counter()
        try:
            return rollout(*a, **k)
        finally:
            callback.trl_rollout = time.perf_counter() - start

    trainer._generate_and_score_completions = timed
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=12, help="timed (TRL step, IronCore step) pairs")
    parser.add_argument("--warmup", type=int, default=2, help="pairs dropped first")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--completion-len", type=int, default=32, help="max_completion_length")
    parser.add_argument("--model", default="adder",
                        help="adder (the 1.2M-parameter model of grpo_learning.py) or a model YAML's name/path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from transformers import TrainerCallback

    root = Path(tempfile.mkdtemp(prefix="grpo-throughput-"))
    data, hf_dir, rows = prepare(root, args)
    ours = ironcore_trainer(root, data, hf_dir, args)

    class Interleave(TrainerCallback):
        """Times each TRL step, then runs and times one IronCore step."""

        def __init__(self) -> None:
            self.pairs: list[dict] = []
            self.trl_rollout = 0.0

        def on_step_begin(self, *_, **__) -> None:
            _sync(args.device)
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            _sync(args.device)
            trl_seconds = time.perf_counter() - self.start
            start = time.perf_counter()
            metrics = ours.train_step()
            _sync(args.device)
            seconds = time.perf_counter() - start
            self.pairs.append({"trl_s": trl_seconds, "trl_rollout_s": self.trl_rollout, "ironcore_s": seconds,
                               "ironcore_rollout_s": metrics["time/rollout_s"],
                               "ironcore_length": metrics["completions/mean_length"]})
            print(f"pair {len(self.pairs):>3}: TRL {trl_seconds:.3f} s, IronCore {seconds:.3f} s, "
                  f"ratio {trl_seconds / seconds:.2f}", flush=True)

    callback = Interleave()
    peer = trl_trainer(root, hf_dir, rows, args, callback)
    peer.train()
    trl_lengths = [m["completions/mean_length"] for m in peer.state.log_history if "completions/mean_length" in m]
    pairs = callback.pairs[args.warmup:]
    ratios = [p["trl_s"] / p["ironcore_s"] for p in pairs]
    med = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    result = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu, {args.threads} threads",
        "torch": torch.__version__, "trl_version": trl.__version__, "transformers": transformers.__version__,
        "work": {"model": args.model, "prompts_per_step": args.prompts, "generations": args.generations,
                 "max_completion_length": args.completion_len, "precision": args.precision,
                 "params": sum(p.numel() for p in ours.model.parameters())},
        "pairs": len(pairs), "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
        "trl": {"steps_per_s": 1 / med["trl_s"], "rollout_s": med["trl_rollout_s"],
                "update_s": med["trl_s"] - med["trl_rollout_s"],
                "mean_completion_length": statistics.mean(trl_lengths[args.warmup:] or [float("nan")])},
        "ironcore": {"steps_per_s": 1 / med["ironcore_s"], "rollout_s": med["ironcore_rollout_s"],
                     "update_s": med["ironcore_s"] - med["ironcore_rollout_s"],
                     "mean_completion_length": statistics.mean(p["ironcore_length"] for p in pairs)},
    }
    print()
    print(f"GRPO steps/s on {result['device']}: {args.prompts} prompts x G={args.generations}, "
          f"{args.completion_len} completion tokens at most, model {args.model} "
          f"({result['work']['params']:,} parameters), {args.precision}")
    print(f"{'':<10} {'steps/s':>8} {'rollout s':>10} {'update s':>9} {'completion len':>15}")
    for name in ("trl", "ironcore"):
        r = result[name]
        print(f"{name:<10} {r['steps_per_s']:>8.2f} {r['rollout_s']:>10.3f} {r['update_s']:>9.3f} "
              f"{r['mean_completion_length']:>15.1f}")
    print(f"IronCore / TRL steps/s: median {result['ratio_median']:.2f}x over {len(pairs)} interleaved pairs "
          f"(min {result['ratio_min']:.2f}, max {result['ratio_max']:.2f})")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
