"""KV-cache generation is exact: the same logits as a full forward pass, the same tokens as HF ``generate``.

The models are test_hf_parity's small random HF models with wide weights (so
that a wrongly cached key or position changes the logits), imported with
``load_model``. Mistral's window (5) is shorter than the prompts and the
generated sequences. The TP test runs this file as a torchrun script::

    torchrun --nproc_per_node 2 tests/test_inference.py HF_MODELS_DIR
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import DEVICE
from test_hf_parity import CASES, _hf_model

from ironcore.checkpoints.hf import save_hf_model
from ironcore.checkpoints.hf_families import model_config_from_hf
from ironcore.checkpoints.load import load_model
from ironcore.cli import main
from ironcore.inference import DecodeReport, generate, sample_next
from ironcore.layers.attention import KVCache, kv_cache_bytes
from ironcore.models import TransformerModel

generate_module = importlib.import_module("ironcore.inference.generate")  # the package exports the function
steps_module = importlib.import_module("ironcore.inference.steps")
sampling_module = importlib.import_module("ironcore.inference.sampling")
REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
NEW = 16
# Ragged prompts: the first two are longer than Mistral's window of 5.
PROMPTS = [
    torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(10 + n)).tolist() for n in (12, 9, 3)
]
RAGGED = [3, NEW, 9]  # one budget per prompt
TP_CASES = ["gpt2", "llama", "gemma_mqa", "qwen3_qk_norm", "mistral_sliding_window"]


@functools.cache
def _saved(case: str, root: Path) -> tuple[torch.nn.Module, Path]:
    hf_model = _hf_model(CASES[case])
    hf_model.generation_config.eos_token_id = None  # stop only where a test says so
    hf_model.save_pretrained(root / case)
    return hf_model, root / case


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf")


@pytest.fixture
def imported(hf_root):
    """(case, device) -> (HF model, our model loaded from its checkpoint folder), both on that device."""

    def get(case: str, device: str = "cpu") -> tuple[torch.nn.Module, TransformerModel]:
        hf_model, folder = _saved(case, hf_root)
        return hf_model.to(device), load_model(folder, device=device)

    return get


@pytest.mark.device
@pytest.mark.parametrize("case", list(CASES))
def test_cached_logits_match_full_forward(case: str, imported) -> None:
    """Prefill 7 tokens, a 3-token chunk after them, then one token at a time: every position as the full pass."""
    _, model = imported(case, DEVICE)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(len(model.layers), 24)
        pieces = [model(ids[:, :7], kv_cache=cache), model(ids[:, 7:10], kv_cache=cache)]
        pieces += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(10, 24)]
    assert cache.length == 24
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL
    assert full.std() > 0.5


def test_cache_overflow_is_an_error(imported) -> None:
    _, model = imported("llama")
    cache = KVCache(len(model.layers), 4)
    with torch.no_grad(), pytest.raises(ValueError, match="capacity of 4"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


# graph: CUDA only (IRONCORE_TEST_DEVICE=cuda, benchmarks/gpu_check.sh). compile: CPU only, and one family (RoPE,
# GQA, a window shorter than the sequence; the reuse test below compiles llama): a compilation costs seconds (the
# process's first one ~30 s, a minute with inductor's on-disk cache cold). All families: benchmarks/compiled_parity.py.
COMPILED_CASES = ["mistral_sliding_window"]
MOE_CASES = [case for case, spec in CASES.items() if "num_experts_per_tok" in spec]  # no CUDA graphs: see decode_mode
PATHS = [(case, decode) for decode in ("eager", "static", "graph") for case in CASES
         if not (decode == "graph" and case in MOE_CASES)]
PATHS += [(case, "compile") for case in COMPILED_CASES]


@pytest.mark.device
@pytest.mark.parametrize(("case", "decode"), PATHS)
def test_greedy_matches_hf_generate(case: str, decode: str, imported) -> None:
    if decode == "graph" and not DEVICE.startswith("cuda"):
        pytest.skip("CUDA graphs need a CUDA device")
    if decode == "compile" and DEVICE != "cpu":
        pytest.skip("compiled decoding is the CPU's path")
    hf_model, model = imported(case, DEVICE)
    ours = generate(model, PROMPTS, NEW, decode=decode)
    for prompt, got in zip(PROMPTS, ours):
        ids = torch.tensor([prompt], device=DEVICE)
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip (an explicit mask: HF would otherwise take prompt tokens equal to pad_token_id for padding)
        top2 = torch.stack(out.scores).topk(2, dim=-1).values
        margin = (top2[..., 0] - top2[..., 1]).min().item()
        assert got == out.sequences[0, len(prompt) :].tolist(), f"smallest top-2 logit margin {margin:.1e}"
        assert margin > 1e-5  # ten times our logit error: the argmax is not a coin toss


def test_ragged_batch_equals_each_prompt_alone(imported) -> None:
    for case in ("gpt2", "mistral_sliding_window", "gemma_mqa"):
        _, model = imported(case)
        batched = generate(model, PROMPTS, NEW)
        assert batched == [generate(model, [p], NEW)[0] for p in PROMPTS]


def test_tensor_input_and_stop_tokens(imported) -> None:
    _, model = imported("llama")
    free = generate(model, torch.tensor([PROMPTS[0], PROMPTS[0]]), NEW)
    assert free[0] == free[1] and len(free[0]) == NEW
    full = generate(model, PROMPTS, NEW)
    stop = full[0][4]
    stopped = generate(model, PROMPTS, NEW, eos_token_id=stop)
    for row, got in zip(full, stopped):
        end = row.index(stop) + 1 if stop in row else NEW
        assert got == row[:end]  # each row stops at its own first stop token, which is included
    assert generate(model, PROMPTS, NEW, eos_token_id=[full[0][0], full[1][0], full[2][0]]) == [
        [r[0]] for r in full
    ]
    assert generate(model, PROMPTS, 0) == [[], [], []]


def test_sampling_is_reproducible_with_a_seed(imported) -> None:
    _, model = imported("qwen3_qk_norm")
    first = generate(model, PROMPTS, NEW, temperature=1.0, seed=7)
    assert generate(model, PROMPTS, NEW, temperature=1.0, seed=7) == first
    assert generate(model, PROMPTS, NEW, temperature=1.0, seed=8) != first
    assert generate(model, PROMPTS, NEW, temperature=1.0, top_k=5, top_p=0.9, seed=7) == generate(
        model, PROMPTS, NEW, temperature=1.0, top_k=5, top_p=0.9, seed=7
    )
    greedy = generate(model, PROMPTS, NEW)
    assert generate(model, PROMPTS, NEW, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(model, PROMPTS, NEW, temperature=0.7, top_p=1e-6, seed=1) == greedy


def test_sampling_draws_one_uniform_per_row_whatever_rows_remain() -> None:
    """One float64 uniform per row of the whole batch (the generator moves by exactly that), mapped through the
    kept tokens' cumulative mass in vocabulary order; a row keeps its draw in a sub-batch, with any filter."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    for filters in ({}, {"top_p": 0.8}, {"top_k": 7}, {"top_k": 7, "top_p": 0.5}):
        generator = torch.Generator().manual_seed(3)
        drawn = sample_next(logits, 0.8, generator=generator, **filters)
        u = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        assert torch.equal(generator.get_state(), _after_uniforms(3, 6).get_state())
        mass = _reference_filter(logits, 0.8, filters.get("top_k"), filters.get("top_p")).softmax(-1)
        cumulative = mass.cumsum(-1)
        assert drawn.tolist() == (cumulative < u[:, None] * cumulative[:, -1:]).sum(-1).tolist(), filters
        rows = torch.tensor([1, 4])
        part = sample_next(logits[rows], 0.8, generator=torch.Generator().manual_seed(3), rows=rows, batch=6,
                           **filters)  # fmt: skip
        assert part.tolist() == drawn[rows].tolist()


