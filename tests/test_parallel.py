"""Tensor and data parallelism are exactly as correct as one process (torchrun on CPU/gloo).

Two torchrun launches do all the parallel work (see ``parallel_worker.py``):
2 processes run TP=2 then DP=2, 4 processes run TP=2 x DP=2 then TP=4. The
references are the same training step in this (single) process. fp32,
AdamW, gradient clipping on, loss masks, vocabularies that need padding.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import parallel_worker as worker
import pytest
import torch

from ironcore.checkpoints.load import load_model
from ironcore.parallel.sharding import load_full_optimizer_state, load_full_state_dict
from ironcore.training.memory import local_numels, plan_memory

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5
CASES = list(worker.CASES)


def torchrun(nproc: int, scenario: str, out: Path) -> dict:
    """Run the worker's ``scenario`` on ``nproc`` processes (single-node c10d rendezvous); its results."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
        str(REPO / "tests" / "parallel_worker.py"), scenario, str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun {scenario} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out / f"{scenario}.pt")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def two(out_dir) -> dict:
    return torchrun(2, "two", out_dir)


@pytest.fixture(scope="module")
def four(out_dir, two) -> dict:  # needs the TP=2 checkpoint written by ``two``
    return torchrun(4, "four", out_dir)


@functools.cache
def reference(case: str, steps: int, micro_batch: int, accumulation: int) -> worker.Run:
    """The single-process run (one thread: tiny matrices, and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return worker.train(case, steps, micro_batch, accumulation)
    finally:
        torch.set_num_threads(threads)


def assert_same_losses(got: list[float], want: list[float], rtol: float = LOSS_RTOL) -> None:
    assert len(got) == len(want)
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert worst <= rtol, f"losses differ by {worst:.2e} relative:\n{got}\n{want}"


@pytest.mark.parametrize("case", CASES)
def test_tp2_same_losses_for_10_steps(two, case):
    losses, norms, _ = two[f"tp2/{case}"]
    ref = reference(case, 10, 2, 1)
    assert_same_losses(losses, ref.losses)
    assert_same_losses(norms[:1], ref.grad_norms[:1])
    # Later grad norms amplify fp32 rounding through AdamW's normalised updates.
    assert max(abs(n / r - 1) for n, r in zip(norms, ref.grad_norms)) < 1e-3
    # It trains (rank-4 adapters on a random base learn slowly: they only have to learn).
    assert ref.losses[-1] < (1.0 if case in worker.LORA_CASES else 0.8) * ref.losses[0]


@pytest.mark.parametrize("case", CASES)
def test_tp2_same_gradients_after_one_step(two, case):
    _, _, grads = two[f"tp2/{case}"]
    ref = reference(case, 10, 2, 1).first_grads
    assert grads.keys() == ref.keys()
    for name, want in ref.items():
        assert grads[name].shape == want.shape, name
        err = (grads[name] - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item() + 1e-9, f"{name}: max error {err:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_tp2_replicated_gradients_agree_across_ranks(two, case):
    assert two[f"tp2/{case}/spread"] == 0.0


@pytest.mark.parametrize("case", CASES)
def test_vocab_parallel_cross_entropy_and_logsumexp_across_tp(two, case):
    diffs = two[f"tp2/{case}/ce"]
    assert diffs["loss"] < 1e-5 and diffs["grad"] < 1e-7, diffs
    assert diffs["padding_grad"] == 0.0
    assert diffs["lse"] < 1e-5 and diffs["lse_grad"] < 1e-7, diffs


@pytest.mark.parametrize("key", ["tp2/llama", "tp2/gpt2", "tp2sp/llama"])
def test_fused_linear_cross_entropy_under_tp(two, key):
    """The fused loss at TP=2 (vocab-parallel: max, sum of exponentials and target logit all-reduced per chunk),
    with and without sequence parallelism, equals the plain loss of the same layout: loss and all gradients at
    Liger-Kernel's fp32 tolerances."""
    for backend, (loss_diff, grad_diff) in two[f"{key}/fused_ce"].items():
        assert loss_diff < 5e-4 and grad_diff < 5e-4, (backend, loss_diff, grad_diff)


