"""Reading a data source as a stream of chunks, and turning a chunk into records.

The preprocessing main process only cuts the source into *chunks* of about
:data:`CHUNK_BYTES` (raw bytes of whole lines / paragraphs / files, or a batch
of rows from ``datasets``); the worker processes decode and parse them with
:func:`read_records`. That keeps the main process cheap (it is one of the
cores we tokenize on) and memory bounded by the chunks in flight.

Local files: ``.jsonl`` (and ``.json`` holding JSON lines) are read here, line
by line, so a malformed line is reported as ``FILE:LINE``; ``.parquet``,
``.csv`` and ``.json`` arrays go through ``datasets`` (streaming, no cache
copy); any other file is UTF-8 text cut into documents per ``document_split``
(``file`` / ``paragraph`` = blank-line separated / ``line``). Hub data sets
(``hf_name``) stream through ``datasets`` too.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ironcore.errors import ConfigError, DataError
from ironcore.files import describe_os_error

if TYPE_CHECKING:
    from ironcore.data.preprocessing.config import SourceConfig

CHUNK_BYTES = 1 << 20
ROWS_PER_CHUNK = 2048
JSONL_SUFFIXES = {".jsonl", ".json"}
DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
# A paragraph break: a newline followed by one or more blank (whitespace-only) lines.
_PARAGRAPH_BREAK = r"\n(?:[ \t\r\f\v]*\n)+"
_PARAGRAPH_RE = re.compile(_PARAGRAPH_BREAK)
_PARAGRAPH_RE_BYTES = re.compile(_PARAGRAPH_BREAK.encode())
_NOT_BLANK_BYTES = re.compile(rb"[^ \t\r\f\v]")


@dataclass
class Chunk:
    """A unit of work for a worker: raw bytes of whole records, or a batch of rows.

    ``kind`` is ``text`` (documents cut per ``split``), ``jsonl`` (one JSON
    object per line) or ``rows`` (``columns`` from ``datasets``). ``origin`` and
    ``first_line`` locate the records for error messages.
    """

    kind: str
    origin: str
    first_line: int = 1
    data: bytes = b""
    split: str = "paragraph"
    columns: dict[str, list[Any]] = field(default_factory=dict)
    # For `text` chunks in `file` mode holding several small files: (path, bytes) pairs.
    files: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        return len(self.data) + sum(len(d) for _, d in self.files)


@dataclass
class Records:
    """What a worker read from a chunk: the records that parsed, and where they came from."""

    values: list[Any]  # str (text sources) or dict (jsonl / rows)
    locations: list[str]  # "FILE:LINE" or "SOURCE row N" per value; empty for text (only decoding fails)
    num_records: int  # records seen, kept or not (the split assignment counts every record)
    positions: list[int]  # ordinal of each value among the chunk's records
    bad: int = 0
    errors: list[str] = field(default_factory=list)


# ---- the main process: listing, fingerprinting and chunking ------------------------------------------


def list_files(source: SourceConfig) -> list[Path]:
    """The files a local source names (a file, a folder walked recursively, or a glob), sorted."""
    assert source.path is not None
    path = Path(source.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(source.path, recursive=True) if Path(p).is_file())
    if not files:
        raise ConfigError(f"config key 'source.path': no files match {source.path!r}")
    return files


def fingerprint(source: SourceConfig) -> str:
    """A cheap identity of the source: file names, sizes and modification times (or the hub name)."""
    digest = hashlib.sha256()
    if source.hf_name is not None:
        digest.update(json.dumps([source.hf_name, source.subset, source.split]).encode())
    else:
        for path in list_files(source):
            stat = path.stat()
            digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def total_bytes(source: SourceConfig) -> int | None:
    """Size of a local source (for the progress bar); None for hub data sets."""
    if source.hf_name is not None:
        return None
    return sum(p.stat().st_size for p in list_files(source))


def iter_chunks(source: SourceConfig) -> Iterator[Chunk]:
    """Cut the source into chunks of whole records, in a deterministic order."""
    if source.hf_name is not None:
        yield from _dataset_chunks(source.hf_name, source.hf_name, source)
        return
    files_batch: list[tuple[str, bytes]] = []
    for path in list_files(source):
        suffix = path.suffix.lower()
        try:  # only this file's own reads: errors of the code consuming the chunks do not come through here
            if suffix in DATASETS_SUFFIXES or (suffix == ".json" and _is_json_array(path)):
                yield from _dataset_chunks(DATASETS_SUFFIXES.get(suffix, "json"), str(path), source)
            elif suffix in JSONL_SUFFIXES:
                yield from _split_file(path, "jsonl", b"\n")
            elif source.document_split == "file":
                files_batch.append((str(path), path.read_bytes()))
                if sum(len(d) for _, d in files_batch) >= CHUNK_BYTES:
                    yield Chunk("text", files_batch[0][0], split="file", files=files_batch)
                    files_batch = []
            else:
                yield from _split_file(path, "text", b"\n", source.document_split)
        except OSError as err:
            raise DataError(describe_os_error(err, path)) from None
    if files_batch:
        yield Chunk("text", files_batch[0][0], split="file", files=files_batch)


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip()[:1] == b"["


def _split_file(path: Path, kind: str, newline: bytes, split: str = "line") -> Iterator[Chunk]:
    """Read ``path`` in blocks and cut each at the last record boundary (line or paragraph break)."""
    line = 1
    rest = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_BYTES)
            data = rest + block
            if not block:
                if data:
                    yield Chunk(kind, str(path), line, data, split)
                return
            cut = _last_paragraph_break(data) if split == "paragraph" else data.rfind(newline) + 1
            if cut <= 0:  # no boundary yet: a record longer than a block, keep reading
                rest = data
                continue
            yield Chunk(kind, str(path), line, data[:cut], split)
            line += data.count(b"\n", 0, cut)
            rest = data[cut:]


def _last_paragraph_break(data: bytes) -> int:
    """End of the last paragraph break that cannot grow with more data (0 when none).

    A break at the very end of ``data`` may continue in the next block
    (``"\\n\\n"`` + ``" \\n"``), so the cut must be followed by a visible byte;
    this keeps the documents independent of where blocks end.
    """
    tail_start = max(0, len(data) - (1 << 16))
    for match in reversed(list(_PARAGRAPH_RE_BYTES.finditer(data, tail_start))):
        if _NOT_BLANK_BYTES.search(data, match.end()):
            return match.end()
    if tail_start:
        return _last_paragraph_break(data[:tail_start])
    return 0


def _dataset_chunks(builder: str, origin: str, source: SourceConfig) -> Iterator[Chunk]:
    """Stream a hub data set or a parquet/csv/json file through ``datasets`` in row batches."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("reading this source needs the 'datasets' package") from None
    kwargs: dict[str, Any] = {"streaming": True, "split": source.split}
    if source.hf_name is None:
        kwargs["data_files"] = {source.split: origin}
        if Path(origin).suffix.lower() == ".tsv":
            kwargs["delimiter"] = "\t"
    try:
        dataset = datasets.load_dataset(builder, source.subset, **kwargs)
        row = 0
        for batch in dataset.iter(batch_size=ROWS_PER_CHUNK):
            count = len(next(iter(batch.values()), []))
            yield Chunk("rows", origin, row, columns=batch)
            row += count
    except (ConfigError, DataError):
        raise
    except Exception as err:  # datasets/pyarrow/network errors are many types; report them as one line
        raise DataError(f"{origin}: cannot read data set: {type(err).__name__}: {err}") from None