def _after_uniforms(seed: int, n: int) -> torch.Generator:
    generator = torch.Generator().manual_seed(seed)
    torch.rand(n, generator=generator, dtype=torch.float64)
    return generator


def _reference_filter(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
                      ) -> torch.Tensor:  # fmt: skip
    """HF's filters by a full stable sort in float64 (the logits, -inf where dropped): top-k keeps the k-th's ties;
    top-p keeps a token while the more likely ones hold < top_p, and every token tied with the last one kept."""
    logits = logits.double() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
    if top_p is not None and top_p < 1.0:
        values = logits.sort(dim=-1, descending=True, stable=True).values
        probs = values.softmax(-1)
        kept = (probs.cumsum(-1) - probs < top_p).sum(-1, keepdim=True)
        logits = logits.masked_fill(logits < values.gather(1, kept - 1), float("-inf"))
    return logits


def _old_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Today's (before the sort-free sampler) top-p: a float32 sort, drop once the more likely hold top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


@pytest.mark.parametrize("vocab", [50, 1000, 49152])
def test_sort_free_filters_keep_the_sorts_tokens(vocab: int, monkeypatch) -> None:
    """The histogram threshold search (CPU), the sort (GPU) and the top-k candidates keep exactly the tokens
    of a full float64 sort, on random, peaked and heavily tied logits, also when the boundary bucket has to be
    split again (NUCLEUS_SORTED small); and the same tokens as the old float32 sort where nothing ties."""
    generator = torch.Generator().manual_seed(vocab)
    kinds = {"random": torch.randn(16, vocab, generator=generator) * 2,
             "peaked": torch.randn(16, vocab, generator=generator) * 8,
             "flat": torch.randn(16, vocab, generator=generator) * 0.3,
             "ties": torch.randint(0, 5, (16, vocab), generator=generator).float()}  # fmt: skip
    kinds["ties"][:, 3] = 10.0  # one token far above the ties: the first token always stays
    for kind, logits in kinds.items():
        for top_k, top_p in ((None, 0.9), (20, 0.5), (None, 0.3), (300, 0.95), (None, 0.999), (7, None)):
            want = _reference_filter(logits, 0.8, top_k, top_p) > float("-inf")
            scaled = logits / 0.8
            if top_k is not None and top_k < vocab:
                scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[:, -1:], float("-inf"))
            if top_p is not None:
                mass = scaled.softmax(-1)
                for nucleus in (sampling_module._nucleus_by_histogram, sampling_module._nucleus_by_sort):
                    for sorted_at_most in (1024, 3):
                        monkeypatch.setattr(sampling_module, "NUCLEUS_SORTED", sorted_at_most)
                        got = scaled >= nucleus(scaled, mass, top_p)
                        assert torch.equal(got, want), (kind, top_k, top_p, nucleus.__name__, sorted_at_most)
                # The old float32 sort agrees where its cumsum's rounding cannot move the boundary: not at
                # top_p 0.999, whose boundary lies among masses of ~1e-6 that float32 sums differently with
                # the CPU's vector width and thread count (it failed at 1 thread on an AVX-512 machine).
                if kind != "ties" and top_k is None and vocab <= 1000 and top_p < 0.99:
                    assert torch.equal(_old_filter(scaled, top_p) > float("-inf"), want), (kind, top_p)
            monkeypatch.setattr(sampling_module, "NUCLEUS_SORTED", 1024)
            for seed in range(3):  # every draw is a kept token; the candidates draw what the whole vocabulary does
                drawn = sample_next(logits, 0.8, top_k, top_p, torch.Generator().manual_seed(seed))
                assert want.gather(1, drawn[:, None]).all(), (kind, top_k, top_p)
                if top_k is not None:
                    monkeypatch.setattr(sampling_module, "SAMPLE_CANDIDATES", 0)
                    full = sample_next(logits, 0.8, top_k, top_p, torch.Generator().manual_seed(seed))
                    monkeypatch.setattr(sampling_module, "SAMPLE_CANDIDATES", 1024)
                    assert torch.equal(full, drawn), (kind, top_k, top_p)


