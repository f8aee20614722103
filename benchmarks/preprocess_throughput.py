"""Throughput of ``ironcore preprocess`` against the tokenizer ceiling and a plain script.

Two corpora, both tokenized with the GPT-2 tokenizer shipped in examples/data/gpt2:

* ``small-docs``: tinyshakespeare paragraphs (one document each), the text
  repeated to ~30M tokens (``--scale 0.1`` for a quick run);
* ``large-docs``: the Python standard library sources, one document per file.

Contenders, each run as a fresh process on the same cores, timed end to end:

* ``ceiling``: raw ``tokenizers`` ``Tokenizer.encode_batch`` over the same
  texts, already in memory, in ~1 MiB batches, Rust threads on all cores;
  only the encode calls are timed (no start-up, no reading, no writing);
* ``plain script``: ``datasets.load_dataset("json")`` + ``.map(num_proc=cores)``
  with the same tokenizer + megatron-core ``IndexedDatasetBuilder`` — what one
  writes by hand; timed whole, start-up included;
* ``ironcore``: ``python -m ironcore preprocess --config …`` (``num_workers``
  = cores, and ``num_workers: 0``: in-process Rust threads), start-up included.

Throughput is tokenizer tokens (EOD excluded) per second of wall time. Peak RSS
is the largest process's. The last table repeats ironcore on the small-docs
corpus at a tenth of the size: memory should not grow with the corpus.

Usage: ``python benchmarks/preprocess_throughput.py [--scale 1.0] [--repeat 1]``
(results are printed, never asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples" / "data" / "gpt2" / "tokenizer.json"
SHAKESPEARE = ROOT / "examples" / "data" / "tinyshakespeare.txt"
SHAKESPEARE_TOKENS = 338_000  # GPT-2 tokens in one copy (approximately)
TARGET_TOKENS = 30_000_000
PARAGRAPH = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
BATCH_BYTES = 1 << 20


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---- corpora ---------------------------------------------------------------------------------------------


def make_small_docs(folder: Path, scale: float) -> list[Path]:
    """tinyshakespeare repeated to ~30M tokens * scale: a .txt (paragraphs) and the same documents as .jsonl."""
    text = SHAKESPEARE.read_text(encoding="utf-8").rstrip("\n") + "\n\n"
    copies = max(1, round(TARGET_TOKENS * scale / SHAKESPEARE_TOKENS))
    (folder / "small").mkdir(parents=True, exist_ok=True)
    txt = folder / "small" / "corpus.txt"
    txt.write_text(text * copies, encoding="utf-8")
    docs = [p for p in PARAGRAPH.split(text) if p]
    with open(folder / "small.jsonl", "w", encoding="utf-8") as f:
        for _ in range(copies):
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    return [txt, folder / "small.jsonl"]


def make_large_docs(folder: Path, scale: float) -> list[Path]:
    """The standard library's UTF-8 .py files, copied (flat), and the same texts as .jsonl."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    files = files[: max(1, int(len(files) * scale))]
    target = folder / "large"
    target.mkdir(parents=True, exist_ok=True)
    with open(folder / "large.jsonl", "w", encoding="utf-8") as f:
        for i, path in enumerate(files):
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not text.strip():
                continue
            (target / f"{i:05d}_{path.name}").write_text(text, encoding="utf-8")
            f.write(json.dumps({"text": text}) + "\n")
    return [target, folder / "large.jsonl"]