# ---- the workers: chunk -> records ---------------------------------------------------------------------


def read_records(chunk: Chunk, skip_bad: bool) -> Records:
    """Decode and parse a chunk; bad records raise DataError or, with ``skip_bad``, are counted."""
    if chunk.kind == "text":
        return _read_text(chunk, skip_bad)
    if chunk.kind == "jsonl":
        return _read_jsonl(chunk, skip_bad)
    return _read_rows(chunk)


def _bad(records: Records, message: str, skip_bad: bool) -> None:
    if not skip_bad:
        raise DataError(message)
    records.bad += 1
    records.errors.append(message)


def _read_text(chunk: Chunk, skip_bad: bool) -> Records:
    """Documents of a text chunk. Text records carry no locations: only decoding can fail."""
    errors: list[str] = []
    if chunk.split == "file":
        texts = [_decode_text(path, 1, data, skip_bad, errors) for path, data in chunk.files]
    else:
        try:  # fast path: decode once, split with a C regex
            texts = _split_text(chunk.data.decode("utf-8"), chunk.split)
        except UnicodeDecodeError:
            texts = [_decode_text(*piece, skip_bad, errors) for piece in _split_bytes(chunk)]
    values = [text for text in texts if text is not None]
    positions = [i for i, text in enumerate(texts) if text is not None]
    return Records(values, [], len(texts), positions, len(errors), errors)


