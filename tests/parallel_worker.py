"""A self-contained training step under TP x DP, for the parallel tests.

``train`` is the whole recipe a trainer follows: vocab-parallel logits ->
vocab-parallel cross-entropy -> loss token-weighted over the *global* batch
-> backward per micro-batch -> ``finalize_grads`` (TP sums, DP sum) -> global
grad-norm clipping -> AdamW (weight decay on the matrices only); or, with the
distributed optimizer, TP sums -> reduce-scatter over DP -> the norm from the
shards -> each rank's AdamW shard -> all-gather. The tests run it in one
process for the reference and under torchrun for the parallel layouts::

    torchrun --nnodes 1 --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint localhost:0 \
        tests/parallel_worker.py two OUT_DIR

Rank 0 writes what it measured to ``OUT_DIR/<scenario>.pt``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ironcore.checkpoints.hf import save_hf_model
from ironcore.checkpoints.load import load_model
from ironcore.config import load_model_config
from ironcore.config.base import validated
from ironcore.config.model import LoRAConfig, ModelConfig
from ironcore.models import TransformerModel
from ironcore.parallel import comm, state
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_logsumexp
from ironcore.parallel.grad import clip_factor
from ironcore.parallel.setup import init_parallel
from ironcore.parallel.sharding import (
    full_optimizer_state,
    full_state_dict,
    gather_tensor,
    load_full_optimizer_state,
    load_full_state_dict,
    named_splits,
    shard_tensor,
)
from ironcore.training.distributed_optimizer import (
    DistributedOptimizer,
    FlatBufferOptimizer,
    MixedPrecisionOptimizer,
)
from ironcore.training.memory import measured_state_bytes, plan_memory
from ironcore.training.optim import parameter_groups, reduce_gradients, step_with_scaled_grads

# name -> (model config, overrides). Vocab sizes that are not multiples of 128 x tp exercise the padding:
# 1000 pads to 1024 at every TP size; 300 pads to 384 at TP=1 and 512 at TP=2/4 (at TP=4 the last rank
# holds nothing but padding).
CASES = {
    "gpt2": ("gpt2-tiny", {"num_layers": 2, "vocab_size": 1000}),  # learned positions, biases, tied
    "llama": ("llama-tiny", {"num_layers": 2, "vocab_size": 300}),  # GQA: 2 kv heads, untied
    "gemma": ("gemma-tiny", {"num_layers": 2}),  # MQA: 1 kv head, replicated when tp > 1
    # q/k norms (partial gradients) on a replicated KV head with a q/k/v bias: the hardest gradient sync
    "qwen3": ("qwen3-tiny", {"num_layers": 2, "vocab_size": 1000, "num_key_value_heads": 1, "attention_bias": True}),
    # Sandwich norms, soft-capped scores and logits, a local (window 5 < 16 positions) and a global layer.
    "gemma2": ("gemma2-tiny", {"num_layers": 2, "vocab_size": 1000, "sliding_window": 5, "attn_logit_softcap": 0.5,
                               "final_logit_softcap": 2.0}),
    "phi3": ("phi3-tiny", {"num_layers": 2, "vocab_size": 300}),  # fused q/k/v and gate/up in its HF checkpoint
    # Experts sharded like the MLP, the router replicated, the load-balancing loss in the backward pass.
    "mixtral": ("mixtral-tiny", {"num_layers": 2, "vocab_size": 1000, "moe_aux_loss_coef": 0.1}),
    # LoRA: B split like its column-parallel base (q/k/v and gate/up parts; GQA), A like its row-parallel base.
    "llama_lora": ("llama-tiny", {"num_layers": 2, "vocab_size": 300, "lora": LoRAConfig(rank=4, alpha=8.0)}),
    # ... with the key/value head replicated over both ranks (MQA), and adapters on some projections only.
    "gemma_lora": ("gemma-tiny", {"num_layers": 2, "lora": LoRAConfig(rank=4, targets=["q", "v", "o", "down"])}),
    # ... and one adapter over GPT-2's fused q/k/v (c_attn), norms trained in full.
    "gpt2_lora": ("gpt2-tiny", {"num_layers": 2, "vocab_size": 1000,
                                "lora": LoRAConfig(rank=4, targets=["qkv", "o", "up", "down"], modules_to_save=["norm"])}),
}
LORA_CASES = ("llama_lora", "gemma_lora", "gpt2_lora")
NEW_FAMILIES = ("gemma2", "phi3", "mixtral")
SEQ = 16
BUCKET_BYTES = 40_000  # the distributed optimizer's: several buckets, parameters split between ranks
SEED = 1234


def model_config(case: str) -> ModelConfig:
    name, overrides = CASES[case]
    return validated(dataclasses.replace(load_model_config(name), **overrides), "model")


def batch(step: int, sequences: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: inputs, targets and a loss mask (about 1 in 8 tokens masked out).

    Sequences cycle through 16 token ids spread over the whole vocabulary (so every vocab-parallel
    rank owns some targets), from a random start: something to learn in a few steps.
    """
    g = torch.Generator().manual_seed(1000 + step)
    cycle = torch.arange(16) * (vocab // 16)
    start = torch.randint(0, 16, (sequences, 1), generator=g)
    tokens = cycle[(start + torch.arange(SEQ + 1)) % 16]
    mask = (torch.rand(sequences, SEQ, generator=g) > 0.125).float()
    return tokens[:, :-1], tokens[:, 1:], mask


@dataclasses.dataclass
class Run:
    model: TransformerModel
    optimizer: torch.optim.Optimizer
    losses: list[float] = dataclasses.field(default_factory=list)
    grad_norms: list[float] = dataclasses.field(default_factory=list)
    first_grads: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # full form, step 0


def build(case: str, distributed: bool = False, overlap: bool = False, bf16: bool = False, sgd: bool = False
          ) -> tuple[TransformerModel, torch.optim.Optimizer]:  # fmt: skip
    """The model and AdamW (decay on matrices only); ``distributed``: sharded over DP, in small buckets
    (``overlap``: reduced during the last micro-batch's backward pass); ``bf16``: bf16 parameters, fp32 main
    gradients and master weights (sharded or not); ``sgd``: SGD with momentum instead of AdamW (its update is
    proportional to the gradient, so fp32 rounding stays rounding: Adam's first step is the gradient's sign)."""
    torch.manual_seed(SEED)
    model = TransformerModel(model_config(case))
    if model.config.lora is not None:  # non-zero B from the start, drawn in full: every adapter gradient counts
        generator, splits = torch.Generator().manual_seed(SEED), named_splits(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora." in name:
                    full = splits[name].full_shape(p.shape) if name in splits else p.shape
                    p.copy_(shard_tensor(torch.randn(full, generator=generator) * 0.05, splits.get(name)))

    def adamw(groups: list[dict]) -> torch.optim.Optimizer:
        if sgd:
            return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        return torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))

    groups = parameter_groups(model, 0.1)
    if not distributed and not bf16:
        return model, adamw(groups)
    if not distributed:
        return model, MixedPrecisionOptimizer(model, groups, adamw, bucket_bytes=BUCKET_BYTES)
    return model, DistributedOptimizer(model, groups, adamw, bucket_bytes=BUCKET_BYTES, overlap=overlap,
                                       param_dtype=torch.bfloat16 if bf16 else None)  # fmt: skip