def test_draws_follow_the_filtered_probabilities() -> None:
    """Chi-square of 40,000 draws (fixed seed) against the filtered softmax, for each path: below the 0.999
    quantile of chi-square with (kept tokens - 1) degrees of freedom."""
    logits = torch.tensor([3.0, 2.5, 2.5, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5, 0.2] * 2)  # ties, 24 tokens

    def quantile_999(df: int) -> float:  # Wilson-Hilferty (within 1% here: 27.9 for 9, 49.7 for 23)
        return df * (1 - 2 / (9 * df) + 3.0902 * (2 / (9 * df)) ** 0.5) ** 3

    n = 40_000
    for top_k, top_p in ((None, None), (None, 0.9), (10, None), (10, 0.8), (None, 0.999)):
        probs = _reference_filter(logits[None], 0.7, top_k, top_p).softmax(-1)[0]
        drawn = sample_next(logits.repeat(n, 1), 0.7, top_k, top_p, torch.Generator().manual_seed(11))
        counts = torch.bincount(drawn, minlength=len(logits)).double()
        kept = probs > 0
        assert counts[~kept].sum() == 0
        expected = n * probs[kept]
        chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
        assert chi2 < quantile_999(int(kept.sum()) - 1), (top_k, top_p, chi2)


def test_finished_rows_stop_costing_compute(imported, monkeypatch) -> None:
    """Per-prompt budgets and stop tokens end rows early: they are dropped from the batch (fewer row-steps), and
    every row gets the tokens it gets alone (greedy) or without the dropping (sampled with a seed)."""
    _, model = imported("mistral_sliding_window")
    prompts, budgets = PROMPTS * 3, [1, 2, 3, 4, 6, 8, 12, 16, 16]
    for decode in ("eager", "static"):
        report = DecodeReport()
        got = generate(model, prompts, budgets, decode=decode, report=report)
        assert got == [generate(model, [p], n)[0] for p, n in zip(prompts, budgets, strict=True)], decode
        assert report.compactions >= 2 and report.row_steps < len(prompts) * (max(budgets) - 1) / 2
        assert report.steps == max(budgets) - 1
        assert report.prefill_tokens == len(PROMPTS) * max(len(p) for p in PROMPTS)  # each prompt prefilled once
    options = dict(temperature=1.0, seed=3, eos_token_id=[5, 11, 20])
    dropped = generate(model, prompts, budgets, **options)
    monkeypatch.setattr(generate_module, "COMPACT_AT", 2.0)  # never compact
    report = DecodeReport()
    assert generate(model, prompts, budgets, report=report, **options) == dropped
    assert report.compactions == 0
    assert generate(model, PROMPTS, [0, 2, 1]) == [[], got[1][:2], got[2][:1]]
    with pytest.raises(ValueError, match="2 budgets for 9 prompts"):
        generate(model, prompts, [4, 4])


