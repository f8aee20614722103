"""The report of a data mixture (``data.blend``): what a run actually draws from each of its data sets.

The trainer writes it at the start of a blend run into ``OUTPUT_DIR/mixture/``:

* ``mixture.json`` — per data set its name, data config, normalised weight, the samples of its train split,
  the run's samples drawn from it (their share), how many epochs of it that is, and the tokens it feeds; the
  sources of the first global batches;
* ``mixture.html`` — the same as tables, and a few decoded samples of each data set, as the run reads them.

The counts come from the blend's own mapping over the run's samples (``train_steps x global batch``), not from
the weights: they are what the run trains on, rounding and all (a run of more than ``COUNT_LIMIT`` samples is
counted from the weights instead, each data set within one sample, so that start-up stays quick). The blend is taken by its interface
(:class:`Mixture`, i.e. ``samples.blend.BlendedDataset``): the demo data and the samples do not import each other.
"""

from __future__ import annotations

import html
import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ironcore.data.demo.inspect import LEGEND, SAMPLE_TOKENS, STYLE, data_set_tokenizer, sample_html, segments
from ironcore.data.preprocessing.metadata import load_metadata
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.files import write_text_atomically
from ironcore.tables import table

FOLDER = "mixture"  # under the run's output folder
FIRST_BATCHES = 4  # global batches whose composition is shown
COUNT_LIMIT = 1 << 20  # runs up to this many samples are counted from the mapping (a second or two); longer ones
# from the weights, which the interleaving keeps every data set within one sample of (no minutes at start-up)
SAMPLES_PER_SOURCE = 2  # decoded samples shown per data set


class Mixture(Protocol):
    """What the report reads of a blend: its sources, normalised weights, and where each sample comes from."""

    sources: list[Any]
    weights: list[float]

    def __len__(self) -> int: ...

    def sources_of(self, end: int) -> np.ndarray: ...

    def locate(self, index: int) -> tuple[int, int]: ...


def write_mixture_report(blend: Mixture, names: Sequence[str], config_paths: Sequence[str], tokenizer_dir: Path,
                         global_batch: int, seq_len: int, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir/mixture/`` for ``blend`` (its data sets named ``names``, from ``config_paths``, tokenized
    by the tokenizer beside ``tokenizer_dir``'s shards) and return the report."""
    total = len(blend)
    drawn = blend.sources_of(min(total, COUNT_LIMIT))
    exact = total <= COUNT_LIMIT
    counts = np.bincount(drawn, minlength=len(names)) if exact else np.round(np.array(blend.weights) * total)
    sources = []
    for s, (name, path) in enumerate(zip(names, config_paths, strict=True)):
        available, count = len(blend.sources[s]), int(counts[s])
        sources.append({"name": name, "config_path": str(path), "weight": round(blend.weights[s], 6),
                        "train_samples": available, "samples": count, "share": round(count / max(total, 1), 6),
                        "epochs": round(count / available, 4), "tokens": count * seq_len})  # fmt: skip
    report: dict[str, Any] = {
        "samples": total, "counted": "from the blend's own mapping" if exact else
        "from the weights (the run is longer than the counted limit; each within one sample)",
        "global_batch_size": global_batch, "seq_len": seq_len, "sources": sources,
        "first_batches": [drawn[b * global_batch : (b + 1) * global_batch].tolist()
                          for b in range(min(FIRST_BATCHES, total // global_batch))],
    }  # fmt: skip
    folder = out_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = data_set_tokenizer(tokenizer_dir, load_metadata(tokenizer_dir))
    samples = [_decoded(blend, tokenizer, names, int(i)) for s in range(len(names))
               for i in np.flatnonzero(drawn == s)[:SAMPLES_PER_SOURCE]]  # fmt: skip
    write_text_atomically(folder / "mixture.html", _html(report, samples))
    report["files"] = {name: str(folder / name) for name in ("mixture.json", "mixture.html")}
    write_text_atomically(folder / "mixture.json", json.dumps(report, indent=2) + "\n")
    return report


def summary_line(report: dict[str, Any]) -> str:
    """One line for the run's log: each data set's share of the run and the epochs of it, and the page."""
    parts = [f"{s['name']} {s['share']:.1%} ({s['epochs']:.1f} epochs)" for s in report["sources"]]
    return f"data mixture: {', '.join(parts)} -> {report['files']['mixture.html']}"


def _decoded(blend: Mixture, tokenizer: Tokenizer, names: Sequence[str], index: int) -> dict[str, Any]:
    """Run sample ``index`` decoded as the inspection report shows a sample (its trained tokens: the labels
    under the loss mask; a pretraining window, trained whole, with its ends of document marked instead)."""
    s, within = blend.locate(index)
    sample = blend.sources[s][within]
    tokens, mask = sample["labels"].numpy(), sample["loss_mask"].numpy()
    shown = None if mask.all() else mask[:SAMPLE_TOKENS]
    return {"title": f"{names[s]}: run sample #{index} (its train sample #{within}, {len(tokens)} tokens)",
            "parts": [("", segments(tokenizer, tokens[:SAMPLE_TOKENS], shown), len(tokens) > SAMPLE_TOKENS)],
            "fields": None}  # fmt: skip


def _html(report: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    """The report as a page styled like the inspection report: the data sets, the first batches, samples."""
    names = [s["name"] for s in report["sources"]]
    codes = [string.ascii_uppercase[s] if s < 26 else str(s) for s in range(len(names))]  # a letter per data set
    legend = ", ".join(f"{code} = {html.escape(name)}" for code, name in zip(codes, names))
    batches = [{"batch": b, **{name: row.count(s) for s, name in enumerate(names)},
                "sources, in order": " ".join(codes[s] for s in row)} for b, row in enumerate(report["first_batches"])]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>data mixture of {len(names)} data sets</title>
{STYLE}</head><body>
<h1>Data mixture: {html.escape(", ".join(names))}</h1>
<p>{report["samples"]:,} samples ({report["samples"] // max(report["global_batch_size"], 1):,} global batches of
{report["global_batch_size"]}, {report["seq_len"]} tokens each), counted {html.escape(report["counted"])}.</p>
{table(report["sources"])}
<h2>The first global batches</h2>
<p>{legend}</p>
{table(batches) if batches else "<p>(the run is shorter than one global batch)</p>"}
<h2>Samples</h2>
{LEGEND}
{"".join(sample_html(sample) for sample in samples)}
</body></html>
"""