@pytest.mark.parametrize("case", ["gpt2", "qwen3", "mixtral"])
def test_sequence_parallel_equals_plain_tp(two, case):
    """TP=2 with the residual stream split over the sequence: the losses, norms and first gradients of TP=2
    without it (row-parallel biases and norms summed over the ranks' positions), and it did split."""
    losses, norms, grads, norm_positions, reduce_scatters = two[f"tp2sp/{case}"]
    plain_losses, plain_norms, plain_grads = two[f"tp2/{case}"]
    assert norm_positions == worker.SEQ // 2 and reduce_scatters > 0
    assert_same_losses(losses, plain_losses, rtol=1e-6)
    assert_same_losses(norms[:1], plain_norms[:1], rtol=1e-6)
    for name, want in plain_grads.items():
        err = (grads[name] - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item() + 1e-9, f"{name}: max error {err:.2e}"
    assert two[f"tp2sp/{case}/spread"] == 0.0


def test_sequence_parallel_reward_model_head(two):
    """A replicated head after the split stream (gathered, its gradient kept per rank): same scores and grads."""
    (scores, grads), (plain_scores, plain_grads) = two["tp2sp/score"], two["tp2/score"]
    assert torch.allclose(scores, plain_scores, rtol=1e-5, atol=1e-6)
    for name, want in plain_grads.items():
        assert torch.allclose(grads[name], want, rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("case", worker.LORA_CASES)
def test_lora_at_tp2_trains_the_same_adapters_as_one_process(two, case):
    """Adapters split like their base layers (B by output rows on q/k/v and gate/up parts, replicated with an MQA
    key/value head; A by input columns on row-parallel layers), their partial gradients summed over TP: after
    10 SGD steps the adapters (and norms trained in full) equal one process's to 1e-5. (With AdamW the losses
    agree, test_tp2_same_losses_for_10_steps; its parameters do not to 1e-5 for any model: its first update is
    the gradient's sign, which fp32 rounding flips where a gradient is near zero.)"""
    got = two[f"tp2/{case}/trained"]
    want = worker.trained(worker.train(case, 10, 2, 1, sgd=True).model)
    assert got.keys() == want.keys() and all(".lora." in n or "norm" in n for n in got)
    for name, tensor in want.items():
        err = (got[name] - tensor).abs().max().item() / tensor.abs().max().item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("case", ["gpt2", "llama", "llama_lora"])
def test_dp2_equals_gradient_accumulation(two, case):
    """DP=2 x micro-batch 2 == one process x micro-batch 2 x accumulation 2."""
    assert_same_losses(two[f"dp2/{case}"], reference(case, 4, 2, 2).losses)


@pytest.mark.parametrize("case", ["gpt2", "llama", "llama_lora"])
def test_distributed_optimizer_equals_plain_dp_and_accumulation(two, case):
    """DP=2 with the optimizer state sharded (tied embeddings, biases, weight decay on matrices, clipping; the
    buckets split parameters between ranks): bit for bit the losses and parameters of plain DP=2, and the losses
    of one process.

    Bitwise, not "close": with two ranks both reductions add the same two numbers (a + b == b + a), AdamW is
    element-wise, and both norms sum squares in float64 before one rounding to fp32 (``sum_of_squares``).
    With fp32 sums the norms were 1 ulp apart on some steps, so the clipping factors were; after 4 steps
    Adam had spread that to qkv weights beyond rtol 1e-6 (issue 32)."""
    losses, params, plain_params, plain_bytes, shard_bytes, buckets = two[f"dp2/{case}/distopt"]
    assert losses == two[f"dp2/{case}"]
    assert_same_losses(losses, reference(case, 4, 2, 2).losses, rtol=1e-6)
    for name, want in plain_params.items():
        assert torch.equal(params[name], want), name
    # Half the optimizer state per rank, give or take the padding of the buckets (<= 1 element each per moment)
    assert buckets > 1 and abs(shard_bytes - plain_bytes / 2) <= buckets * 2 * 4


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_bf16_parameters_with_fp32_master_weights_track_fp32(two, case):
    """bf16 parameters and activations, fp32 main gradients, master weights and AdamW states: over 20 steps
    the losses stay within 3 % + 0.01 nats of fp32 training (one process, accumulation); sharded over DP=2 they
    equal plain DP=2 in bf16, bit for bit.

    Why 3 % + 0.01: bf16 rounds weights and activations to 8 significant bits (2^-9 relative), so the two
    trajectories drift apart by a few percent in 20 steps, by an amount that depends on the CPU's kernels;
    near the end the losses approach 0 and a relative bound alone grows without limit. Observed: <= 2.4 %
    with AVX-512 kernels, < 3 % with AVX2 ones (ATEN_CPU_CAPABILITY=avx2); with ATen's scalar kernels
    (ATEN_CPU_CAPABILITY=default) 3.03 % at the last step, 0.005 nats at a loss of 0.165."""
    plain = two[f"dp2/{case}/bf16"]
    sharded, dtype, (param_bytes, grad_bytes, _) = two[f"dp2/{case}/bf16/distopt"]
    fp32 = reference(case, 20, 2, 2).losses
    assert dtype == torch.bfloat16 and grad_bytes >= 2 * param_bytes  # bf16 weights, fp32 gradients
    assert all(abs(b - f) <= 0.03 * f + 0.01 for b, f in zip(plain, fp32, strict=True)), (plain, fp32)
    assert plain != fp32  # it did run in bf16
    assert sharded == plain
    assert fp32[-1] < 0.8 * fp32[0] and plain[-1] < 0.8 * plain[0]


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_memory_planner_predicts_the_bytes_of_tp2_and_the_distributed_optimizer(two, case):
    """``ironcore.training.memory``: rank 0's parameters at TP=2 (vocabulary padding, replicated norms), and its
    parameter, gradient and optimizer-state bytes at DP=2 with the distributed optimizer, to the byte."""
    cfg = worker.model_config(case)
    assert sum(local_numels(cfg, 2)) == two[f"tp2/{case}/numel"]
    tp2 = plan_memory(cfg, tp=2, micro_batch_size=2, seq_len=worker.SEQ)  # the same plan in a TP=2 process
    assert (tp2.parameters, tp2.gradients, tp2.optimizer, tp2.activations) == two[f"tp2/{case}/plan"]
    plan = plan_memory(cfg, dp=2, distributed_optimizer=True, micro_batch_size=2, seq_len=worker.SEQ,
                       bucket_bytes=worker.BUCKET_BYTES)  # fmt: skip
    assert (plan.parameters, plan.gradients, plan.optimizer) == two[f"dp2/{case}/distopt/bytes"]


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_overlapped_reduction_equals_the_reduction_after_backward(two, case):
    """Buckets reduced during the last micro-batch's backward pass (accumulation 2: the first micro-batch
    communicates nothing): the same losses and parameters."""
    losses, params, after, early, buckets = two[f"dp2/{case}/overlap"]
    assert early == buckets > 1  # every bucket's reduction started inside the backward pass
    assert_same_losses(losses, two[f"dp2/{case}"], rtol=1e-6)
    for name, want in after.items():
        assert torch.equal(params[name], want), name


def test_distributed_optimizer_checkpoints_reshard(two, out_dir):
    """Saved at DP=2 with the distributed optimizer, resumed in one process with plain AdamW (and at TP=2 x DP=2
    with it: test_tp2_x_dp2_on_4_processes); a plain TP=2 checkpoint resumes at DP=2 with it."""
    ckpt = torch.load(out_dir / "llama_dp2_distopt_step3.pt")
    model, optimizer = worker.build("llama")
    load_full_state_dict(model, ckpt["model"])
    load_full_optimizer_state(model, optimizer, ckpt["optimizer"])
    resumed = worker.train("llama", 2, 4, 1, run=worker.Run(model, optimizer), start=3)  # the 2nd uses the state
    assert_same_losses(resumed.losses, two["dp2/distopt/ckpt/next_losses"], rtol=1e-6)
    assert_same_losses(two["dp2/distopt/from_tp2/next_losses"], reference("llama", 5, 2, 1).losses[3:])


def test_checkpoint_saved_at_tp2_resumes_at_tp1(two, out_dir):
    ckpt = torch.load(out_dir / "llama_tp2_step3.pt")
    model, optimizer = worker.build("llama")
    load_full_state_dict(model, ckpt["model"])
    load_full_optimizer_state(model, optimizer, ckpt["optimizer"])
    assert (worker.checkpoint_probe(model) - two["tp2/ckpt/probe"]).abs().max() < 1e-5
    resumed = worker.train("llama", 1, 2, 1, run=worker.Run(model, optimizer), start=3)
    assert_same_losses(resumed.losses, [two["tp2/ckpt/next_loss"]])
    assert_same_losses(resumed.losses, reference("llama", 4, 2, 1).losses[3:])  # as if never interrupted


@pytest.mark.parametrize("case", worker.NEW_FAMILIES)
def test_new_families_convert_both_ways_at_tp2(two, out_dir, case):
    """Gemma 2, Phi-3 (fused HF tensors) and Mixtral (per-expert HF tensors) trained at TP=2, saved as HF
    checkpoints, give the same logits in one process, through ours and through transformers."""
    transformers = pytest.importorskip("transformers")
    want = two[f"tp2/{case}/hf_probe"]
    folder = out_dir / f"{case}_tp2_hf"
    assert (worker.checkpoint_probe(load_model(folder)) - want).abs().max() < 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    with torch.no_grad():
        got = hf(worker.batch(77, 2, hf.config.vocab_size)[0]).logits
    assert (got - want).abs().max() < 1e-4


def test_hf_export_and_import_at_tp2(two, out_dir):
    """save_hf_model gathers a TP=2 model (vocab padding dropped); load_model shards at TP=2 and TP=1."""
    assert (two["tp2/hf/probe"] - two["tp2/ckpt/probe"]).abs().max() < 1e-5
    model = load_model(out_dir / "llama_tp2_hf")
    assert model.config.vocab_size == 300 and model.embed.weight.shape[0] == 384
    assert (worker.checkpoint_probe(model) - two["tp2/ckpt/probe"]).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama", "gemma", "llama_lora"])
def test_tp2_x_dp2_on_4_processes(four, two, case):
    """Also with the distributed optimizer (sharding each TP rank's parameters over its DP group), and its DP=2
    checkpoint resumed there. LoRA: the distributed optimizer shards the adapters only and trains the same
    adapters as one process."""
    assert_same_losses(four[f"tp2dp2/{case}"], reference(case, 4, 2, 4).losses)
    assert four[f"tp2dp2/{case}/distopt"] == four[f"tp2dp2/{case}"]  # bit for bit, as at DP=2 alone
    assert_same_losses(four["tp2dp2/distopt/ckpt/next_losses"], two["dp2/distopt/ckpt/next_losses"])
    if case in worker.LORA_CASES:
        want = worker.trained(worker.train(case, 4, 2, 4, sgd=True).model)
        for name, tensor in want.items():
            err = (four[f"tp2dp2/{case}/trained"][name] - tensor).abs().max().item() / tensor.abs().max().item()
            assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.slow
def test_gloo_rings_reduce_scatter_and_all_gather_over_4_ranks(four):
    reduce_scatter_error, all_gather_error = four["tp4/ring"]
    assert reduce_scatter_error < 1e-5 and all_gather_error == 0.0


@pytest.mark.parametrize("case", ["llama", "gemma", "qwen3"])
def test_tp4_replicates_kv_heads(four, case):
    """TP=4 with 2 (llama) and 1 (gemma, qwen3) key/value heads: each KV head lives on 2 or 4 ranks."""
    assert_same_losses(four[f"tp4/{case}"], reference(case, 4, 2, 1).losses)


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_loads_at_tp4(two, four):
    assert (four["tp4/ckpt/probe"] - two["tp2/ckpt/probe"]).abs().max() < 1e-5
    assert_same_losses([four["tp4/ckpt/next_loss"]], [two["tp2/ckpt/next_loss"]])