def test_the_caller_can_end_rows_while_streaming(imported) -> None:
    """``stop_rows``: a row the caller ends (a stop string in its text) yields -1 from the next step and is
    dropped like a finished row; the other rows keep their tokens."""
    _, model = imported("llama")
    prompts = PROMPTS * 3
    options = dict(temperature=1.0, seed=4)
    whole = generate(model, prompts, NEW, **options)
    stopped, report = torch.zeros(len(prompts), dtype=torch.bool), DecodeReport()
    steps = []
    for step, token in enumerate(generate_module.stream(model, prompts, NEW, report=report, stop_rows=stopped,
                                                        **options)):  # fmt: skip
        steps.append(token.tolist())
        if step == 1:
            stopped[[0, 4, 8]] = True
    got = [[t for t in row if t >= 0] for row in zip(*steps, strict=True)]
    assert [got[i] for i in (0, 4, 8)] == [whole[i][:2] for i in (0, 4, 8)]
    assert [g for i, g in enumerate(got) if i not in (0, 4, 8)] == [w for i, w in enumerate(whole) if i not in (0, 4, 8)]
    assert report.compactions == 1 and report.row_steps == 9 + 6 * (NEW - 2)
    with pytest.raises(ValueError, match="stop_rows must be a bool tensor \\[9\\]"):
        generate_module.stream(model, prompts, NEW, stop_rows=torch.zeros(3, dtype=torch.bool))


