"""Per-item evaluation logs (``ironcore eval --log-samples``): what the model read, wrote and was scored on.

An aggregate such as "accuracy 0.02" cannot say why; the items can. Each task's rows go to
``samples_<task>.jsonl`` (one JSON object per item, as lm-eval's ``--log_samples``) and to
``samples_<task>.html``, the same rows as a table a person reads in a browser or in MLflow's artifact view.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ironcore.files import write_text_atomically
from ironcore.tables import html_table


def sample_paths(folder: str | Path, task: str) -> tuple[Path, Path]:
    """``samples_<task>.jsonl`` and ``.html`` in ``folder`` (a task name's other characters become ``_``)."""
    stem = "samples_" + re.sub(r"[^A-Za-z0-9_.-]", "_", task)
    return Path(folder) / f"{stem}.jsonl", Path(folder) / f"{stem}.html"


def write_samples(folder: str | Path, task: str, rows: list[dict[str, Any]], summary: str,
                  table: bool = True) -> list[Path]:  # fmt: skip
    """Write the task's rows as JSONL and (``table``) as an HTML table, each atomically; the paths written."""
    jsonl, page = sample_paths(folder, task)
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_text_atomically(jsonl, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    if not table:
        return [jsonl]
    write_text_atomically(page, html_table(f"{task}: {len(rows)} items", summary, rows))
    return [jsonl, page]
