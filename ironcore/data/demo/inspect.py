"""Statistics and a human report for a preprocessed data set (``--inspect`` / ``--only-inspect``).

Reads only the output folder (shards, ``metadata.json``, the tokenizer copy
beside them), so it works on any finished build. Writes ``inspect/`` there:

* ``report.json`` — counts, token-length percentiles, truncated/dropped
  records, share of trained tokens (SFT/DPO), vocabulary coverage;
* ``lengths.png`` — histogram of example lengths per split;
* ``report.html`` — decoded samples with the trained tokens highlighted, the
  view needed to trust an SFT mask; a DPO pair shows its prompt once, then
  the chosen and the rejected response, each with what is trained of it.

Everything streams over the memory-mapped shards in chunks, so inspecting a
large corpus needs little memory.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from ironcore.data.preprocessing.indexed import IndexedDataset
from ironcore.data.preprocessing.metadata import load_metadata, shard_prefix
from ironcore.data.preprocessing.tokenizer import Tokenizer

PERCENTILES = (0, 10, 50, 90, 99, 100)
SAMPLE_TOKENS = 400  # tokens shown per sample in the HTML report
# The look of a report page and of its decoded samples (shared with the mixture report, demo/mixture.py).
STYLE = """<style>
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; }
.sample { white-space: pre-wrap; font-family: monospace; border: 1px solid #ccc; padding: .6em; }
.trained { background: #c8f7c5; } .prompt { color: #666; } .eod { background: #ffd27f; }
.cut { color: #a00; } .label { font-weight: bold; color: #333; } pre { margin: 0; }
th { text-align: left; vertical-align: top; padding-right: 1em; }
</style>"""
LEGEND = """<p><span class="trained">green: trained tokens</span>, <span class="prompt">grey: not trained</span>,
<span class="eod">orange: end of document</span>.</p>"""


def inspect_dataset(output_dir: str | Path, num_samples: int = 6, seed: int = 0) -> dict[str, Any]:
    """Compute the report of ``output_dir`` and write ``output_dir/inspect/``; return the report."""
    output_dir = Path(output_dir)
    metadata = load_metadata(output_dir)
    tokenizer = data_set_tokenizer(output_dir, metadata)
    vocab_size = metadata["tokenizer"]["vocab_size"]
    limit = metadata["max_seq_length"] + 1
    report: dict[str, Any] = {
        "name": metadata["name"],
        "task_type": metadata["task_type"],
        "tokenizer": metadata["tokenizer"],
        "counts": metadata["counts"],
        "splits": {},
    }
    lengths_by_split = {}
    for split, info in metadata["splits"].items():
        streams = {name: IndexedDataset(output_dir / prefix) for name, prefix in info["shards"].items()}
        token_streams = [name for name in streams if not name.endswith("loss_mask")]
        entry: dict[str, Any] = {"documents": len(streams[token_streams[0]])}
        seen = np.zeros(vocab_size, dtype=bool)
        tokens = trained = 0
        for name in token_streams:
            data = streams[name]
            lengths = data.sequence_lengths
            lengths_by_split[f"{split} {name}" if len(token_streams) > 1 else split] = lengths
            entry[f"{name}_length"] = _length_stats(lengths)
            entry[f"{name}_at_length_limit"] = int((lengths >= limit).sum())
            for chunk in data.iter_chunks():
                seen |= np.bincount(chunk, minlength=vocab_size)[:vocab_size] > 0
            tokens += data.num_tokens
            mask_name = f"{name}_loss_mask" if name != "tokens" else "loss_mask"
            if mask_name in streams:
                trained += sum(int(chunk.sum(dtype=np.int64)) for chunk in streams[mask_name].iter_chunks())
        entry["tokens"] = tokens
        if any(name.endswith("loss_mask") for name in streams):
            entry["trained_tokens"] = trained
            entry["trained_share"] = round(trained / max(tokens, 1), 4)
        entry["vocab_coverage"] = round(float(seen.mean()), 4)
        report["splits"][split] = entry
    folder = output_dir / "inspect"
    folder.mkdir(exist_ok=True)
    _plot_lengths(lengths_by_split, limit, folder / "lengths.png")
    samples = _samples(output_dir, metadata, tokenizer, num_samples, seed)
    (folder / "report.html").write_text(_html(report, samples), encoding="utf-8")
    report["files"] = {name: str(folder / name) for name in ("report.json", "report.html", "lengths.png")}
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few human lines for the terminal."""
    lines = [f"{report['name']} ({report['task_type']}), counts: {report['counts']}"]
    for split, entry in report["splits"].items():
        length_keys = [key for key in entry if key.endswith("_length")]
        parts = [f"{entry['documents']:,} examples", f"{entry['tokens']:,} tokens"]
        for key in length_keys:
            stats = entry[key]
            parts.append(f"{key} p50/p90/max {stats['p50']}/{stats['p90']}/{stats['p100']}")
        if "trained_share" in entry:
            parts.append(f"trained {entry['trained_share']:.1%}")
        parts.append(f"vocab coverage {entry['vocab_coverage']:.1%}")
        lines.append(f"  {split}: " + ", ".join(parts))
    lines.append(f"  report: {report['files']['report.html']}")
    return lines


def _length_stats(lengths: np.ndarray) -> dict[str, float]:
    if not len(lengths):
        return {}
    values = np.percentile(lengths, PERCENTILES)
    stats = {f"p{p}": int(v) for p, v in zip(PERCENTILES, values, strict=True)}
    stats["mean"] = round(float(lengths.mean()), 2)
    return stats


def _plot_lengths(lengths_by_split: dict[str, np.ndarray], limit: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, lengths in lengths_by_split.items():
        if len(lengths):
            ax.hist(lengths, bins=60, alpha=0.6, label=f"{label} ({len(lengths):,})")
    ax.axvline(limit, color="black", linestyle="--", linewidth=1, label=f"max_seq_length + 1 = {limit}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _samples(
    output_dir: Path, metadata: dict[str, Any], tokenizer: Tokenizer, count: int, seed: int
) -> list[dict[str, Any]]:
    """Decoded examples of the train split, picked by seed: each a list of labelled parts of (tag, text)
    segments (one unlabelled part; a DPO pair: its prompt, chosen and rejected)."""
    shards = metadata["splits"]["train"]["shards"]
    token_streams = [name for name in shards if not name.endswith("loss_mask")]
    streams = {name: IndexedDataset(shard_prefix(output_dir, "train", name)) for name in shards}
    rng = np.random.default_rng(seed)
    total = len(streams[token_streams[0]])
    picks = np.sort(rng.choice(total, size=min(count, total), replace=False))
    side = metadata["splits"]["train"].get("fields")  # rl prompts: the fields their rewards receive
    records = (output_dir / side).read_text(encoding="utf-8").splitlines() if side else None
    samples = []
    for index in picks:
        examples = {}
        for name in token_streams:
            mask_name = "loss_mask" if name == "tokens" else f"{name}_loss_mask"
            mask = streams[mask_name].get(int(index)) if mask_name in streams else None
            examples[name] = (streams[name].get(int(index)), mask)
        if token_streams == ["chosen", "rejected"]:
            title = f"train #{index} pair (chosen {len(examples['chosen'][0])}, rejected " \
                f"{len(examples['rejected'][0])} tokens)"
            parts = _pair_parts(tokenizer, examples)
        else:
            tokens, mask = examples[token_streams[0]]
            title = f"train #{index} ({len(tokens)} tokens)"
            parts = [("", segments(tokenizer, tokens[:SAMPLE_TOKENS], None if mask is None else mask[:SAMPLE_TOKENS]),
                      len(tokens) > SAMPLE_TOKENS)]
        samples.append({"title": title, "parts": parts, "fields": json.loads(records[index]) if records else None})
    return samples


def _pair_parts(
    tokenizer: Tokenizer, examples: dict[str, tuple[np.ndarray, np.ndarray | None]]
) -> list[tuple[str, list[tuple[str, str]], bool]]:
    """A DPO pair as ``(label, segments, cut)`` parts: the prompt (the chosen side's tokens before its first
    trained one) once, then each response from where its own side stops sharing the prompt's tokens."""
    chosen, chosen_mask = examples["chosen"]
    prompt_length = int(np.argmax(chosen_mask > 0)) if chosen_mask.any() else len(chosen)
    prompt = chosen[:prompt_length]
    parts = [("prompt", segments(tokenizer, prompt[:SAMPLE_TOKENS], np.zeros(min(len(prompt), SAMPLE_TOKENS))),
              len(prompt) > SAMPLE_TOKENS)]
    for name in ("chosen", "rejected"):
        tokens, mask = examples[name]
        shared = 0
        while shared < min(len(tokens), len(prompt)) and tokens[shared] == prompt[shared] and not mask[shared]:
            shared += 1
        rest, rest_mask = tokens[shared:], mask[shared:]
        parts.append((name, segments(tokenizer, rest[:SAMPLE_TOKENS], rest_mask[:SAMPLE_TOKENS]),
                      len(rest) > SAMPLE_TOKENS))
    return parts


def data_set_tokenizer(output_dir: Path, metadata: dict[str, Any]) -> Tokenizer:
    """The tokenizer copy beside a data set's shards, with the end of document its metadata names."""
    return Tokenizer.from_path(output_dir, metadata["tokenizer"]["eod_token"])


def segments(tokenizer: Tokenizer, tokens: np.ndarray, mask: np.ndarray | None) -> list[tuple[str, str]]:
    """Runs of tokens decoded together, tagged 'trained' / 'prompt' / 'eod' / 'text'."""
    if mask is None:
        tags = ["eod" if t == tokenizer.eod_id else "text" for t in tokens]
    else:
        tags = ["trained" if m else "prompt" for m in mask]
    runs = []
    start = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or tags[i] != tags[start]:
            runs.append((tags[start], tokenizer.decode(tokens[start:i])))
            start = i
    return runs


def sample_html(sample: dict[str, Any]) -> str:
    """One decoded sample (see :func:`_samples`) as a heading and its parts, trained tokens highlighted."""
    body = ""
    for label, parts, cut in sample["parts"]:
        head = f'<span class="label">{html.escape(label)}:</span>\n' if label else ""
        text = "".join(f'<span class="{tag}">{html.escape(text)}</span>' for tag, text in parts)
        more = '<span class="cut"> … (cut for display)</span>' if cut else ""
        body += f"<div class=sample>{head}{text}{more}</div>"
    fields = "" if sample["fields"] is None else \
        f"<pre>fields: {html.escape(json.dumps(sample['fields'], ensure_ascii=False, indent=1))}</pre>"
    return f"<h3>{html.escape(sample['title'])}</h3>{body}{fields}"


def _html(report: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(split)}</th><td><pre>{html.escape(json.dumps(entry, indent=1))}</pre></td></tr>"
        for split, entry in report["splits"].items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(report["name"])}: data inspection</title>
{STYLE}</head><body>
<h1>{html.escape(report["name"])} ({html.escape(report["task_type"])})</h1>
<p>Tokenizer {html.escape(report["tokenizer"]["identity"][:16])}…, vocabulary {report["tokenizer"]["vocab_size"]:,},
EOD id {report["tokenizer"]["eod_id"]}{_eos(report["tokenizer"])}. Counts: {html.escape(json.dumps(report["counts"]))}</p>
<p><img src="lengths.png" alt="token length histogram"></p>
<table>{rows}</table>
<h2>Samples</h2>
{LEGEND}
{"".join(sample_html(sample) for sample in samples)}
</body></html>
"""


def _eos(tokenizer: dict[str, Any]) -> str:
    """The end of sequence of SFT/DPO examples, when the metadata names it (older data sets do not)."""
    if "eos_id" not in tokenizer:
        return ""
    return f", end of example {html.escape(tokenizer['eos_token'])} (id {tokenizer['eos_id']})"