def test_kv_cache_memory_is_as_computed(imported) -> None:
    """layers x 2 x batch x kv heads x head dim x capacity x bytes = the bytes the cache's buffers hold."""
    for case in ("gemma_mqa", "llama", "gpt2"):
        _, model = imported(case)
        report = DecodeReport()
        generate(model, PROMPTS, NEW, report=report)
        capacity = max(len(p) for p in PROMPTS) + NEW
        assert report.kv_cache_bytes == kv_cache_bytes(model.config, len(PROMPTS), capacity, torch.float32) > 0


def test_compiled_decode_is_reused_until_the_weights_change(imported, monkeypatch) -> None:
    """The compilation is paid once and reported; auto reuses it; a weight update makes it compile anew (frozen
    weights would be stale) and auto stays eager for a model in training."""
    _, model = imported("llama")
    before = generate(model, PROMPTS, NEW, decode="eager")
    first, again, after = DecodeReport(), DecodeReport(), DecodeReport()
    assert generate(model, PROMPTS, NEW, decode="compile", report=first) == before
    assert first.path == "compile" and first.compile_seconds > 0
    assert generate(model, PROMPTS, NEW, report=again) == before
    assert again.path == "compile" and again.compile_seconds == 0
    sampled = dict(temperature=1.0, top_p=0.9, seed=5)  # the same draw on the compiled step (no new compilation)
    assert generate(model, PROMPTS, NEW, decode="compile", **sampled) == generate(model, PROMPTS, NEW, decode="eager",
                                                                                   **sampled)  # fmt: skip
    weight = max(model.parameters(), key=lambda p: p.numel())
    with torch.no_grad():
        weight.mul_(-1.0)  # an optimizer step, as the version counters see it
    updated = generate(model, PROMPTS, NEW, decode="eager")
    assert updated != before
    assert generate(model, PROMPTS, NEW, decode="compile", report=after) == updated
    assert after.compile_seconds > 0
    with torch.no_grad():
        weight.mul_(-1.0)
    monkeypatch.setattr(generate_module, "COMPILE_MIN_STEPS", NEW)  # long enough to compile, but in training
    report = DecodeReport()
    assert generate(model, PROMPTS, NEW, report=report) == before
    assert report.path == "eager"


def test_auto_compiles_by_the_work_of_the_whole_call(imported, monkeypatch) -> None:
    """On a CPU ``auto`` counts the steps of the whole call (its batches' longest budgets, so many prompts
    decoded a few rows at a time add up), for batches of up to COMPILE_MAX_ROWS rows; a model in training, a
    wide batch or a short call stays eager (a compiled step at hand is reused: the test above)."""
    _, model = imported("llama")
    steps_module.release(model)
    monkeypatch.setattr(generate_module, "COMPILE_MIN_STEPS", 40)
    monkeypatch.setattr(generate_module, "COMPILE_MAX_ROWS", 4)
    mode = functools.partial(generate_module.decode_mode, "auto", model, 12)
    assert mode([16] * 3) == "eager"  # 16 steps
    assert mode([16] * 9, 3) == "compile"  # 3 batches of 3 rows: 48 steps
    assert mode([16, 2, 2] * 3, 3) == "compile"  # each batch's longest counts
    assert mode([16, 2, 2] * 2, 3) == "eager"  # 32 steps
    assert mode([50] * 6, 6) == "eager"  # 6 rows a step: matmul-bound, compiling saves little
    assert mode([50] * 6, 2) == "compile"
    monkeypatch.setattr(steps_module, "weights_changed", lambda model: True)
    assert mode([16] * 9, 3) == "eager"  # in training: the weights would go stale


def test_top_k_and_top_p_filter_the_distribution() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.23, 0.09, ...: the two most likely hold 0.87 < 0.9
    assert set(sample_next(logits, 1.0, top_p=0.9, generator=gen).tolist()) == {0, 1, 2}
    assert probs[:2].sum() < 0.9 < probs[:3].sum()
    drawn = sample_next(logits, 1.0, generator=gen)
    assert abs((drawn == 0).float().mean().item() - probs[0].item()) < 0.05