def read_documents(jsonl: Path) -> list[str]:
    with open(jsonl, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# ---- the contenders, each run in its own process ---------------------------------------------------------


def run_ceiling(jsonl: str) -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    docs = read_documents(Path(jsonl))
    batches, batch, size = [], [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_BYTES:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    start = time.perf_counter()
    tokens = 0
    for batch in batches:
        tokens += sum(len(e) for e in tokenizer.encode_batch(batch, add_special_tokens=False))
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def run_plain(jsonl: str, output: str) -> dict:
    """The hand-written baseline: datasets.map(num_proc) + megatron-core IndexedDatasetBuilder."""
    import warnings

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # map forks; one level of parallelism
    warnings.simplefilter("ignore")
    import datasets
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    eod = tokenizer.token_to_id("<|endoftext|>")

    def tokenize(batch):
        return {"ids": [e.ids for e in tokenizer.encode_batch(batch["text"], add_special_tokens=False)]}

    cache = Path(f"{output}_cache")
    shutil.rmtree(cache, ignore_errors=True)  # a warm cache would skip the map (and the work) entirely
    dataset = datasets.load_dataset("json", data_files=jsonl, split="train", cache_dir=str(cache))
    dataset = dataset.map(tokenize, batched=True, num_proc=cores(), remove_columns=["text"])
    builder = IndexedDatasetBuilder(f"{output}.bin", dtype=__import__("numpy").uint16)
    tokens = 0
    for batch in dataset.iter(batch_size=1000):
        for ids in batch["ids"]:
            builder.add_item(torch.tensor(ids + [eod]))
            builder.end_document()
            tokens += len(ids)
    builder.finalize(f"{output}.idx")
    return {"tokens": tokens}


def measure(command: list[str]) -> dict:
    """Run via a small wrapper that waits for the child itself, so its rusage is the child's alone."""
    wrapper = (
        "import json, os, subprocess, sys, time\n"
        "start = time.perf_counter()\n"
        "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
        "out, err = p.communicate()\n"
        "wall = time.perf_counter() - start\n"
        "import resource\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "sys.stderr.write(err.decode()[-3000:])\n"
        "lines = out.decode().strip().splitlines()\n"
        "result = json.loads(lines[-1]) if lines and lines[-1].startswith('{') else {}\n"
        "result.update(wall=wall, rss_mib=rss, rc=p.returncode)\n"
        "print(json.dumps(result))\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, cwd=ROOT)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"]:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return result


def ironcore_command(source: Path, split: str, output: Path, workers: int) -> list[str]:
    config = output.with_suffix(".yaml")
    config.write_text(
        json.dumps(
            {
                "name": output.name,
                "source": {"path": str(source), "document_split": split},
                "tokenizer": {"path": str(TOKENIZER)},
                "output_dir": str(output),
                "num_workers": workers,
            }
        )
    )
    return [
        sys.executable,
        "-m",
        "ironcore",
        "preprocess",
        "--config",
        str(config),
        "--force",
        "--no-progress",
    ]


def ironcore_tokens(output: Path) -> int:
    metadata = json.loads((output / "metadata.json").read_text())
    return metadata["splits"]["train"]["tokens"] - metadata["splits"]["train"]["documents"]  # minus EODs


# ---- the benchmark ---------------------------------------------------------------------------------------


def benchmark(scale: float, repeat: int, folder: Path) -> None:
    n = cores()
    print(f"{n} cores, GPT-2 tokenizer, scale {scale}, best of {repeat}", flush=True)
    corpora = {
        "small-docs": (*make_small_docs(folder, scale), "paragraph"),
        "large-docs": (*make_large_docs(folder, scale), "file"),
    }
    rows = []
    script = str(Path(__file__).resolve())
    for name, (source, jsonl, split) in corpora.items():
        best: dict[str, dict] = {}
        for _ in range(repeat):
            outputs = {
                f"ironcore (num_workers={n})": folder / f"ic_{name}",
                "ironcore (num_workers=0)": folder / f"ic0_{name}",
            }
            runs = {
                "ceiling (encode_batch)": [sys.executable, script, "--run", "ceiling", str(jsonl)],
                f"plain script (map num_proc={n})": [
                    sys.executable,
                    script,
                    "--run",
                    "plain",
                    str(jsonl),
                    str(folder / f"plain_{name}"),
                ],
                **{
                    label: ironcore_command(source, split, out, n if "=0" not in label else 0)
                    for label, out in outputs.items()
                },
            }
            for label, command in runs.items():
                result = measure(command)
                if label in outputs:
                    result["tokens"] = ironcore_tokens(outputs[label])
                seconds = result["seconds"] if label.startswith("ceiling") else result["wall"]
                result["tokens_per_s"] = result["tokens"] / seconds
                if label not in best or result["tokens_per_s"] > best[label]["tokens_per_s"]:
                    best[label] = result
                print(f"  {name:10s} {label:32s} {result['tokens']:>12,} tokens {seconds:7.2f} s", flush=True)
        ceiling = best["ceiling (encode_batch)"]["tokens_per_s"]
        for label, result in best.items():
            rows.append(
                (
                    name,
                    label,
                    result["tokens"],
                    result["tokens_per_s"],
                    result["tokens_per_s"] / ceiling,
                    result.get("rss_mib"),
                )
            )
    print()
    print("| corpus | contender | tokens | tokens/s | x ceiling | peak RSS (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label, tokens, rate, ratio, rss in rows:
        rss_text = "-" if label.startswith("ceiling") else f"{rss:,.0f}"
        print(f"| {name} | {label} | {tokens:,} | {rate / 1e6:.2f} M | {ratio:.2f} | {rss_text} |")

    print()
    print("Memory vs corpus size (ironcore, small-docs):")
    print("| corpus tokens | peak RSS (MiB) |")
    print("|---:|---:|")
    for factor in (0.1, 1.0):
        sub = folder / f"rss_{factor}"
        sub.mkdir(exist_ok=True)
        txt, _ = make_small_docs(sub, scale * factor)
        output = sub / "out"
        result = measure(ironcore_command(txt, "paragraph", output, n))
        print(f"| {ironcore_tokens(output):,} | {result['rss_mib']:,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", type=float, default=1.0, help="corpus size factor (1.0 = ~30M tokens small-docs)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender; the best is kept")
    parser.add_argument("--workdir", help="folder for corpora and outputs (default: a temporary folder)")
    parser.add_argument("--run", nargs="+", help=argparse.SUPPRESS)  # internal: one contender in this process
    args = parser.parse_args()
    if args.run:
        kind, *rest = args.run
        print(json.dumps(run_ceiling(*rest) if kind == "ceiling" else run_plain(*rest)))
        return
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        benchmark(args.scale, args.repeat, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="ironcore_bench_") as folder:
            benchmark(args.scale, args.repeat, Path(folder))


if __name__ == "__main__":
    main()