def train(
    case: str, steps: int, micro_batch: int, accumulation: int, run: Run | None = None, start: int = 0,
    distributed: bool = False, overlap: bool = False, bf16: bool = False, sgd: bool = False,
) -> Run:
    """``steps`` optimizer steps on the global batches ``start``, ``start + 1``, ...; returns the Run."""
    run = run or Run(*build(case, distributed, overlap, bf16, sgd))
    model, optimizer = run.model, run.optimizer
    dp, dp_rank = state.dp_size(), state.dp_rank()
    per_rank = micro_batch * accumulation
    splits = named_splits(model)
    for step in range(start, start + steps):
        inputs, targets, mask = batch(step, per_rank * dp, model.config.vocab_size)
        global_tokens = mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(())
        for micro in range(accumulation):
            rows = slice(dp_rank * per_rank + micro * micro_batch, dp_rank * per_rank + (micro + 1) * micro_batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as the trainer runs bf16
                logits = model(inputs[rows], parallel_output=True)
            loss = (vocab_parallel_cross_entropy(logits, targets[rows]) * mask[rows]).sum() / global_tokens
            if micro == accumulation - 1 and getattr(optimizer, "overlap", False):
                optimizer.arm()  # this backward pass starts the reductions (earlier ones only accumulate)
            loss.backward()
            loss_sum += loss.detach()
        run.grad_norms.append(reduce_gradients(model, optimizer).item())
        if step == 0 and not isinstance(optimizer, FlatBufferOptimizer):  # reduced in place (not in shards)
            run.first_grads = {n: gather_tensor(p.grad, splits.get(n)).clone() for n, p in model.named_parameters()
                               if p.requires_grad}  # fmt: skip
        step_with_scaled_grads(optimizer, clip_factor(run.grad_norms[-1], 1.0))
        run.losses.append(comm.all_reduce(loss_sum, state.dp_group()).item())
    return run


def replicated_grad_spread(model: TransformerModel) -> float:
    """Largest difference between TP ranks' gradients of a replicated parameter (should be 0)."""
    splits = named_splits(model)
    spread = 0.0
    for name, p in model.named_parameters():
        if name not in splits and p.grad is not None:
            copies = comm.all_gather(p.grad, state.tp_group())
            spread = max(spread, max((c - copies[0]).abs().max().item() for c in copies))
    return spread


def cross_entropy_check(case: str) -> dict[str, float]:
    """Vocab-parallel CE and logsumexp on sharded logits vs torch on the gathered ones: values and logit grads."""
    model, _ = build(case)
    inputs, targets, _ = batch(99, 2, model.config.vocab_size)
    targets[0, :3] = -100
    vocab = model.config.vocab_size

    def compare(ours_of, reference_of, upstream: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        """Largest value difference, our full-width logit gradient, largest gradient difference."""
        with torch.no_grad():
            local, full = model(inputs, parallel_output=True), model(inputs)
        local.requires_grad_(True)
        full.requires_grad_(True)
        ours, reference = ours_of(local), reference_of(full)
        (ours * upstream).sum().backward()
        (reference * upstream).sum().backward()
        our_grad = torch.cat(comm.all_gather(local.grad, state.tp_group()), dim=-1)
        return (ours - reference).abs().max().item(), our_grad, (our_grad[..., :vocab] - full.grad).abs().max().item()

    loss, grad, grad_diff = compare(
        lambda z: vocab_parallel_cross_entropy(z, targets),
        lambda z: F.cross_entropy(z.transpose(1, 2), targets, reduction="none"), torch.ones(targets.shape),
    )
    uneven = torch.rand(targets.shape, generator=torch.Generator().manual_seed(5))
    lse, _, lse_grad = compare(vocab_parallel_logsumexp, lambda z: torch.logsumexp(z, dim=-1), uneven)
    return {
        "loss": loss,
        "grad": grad_diff,
        "padding_grad": grad[..., vocab:].abs().max().item() if grad.shape[-1] > vocab else 0.0,
        "lse": lse,
        "lse_grad": lse_grad,
    }


def score_head_check() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A reward model's scores and full gradients (its replicated head reads all positions)."""
    torch.manual_seed(SEED)
    model = TransformerModel(dataclasses.replace(model_config("llama"), score_head=True))
    scores = model(batch(5, 2, model.config.vocab_size)[0])
    (scores.squeeze(-1) * torch.linspace(-1, 1, SEQ)).sum().backward()
    reduce_gradients(model, torch.optim.SGD(model.parameters(), lr=0.0))
    splits = named_splits(model)
    return scores.detach(), {n: gather_tensor(p.grad, splits.get(n)) for n, p in model.named_parameters()}


def fused_loss_check(case: str) -> dict[str, tuple[float, float]]:
    """The fused linear + cross-entropy (chunked, triton) against the plain loss of the same model under the current
    layout: (relative loss difference, largest gradient difference / largest gradient) per backend."""
    inputs, targets, mask = batch(3, 2, model_config(case).vocab_size)
    runs = {}
    for backend in ("torch", "chunked", "triton"):
        torch.manual_seed(SEED)
        cfg = model_config(case)
        cfg.kernel_options.cross_entropy = backend
        cfg.kernel_options.chunk_tokens = 7  # chunks that do not divide the 32 tokens
        model = TransformerModel(cfg)
        loss = model(inputs, labels=targets, loss_weights=mask / mask.sum())
        loss.backward()
        reduce_gradients(model, torch.optim.SGD(model.parameters(), lr=0.0))
        splits = named_splits(model)
        runs[backend] = (loss.item(), {n: gather_tensor(p.grad, splits.get(n)) for n, p in model.named_parameters()})
    plain_loss, plain_grads = runs.pop("torch")
    return {backend: (abs(loss / plain_loss - 1),
                      max((grads[n] - g).abs().max().item() / g.abs().max().item() for n, g in plain_grads.items()))
            for backend, (loss, grads) in runs.items()}  # fmt: skip


def checkpoint_probe(model: TransformerModel) -> torch.Tensor:
    """Full logits of a fixed batch, to compare a model before and after resharding."""
    with torch.no_grad():
        return model(batch(77, 2, model.config.vocab_size)[0])


def scenario_two(out: Path) -> dict:
    """2 processes: TP=2 (training, gradients, CE, checkpoint), then DP=2."""
    results: dict = {}
    init_parallel(2, model_config("gemma"))
    for case in CASES:
        first = train(case, steps=1, micro_batch=2, accumulation=1)
        results[f"tp2/{case}/spread"] = replicated_grad_spread(first.model)
        run = train(case, steps=10, micro_batch=2, accumulation=1)
        results[f"tp2/{case}"] = (run.losses, run.grad_norms, run.first_grads)
        if case in LORA_CASES:  # the adapters after 10 SGD steps, in full form
            results[f"tp2/{case}/trained"] = trained(train(case, steps=10, micro_batch=2, accumulation=1,
                                                           sgd=True).model)
        results[f"tp2/{case}/ce"] = cross_entropy_check(case)
        if case in ("llama", "gpt2"):  # untied, the last rank mostly vocabulary padding; the tied embedding
            results[f"tp2/{case}/fused_ce"] = fused_loss_check(case)
        results[f"tp2/{case}/numel"] = sum(p.numel() for p in run.model.parameters())  # rank 0's, for the planner
        plan = plan_memory(model_config(case), tp=2, micro_batch_size=2, seq_len=SEQ)  # planned inside a TP run
        results[f"tp2/{case}/plan"] = (plan.parameters, plan.gradients, plan.optimizer, plan.activations)
        if case in NEW_FAMILIES:  # the trained TP=2 model as an HF checkpoint (rank 0 writes), and its logits
            save_hf_model(run.model, out / f"{case}_tp2_hf")
            results[f"tp2/{case}/hf_probe"] = checkpoint_probe(run.model)
    # Sequence parallelism on the same TP=2 layout: the residual stream split over the sequence.
    state.set_sequence_parallel(True)
    for case in ("gpt2", "qwen3", "mixtral"):  # row-parallel biases, LayerNorm, tied weights; q/k norms; experts
        comm.reset_traffic()
        seen: list[torch.Size] = []  # what the final norm sees: this rank's positions only
        first = train(case, steps=1, micro_batch=2, accumulation=1)
        first.model.final_norm.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0].shape))
        first.model(batch(0, 2, first.model.config.vocab_size)[0])
        results[f"tp2sp/{case}/spread"] = replicated_grad_spread(first.model)
        run = train(case, steps=10, micro_batch=2, accumulation=1)
        results[f"tp2sp/{case}"] = (run.losses, run.grad_norms, run.first_grads, seen[0][1],
                                    comm.traffic().get("reduce_scatter/tp", (0, 0))[1])  # fmt: skip
    results["tp2sp/score"] = score_head_check()
    results["tp2sp/llama/fused_ce"] = fused_loss_check("llama")
    state.set_sequence_parallel(False)
    results["tp2/score"] = score_head_check()
    # Checkpoint after 3 steps (full tensors, written by rank 0), then one more step.
    run = train("llama", steps=3, micro_batch=2, accumulation=1)
    ckpt = {"model": full_state_dict(run.model), "optimizer": full_optimizer_state(run.model, run.optimizer)}
    if torch.distributed.get_rank() == 0:
        torch.save(ckpt, out / "llama_tp2_step3.pt")
    results["tp2/ckpt/probe"] = checkpoint_probe(run.model)
    # HF export from TP=2 (rank 0 writes) and import into a TP=2 model.
    save_hf_model(run.model, out / "llama_tp2_hf")
    torch.distributed.barrier()
    results["tp2/hf/probe"] = checkpoint_probe(load_model(out / "llama_tp2_hf"))
    results["tp2/ckpt/next_loss"] = train("llama", 1, 2, 1, run=run, start=3).losses[-1]

    init_parallel(1, model_config("gemma"))  # same processes, now data parallel: TP groups of one
    for case in ("gpt2", "llama", "llama_lora"):
        plain = train(case, steps=4, micro_batch=2, accumulation=1)
        sharded = train(case, steps=4, micro_batch=2, accumulation=1, distributed=True)
        overlapped = train(case, steps=4, micro_batch=1, accumulation=2, distributed=True, overlap=True)
        after = train(case, steps=4, micro_batch=1, accumulation=2, distributed=True)  # reduced after backward
        results[f"dp2/{case}/overlap"] = (overlapped.losses, full_state_dict(overlapped.model),
                                          full_state_dict(after.model), overlapped.optimizer.early,
                                          len(overlapped.optimizer.buckets))  # fmt: skip
        results[f"dp2/{case}"] = plain.losses
        results[f"dp2/{case}/distopt/bytes"] = measured_state_bytes(sharded.model, sharded.optimizer)
        results[f"dp2/{case}/distopt"] = (sharded.losses, full_state_dict(sharded.model),
                                          full_state_dict(plain.model), state_bytes(plain.optimizer),
                                          sharded.optimizer.state_bytes, len(sharded.optimizer.buckets))  # fmt: skip
    # bf16 parameters with fp32 main gradients and master weights, plain DP and sharded, 20 steps.
    for case in ("gpt2", "llama"):
        results[f"dp2/{case}/bf16"] = train(case, steps=20, micro_batch=2, accumulation=1, bf16=True).losses
        sharded = train(case, steps=20, micro_batch=2, accumulation=1, distributed=True, bf16=True)
        results[f"dp2/{case}/bf16/distopt"] = (sharded.losses, sharded.model.embed.weight.dtype,
                                               measured_state_bytes(sharded.model, sharded.optimizer))  # fmt: skip
    # The distributed optimizer's checkpoint after 3 steps (rank 0 writes; the test resumes it in one process
    # with plain AdamW, the 4-process run at TP=2 x DP=2 with the distributed optimizer) ...
    run = train("llama", steps=3, micro_batch=2, accumulation=1, distributed=True)
    ckpt = {"model": full_state_dict(run.model), "optimizer": full_optimizer_state(run.model, run.optimizer)}
    if torch.distributed.get_rank() == 0:
        torch.save(ckpt, out / "llama_dp2_distopt_step3.pt")
    results["dp2/distopt/ckpt/next_losses"] = train("llama", 2, 2, 1, run=run, start=3).losses[-2:]  # the state counts
    # ... and the plain TP=2 checkpoint resumes at DP=2 with it.
    model, optimizer = build("llama", distributed=True)
    ckpt = torch.load(out / "llama_tp2_step3.pt")
    load_full_state_dict(model, ckpt["model"])
    load_full_optimizer_state(model, optimizer, ckpt["optimizer"])
    results["dp2/distopt/from_tp2/next_losses"] = train("llama", 2, 1, 1, run=Run(model, optimizer), start=3).losses
    return results