@pytest.mark.device
@pytest.mark.parametrize("decode", ["static", "graph"])
def test_every_decode_step_samples_the_same_tokens(decode: str, imported) -> None:
    if decode == "graph" and not DEVICE.startswith("cuda"):
        pytest.skip("CUDA graphs need a CUDA device")
    for case in ("llama", "mistral_sliding_window", "gpt2"):
        _, model = imported(case, DEVICE)
        for filters in (dict(top_k=20), dict(top_p=0.9), dict(top_k=40, top_p=0.8)):
            options = dict(temperature=1.0, seed=5, eos_token_id=[3, 7], **filters)
            assert generate(model, PROMPTS, NEW, decode=decode, **options) == generate(
                model, PROMPTS, NEW, decode="eager", **options), (case, filters)


def test_graph_buckets_compaction_and_reuse_give_the_same_tokens(imported, monkeypatch) -> None:
    """The CUDA-graph path's bookkeeping, run on a CPU without the capture: steps over power-of-two buckets of
    rows (the rows past the batch are stale copies), compaction to the front when the rows left fit a smaller
    bucket, an arena reused by the next call (also for a smaller batch): the same tokens as eager decoding."""
    _, model = imported("mistral_sliding_window")
    prompts, budgets = PROMPTS * 3, [1, 2, 3, 4, 6, 8, 12, 16, 16]
    options = dict(temperature=1.0, top_k=20, seed=5, eos_token_id=[3, 7])
    expected = [generate(model, prompts, budgets, decode="eager", **o) for o in ({}, options)]
    small = generate(model, PROMPTS, RAGGED, decode="eager", **options)
    monkeypatch.setattr(generate_module, "decode_mode", lambda *args: "graph")
    for want, o in zip(expected, ({}, options), strict=True):
        report = DecodeReport()
        assert generate(model, prompts, budgets, report=report, **o) == want
        arena = steps_module.ARENAS[model]
        assert arena.padded and not arena.capture and arena.rows == len(prompts)
        assert report.compactions >= 2 and report.kv_cache_shape == (9, 64)
    assert [arena.bucket(k) for k in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    assert generate(model, PROMPTS, RAGGED, **options) == small
    assert steps_module.ARENAS[model] is arena  # 3 rows of its 9
    monkeypatch.setattr(steps_module.DecodeArena, "bucket", lambda self, k: k)  # no stale rows: compacts as often
    assert generate(model, prompts, budgets, **options) == expected[1]


def test_waiting_prompts_join_as_rows_finish(imported) -> None:
    """More prompts than ``max_batch``: each prompt generates what it generates alone (windows shorter than the
    prompts, stop tokens, ragged budgets). Eagerly a waiting prompt takes a finished row's place as it goes, so
    the long answer of the first prompt overlaps all the others; the static path runs consecutive batches."""
    _, model = imported("mistral_sliding_window")
    prompts = [*PROMPTS, *(p[::-1] for p in PROMPTS)]
    budgets = [14, 3, 4, 3, 4, 3]
    eos = [3, 7]
    alone = [generate(model, [p], n, eos_token_id=eos, decode="eager")[0] for p, n in zip(prompts, budgets)]
    joined, batches = DecodeReport(), DecodeReport()
    assert generate(model, prompts, budgets, eos_token_id=eos, decode="eager", max_batch=2, report=joined) == alone
    assert generate(model, prompts, budgets, eos_token_id=eos, decode="static", max_batch=2, report=batches) == alone
    assert joined.row_steps == sum(len(a) - 1 for a in alone)  # no row decodes past its end
    assert batches.steps == sum(max(len(a) for a in alone[i : i + 2]) - 1 for i in range(0, 6, 2))
    assert joined.steps <= max(len(alone[0]), sum(len(a) for a in alone[1:])) < batches.steps  # the batch stays full
    options = dict(temperature=1.0, seed=3, eos_token_id=eos, max_batch=4)
    assert generate(model, prompts, budgets, **options) == generate(model, prompts, budgets, **options)
    with pytest.raises(ValueError, match="max_batch"):
        generate(model, prompts, budgets, max_batch=0)


def test_two_streams_on_one_model_use_two_arenas(imported) -> None:
    """A stream still decoding keeps its arena; another stream on the same model gets a new one."""
    _, model = imported("llama")
    alone = [generate(model, [p], NEW, decode="static")[0] for p in PROMPTS[:2]]
    first = generate_module.stream(model, [PROMPTS[0]], NEW, decode="static")
    second = generate_module.stream(model, [PROMPTS[1]], NEW, decode="static")
    got: list[list[int]] = [[], []]
    for a, b in zip(first, second, strict=True):
        got[0].append(int(a[0]))
        got[1].append(int(b[0]))
    assert got == alone
    steps_module.release(model)
    assert model not in steps_module.ARENAS


@pytest.mark.device
def test_cuda_graphs_are_captured_once_and_compact(imported) -> None:
    """On CUDA: ragged budgets with sampling through the graphs (a capture per bucket, recaptured for nothing
    on the next call) give the eager path's tokens."""
    if not DEVICE.startswith("cuda"):
        pytest.skip("CUDA graphs need a CUDA device")
    _, model = imported("llama", DEVICE)
    prompts, budgets = PROMPTS * 6, [1, 2, 3, 4, 6, 8, 12, 16, 16, 20, 24, 30, 2, 5, 9, 14, 18, 30]
    options = dict(temperature=1.0, top_k=20, seed=5)
    want = generate(model, prompts, budgets, decode="eager", **options)
    first, again = DecodeReport(), DecodeReport()
    assert generate(model, prompts, budgets, decode="graph", report=first, **options) == want
    assert first.compile_seconds > 0 and first.compactions >= 2
    assert generate(model, prompts, budgets, decode="graph", report=again, **options) == want
    assert again.compile_seconds == 0 and again.compactions == first.compactions


def test_bad_arguments_are_errors(imported) -> None:
    _, model = imported("llama")
    for kwargs, message in [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=60), "max_position_embeddings"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate(model, PROMPTS, **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="decode must be one of auto, eager, static, graph, compile"):
        generate(model, PROMPTS, 4, decode="fast")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        generate(model, PROMPTS, 4, decode="graph")


def test_tp2_generates_the_same_tokens_as_one_process(hf_root) -> None:
    folders = {case: _saved(case, hf_root)[1] for case in TP_CASES}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__, str(hf_root),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads((hf_root / "tp2.json").read_text())
    for case, folder in folders.items():
        model = load_model(folder)
        assert results[case]["greedy"] == generate(model, PROMPTS, NEW), case
        assert results[case]["ragged"] == generate(model, PROMPTS, RAGGED), case  # rows dropped on every rank alike
        assert results[case]["ranks_agree"], case
        assert results[case]["cache_bytes_as_computed"], case


def _tp_worker(root: Path) -> None:
    """TP=2 generation of every TP case; rank 0 writes ``root/tp2.json``."""
    import torch.distributed as dist

    from ironcore.parallel.setup import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    results = {}
    for case in TP_CASES:
        init_parallel(2, model_config_from_hf(root / case), device="cpu")
        model = load_model(root / case)
        report = DecodeReport()
        greedy = generate(model, PROMPTS, NEW, report=report)
        ragged = generate(model, PROMPTS, RAGGED)
        sampled = generate(model, PROMPTS, RAGGED, temperature=1.0, top_p=0.95)  # no seed: the ranks must agree
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (greedy, ragged, sampled))
        capacity = max(len(p) for p in PROMPTS) + NEW
        results[case] = {
            "greedy": greedy, "ragged": ragged, "ranks_agree": all(e == everyone[0] for e in everyone),
            "cache_bytes_as_computed": report.kv_cache_bytes == kv_cache_bytes(model.config, 3, capacity, torch.float32),
        }  # fmt: skip
    if dist.get_rank() == 0:
        (root / "tp2.json").write_text(json.dumps(results))
    destroy_parallel()