def _split_text(text: str, split: str) -> list[str]:
    if split == "line":
        lines = text.split("\n")
        return lines[:-1] if text.endswith("\n") else lines
    # Empty pieces are break artefacts (a chunk ending in a break); whitespace-only ones are documents.
    return [piece for piece in _PARAGRAPH_RE.split(text) if piece]


def _decode_text(path: str, line: int, data: bytes, skip_bad: bool, errors: list[str]) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad_line = line + data.count(b"\n", 0, err.start)
        message = f"{path}:{bad_line}: not valid UTF-8 (byte 0x{data[err.start]:02x})"
        if not skip_bad:
            raise DataError(message) from None
        errors.append(message)
        return None


def _split_bytes(chunk: Chunk) -> list[tuple[str, int, bytes]]:
    """The documents of a chunk that did not decode, as bytes with their first line numbers."""
    data = chunk.data
    if chunk.split == "line":
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        return [(chunk.origin, chunk.first_line + i, piece) for i, piece in enumerate(lines)]
    pieces = []
    line = chunk.first_line
    start = 0
    for match in [*_PARAGRAPH_RE_BYTES.finditer(data), None]:
        end, next_start = (match.start(), match.end()) if match else (len(data), len(data))
        if end > start:
            pieces.append((chunk.origin, line, data[start:end]))
        line += data.count(b"\n", start, next_start)
        start = next_start
    return pieces


def _read_jsonl(chunk: Chunk, skip_bad: bool) -> Records:
    records = Records([], [], 0, [])
    for number, raw in enumerate(chunk.data.split(b"\n"), start=chunk.first_line):
        if not raw.strip():
            continue
        location = f"{chunk.origin}:{number}"
        records.num_records += 1
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            _bad(records, f"{location}: not valid UTF-8 (byte 0x{raw[err.start]:02x})", skip_bad)
            continue
        except json.JSONDecodeError as err:
            _bad(records, f"{location}: malformed JSON: {err.msg} (column {err.colno})", skip_bad)
            continue
        if not isinstance(value, dict):
            _bad(records, f"{location}: expected a JSON object, got {type(value).__name__}", skip_bad)
            continue
        records.values.append(value)
        records.locations.append(location)
        records.positions.append(records.num_records - 1)
    return records


def _read_rows(chunk: Chunk) -> Records:
    names = list(chunk.columns)
    count = len(chunk.columns[names[0]]) if names else 0
    values = [dict(zip(names, row, strict=True)) for row in zip(*chunk.columns.values(), strict=True)]
    locations = [f"{chunk.origin} row {chunk.first_line + i}" for i in range(count)]
    return Records(values, locations, count, list(range(count)))


def read_all_texts(source: SourceConfig, fields: list[str], skip_bad: bool) -> Iterator[str]:
    """Every string a tokenizer should learn from (for ``tokenizer.train``), in the main process; a source
    without any text is an error (a tokenizer learnt from nothing would still save)."""
    found = False
    for chunk in iter_chunks(source):
        for value in read_records(chunk, skip_bad).values:
            texts = [value] if isinstance(value, str) else [t for name in fields for t in _strings(value.get(name))]
            found = found or any(texts)
            yield from texts
    if not found:
        raise DataError(f"{source.path or source.hf_name}: no text to learn a tokenizer from (fields: {', '.join(fields)})")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        content = value.get("content")
        if isinstance(content, str):
            yield content