def trained(model: TransformerModel) -> dict[str, torch.Tensor]:
    """The trainable tensors (LoRA: the adapters and modules trained in full) in full form."""
    return full_state_dict(model, only={n for n, p in model.named_parameters() if p.requires_grad})


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of a plain optimizer's per-parameter state tensors (AdamW's moments)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim() > 0)


def ring_check() -> tuple[float, float]:
    """gloo's reduce-scatter and all-gather (rings of point-to-point exchanges) over 4 ranks, against the sums
    and concatenation computed from every rank's input: the largest errors."""
    rank, group = state.tp_rank(), state.tp_group()
    inputs = [torch.randn(4 * 1000, generator=torch.Generator().manual_seed(r)) for r in range(4)]
    out = torch.empty(1000)
    comm.reduce_scatter(inputs[rank].clone(), out, group, async_op=True).wait()
    want = sum(inputs)[rank * 1000 : (rank + 1) * 1000]
    gathered = comm.all_gather_into(torch.empty(4 * 1000), inputs[rank][:1000], group)
    return (out - want).abs().max().item(), (gathered - torch.cat([t[:1000] for t in inputs])).abs().max().item()


def scenario_four(out: Path) -> dict:
    """4 processes: TP=2 x DP=2 with accumulation, then TP=4 (MQA/GQA replicated) and the TP=2 checkpoint."""
    results: dict = {}
    init_parallel(2, model_config("gemma"))
    for case in ("llama", "gemma", "llama_lora"):
        results[f"tp2dp2/{case}"] = train(case, steps=4, micro_batch=2, accumulation=2).losses
        results[f"tp2dp2/{case}/distopt"] = train(case, steps=4, micro_batch=2, accumulation=2, distributed=True).losses
        if case in LORA_CASES:  # the distributed optimizer's adapters after SGD steps
            sharded = train(case, steps=4, micro_batch=2, accumulation=2, distributed=True, sgd=True)
            results[f"tp2dp2/{case}/trained"] = trained(sharded.model)
    model, optimizer = build("llama", distributed=True)  # the DP=2 distributed optimizer's checkpoint
    ckpt = torch.load(out / "llama_dp2_distopt_step3.pt")
    load_full_state_dict(model, ckpt["model"])
    load_full_optimizer_state(model, optimizer, ckpt["optimizer"])
    results["tp2dp2/distopt/ckpt/next_losses"] = train("llama", 2, 2, 1, run=Run(model, optimizer), start=3).losses
    init_parallel(4, model_config("gemma"))
    results["tp4/ring"] = ring_check()
    for case in ("llama", "gemma", "qwen3"):
        results[f"tp4/{case}"] = train(case, steps=4, micro_batch=2, accumulation=1).losses
    model, optimizer = build("llama")
    ckpt = torch.load(out / "llama_tp2_step3.pt")
    load_full_state_dict(model, ckpt["model"])
    load_full_optimizer_state(model, optimizer, ckpt["optimizer"])
    results["tp4/ckpt/probe"] = checkpoint_probe(model)
    results["tp4/ckpt/next_loss"] = train("llama", 1, 2, 1, run=Run(model, optimizer), start=3).losses[-1]
    return results


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    results = {"two": scenario_two, "four": scenario_four}[scenario](out)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out / f"{scenario}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