# ---- the command line ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder_with_tokenizer(tmp_path_factory) -> Path:
    """A small Llama-style model exported to an HF folder, with a BPE tokenizer trained for it."""
    from ironcore.config.model import ModelConfig
    from ironcore.data.preprocessing.tokenizer import Tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "hello world, hello there"] * 20
    tokenizer = Tokenizer.train_bpe(texts, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="tiny", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4,
        num_key_value_heads=2, ffn_hidden_size=64, max_position_embeddings=128, position_embedding="rope",
        norm_type="rmsnorm", gated_mlp=True, activation="silu",
    )  # fmt: skip
    folder = save_hf_model(TransformerModel(cfg), tmp_path_factory.mktemp("cli") / "hf")
    tokenizer.save(folder)
    return folder


def test_cli_streams_one_prompt(hf_folder_with_tokenizer, capsys) -> None:
    assert main(["generate", "--from-hf", str(hf_folder_with_tokenizer), "--prompt", "hello",
                 "--max-new-tokens", "8", "--ignore-eos"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out.startswith("hello") and len(captured.out) > len("hello\n")
    assert "8 tokens" in captured.err


def test_cli_checkpoint_folder_gives_the_same_text(hf_folder_with_tokenizer, tmp_path, capsys) -> None:
    from ironcore.checkpoints.native import save_model
    from ironcore.data.preprocessing.tokenizer import Tokenizer

    ckpt = save_model(load_model(hf_folder_with_tokenizer), tmp_path / "ckpt")
    Tokenizer.from_path(hf_folder_with_tokenizer).save(ckpt)
    outputs = []
    for source in (["--checkpoint", str(ckpt)], ["--from-hf", str(hf_folder_with_tokenizer)]):
        assert main(["generate", *source, "--prompt", "the lazy", "--max-new-tokens", "5", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and len(outputs[0]["token_ids"]) >= 1


def test_cli_batch_json_matches_the_python_api(hf_folder_with_tokenizer, tmp_path, capsys) -> None:
    from ironcore.data.preprocessing.tokenizer import Tokenizer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"hello world"\n{"prompt": "the quick"}\n\n"fox"\n')
    args = ["generate", "--from-hf", str(hf_folder_with_tokenizer), "--prompts-file", str(prompts),
            "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3", "--json", "--batch-size", "2"]  # fmt: skip
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == ["hello world", "the quick", "fox"]
    tokenizer = Tokenizer.from_path(hf_folder_with_tokenizer)
    model = load_model(hf_folder_with_tokenizer)
    expected = generate(model, [tokenizer.encode(p) for p in ("hello world", "the quick")], 6, temperature=0.8,
                        eos_token_id=tokenizer.eod_id, seed=3)  # fmt: skip
    assert [r["token_ids"] for r in records[:2]] == expected
    assert all(r["finish_reason"] in ("stop", "length") for r in records)


def test_cli_without_a_tokenizer_is_one_line(hf_folder_with_tokenizer, tmp_path, capsys) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_folder_with_tokenizer / name).read_bytes())
    assert main(["generate", "--from-hf", str(bare), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no tokenizer.json" in err and "--tokenizer" in err and "\n" not in err
    assert main(["generate", "--from-hf", str(bare), "--tokenizer", str(hf_folder_with_tokenizer),
                 "--prompt", "hi", "--max-new-tokens", "2", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["prompt"] == "hi"
    assert main(["generate", "--from-hf", str(bare), "--prompt", "hi", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_cli_prompt_limits(hf_folder_with_tokenizer, capsys) -> None:
    folder = str(hf_folder_with_tokenizer)
    assert main(["generate", "--from-hf", folder, "--prompt", "hello", "--max-new-tokens", "200"]) == 2
    assert "exceed the model's 128 positions" in capsys.readouterr().err
    assert main(["generate", "--from-hf", folder, "--prompt", "", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == ""  # an empty prompt starts a new document
    assert main(["generate", "--from-hf", folder, "--prompt", "hi", "--decode", "graph"]) == 2
    assert "--decode: decode='graph' needs a CUDA device" in capsys.readouterr().err


if __name__ == "__main__":
    _tp_worker(Path(sys.argv[1]))
