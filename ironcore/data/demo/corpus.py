"""The built-in corpus: English and Python code from the running interpreter's standard library.

It needs no network and no download, so the default pipeline runs anywhere
Python does. The documents are

* the pydoc topic texts (``pydoc_data.topics``: the language reference pages
  ``help()`` shows, plain English with code examples), one document per topic;
* the standard library's module sources (``*.py`` below ``sysconfig``'s
  ``stdlib`` path, without ``site-packages``, the test suites and
  ``pydoc_data`` itself), one document per file.

Order and split are deterministic: documents are listed topics first (by
topic name) and then modules (by relative path); a document belongs to the
validation part when a SHA-256 of its name falls below ``valid_fraction``, so
the split of a document never depends on which other documents exist. A
``max_bytes`` budget keeps the documents that come first in the order of
another SHA-256 of their names: an even sample of the whole library (and of
both splits) rather than its first packages.

The output folder holds ``train.jsonl`` and ``valid.jsonl`` (one
``{"name", "kind", "text"}`` record per line, the text field being what a data
config's ``fields: {text: text}`` reads) and ``manifest.json`` (Python
version, settings, counts and the SHA-256 of each file).
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ironcore.errors import ConfigError

# Folders of the standard library that are not library code: the test suites and their data.
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"})
DEFAULT_MAX_FILE_BYTES = 200_000  # larger files are generated tables (unicode data, opcode maps), not prose or code


@dataclass(frozen=True)
class Document:
    name: str  # "topic:NAME" or "module:RELATIVE/PATH.py"
    kind: str  # "topic" or "module"
    text: str

    def key(self, purpose: str) -> float:
        """A stable number in [0, 1) from the name, independent for each purpose ("split", "budget")."""
        return int(hashlib.sha256(f"{purpose}:{self.name}".encode()).hexdigest()[:15], 16) / 16**15


def topic_documents() -> Iterator[Document]:
    """The pydoc topic texts, by topic name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield Document(f"topic:{name}", "topic", text + "\n")


def module_documents(stdlib: str | Path | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[Document]:
    """The standard library's ``*.py`` sources, by relative path (tests and huge generated files left out)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ConfigError(f"standard library folder {root} does not exist")
    paths = sorted(
        (path for path in root.rglob("*.py") if not SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])),
        key=lambda path: path.relative_to(root).as_posix(),
    )
    for path in paths:
        if path.stat().st_size > max_file_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few legacy files are not UTF-8; the corpus is UTF-8 only
        if text.strip():
            yield Document(f"module:{path.relative_to(root).as_posix()}", "module", text)


def stdlib_documents(stdlib: str | Path | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[Document]:
    """Every document of the built-in corpus in its deterministic order: topics, then modules."""
    return [*topic_documents(), *module_documents(stdlib, max_file_bytes)]


def build_corpus(
    output_dir: str | Path,
    valid_fraction: float = 0.05,
    max_bytes: int | None = None,
    stdlib: str | Path | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> dict[str, Any]:
    """Write ``train.jsonl``, ``valid.jsonl`` and ``manifest.json`` into ``output_dir``; return the manifest."""
    if not 0.0 < valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"max_bytes must be positive, got {max_bytes}")
    documents = stdlib_documents(stdlib, max_file_bytes)
    if max_bytes is not None:
        documents = _within_budget(documents, max_bytes)
    valid = [doc for doc in documents if doc.key("split") < valid_fraction]
    train = [doc for doc in documents if doc.key("split") >= valid_fraction]
    if not valid or not train:
        raise ConfigError(
            f"the corpus has {len(documents)} documents: too few for valid_fraction {valid_fraction} "
            "(raise max_bytes or change valid_fraction)"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "python": sys.version.split()[0],
        "settings": {"valid_fraction": valid_fraction, "max_bytes": max_bytes, "max_file_bytes": max_file_bytes},
        "splits": {},
    }
    for split, docs in (("train", train), ("valid", valid)):
        path = output_dir / f"{split}.jsonl"
        _write_jsonl(path, docs)
        manifest["splits"][split] = {
            "file": path.name,
            "documents": len(docs),
            "topics": sum(doc.kind == "topic" for doc in docs),
            "modules": sum(doc.kind == "module" for doc in docs),
            "characters": sum(len(doc.text) for doc in docs),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    (output_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _within_budget(documents: list[Document], max_bytes: int) -> list[Document]:
    """Documents in "budget" key order while their UTF-8 size fits ``max_bytes``, kept in their original order."""
    kept: set[str] = set()
    total = 0
    for doc in sorted(documents, key=lambda doc: doc.key("budget")):
        size = len(doc.text.encode("utf-8"))
        if total + size > max_bytes:
            continue
        kept.add(doc.name)
        total += size
    return [doc for doc in documents if doc.name in kept]


def _write_jsonl(path: Path, documents: list[Document]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"name": doc.name, "kind": doc.kind, "text": doc.text}, ensure_ascii=False) + "\n")
    tmp.replace(path)
