"""Source -> tokens (+ loss masks) -> Megatron shards: the ``ironcore preprocess`` engine.

Flow: the main process lists the source and cuts it into ~1 MiB chunks
(:mod:`ironcore.data.preprocessing.sources`); ``num_workers`` forked processes each decode,
parse and tokenize whole chunks (:mod:`ironcore.data.preprocessing.encode`), returning flat
numpy arrays; the main process writes them, in source order, with one write
per shard. At most ``2 * num_workers`` chunks are in flight, so memory does
not grow with the corpus.

Parallelism is one level only: worker processes run the Rust tokenizer
single-threaded (``TOKENIZERS_PARALLELISM=false``), because its internal
thread pool leaves the per-document Python work (reading, ids -> numpy)
serial. With ``num_workers: 0`` the main process tokenizes, and the Rust
tokenizer may use its own threads.

Safety: everything is written into a hidden temporary folder with
``metadata.json`` last, then put in place (:func:`ironcore.files.build_folder`:
renamed, or moved into ``output_dir`` when that is a mount point), so an
interrupted run never leaves shards that look complete; a killed run's
temporaries are removed by the next run, and its workers die with it. The
fingerprint in ``metadata.json`` (config, source names/sizes/mtimes, tokenizer
files) makes an unchanged re-run a no-op.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np

from ironcore import __version__
from ironcore.config.base import to_dict
from ironcore.data.preprocessing import sources
from ironcore.data.preprocessing.config import DataConfig, SourceConfig, TokenizerConfig
from ironcore.data.preprocessing.encode import Encoded, Encoder
from ironcore.data.preprocessing.indexed import IndexedDatasetWriter, token_dtype
from ironcore.data.preprocessing.metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    fields_path,
    load_metadata,
    shard_prefix,
    write_metadata,
)
from ironcore.data.preprocessing.tasks import TaskSpec, task_spec
from ironcore.data.preprocessing.tokenizer import (
    GENERATION_CONFIG,
    Tokenizer,
    definition_files,
    tokenizer_source,
)
from ironcore.errors import ConfigError, DataError
from ironcore.files import build_folder, check_writable, remove_stale_temps

logger = logging.getLogger(__name__)

# The golden ratio's fractional part: record i goes to validation when frac((i + 1) * phi) < valid_fraction.
# A low-discrepancy sequence: the held-out share is within a record or two of the fraction even for
# small data sets, needs no RNG state, and does not depend on chunking or worker count.
_PHI = 0.6180339887498949
MAX_LOGGED_WARNINGS = 10


def preprocess(config: DataConfig, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build ``config.output_dir`` unless it is already up to date; return its metadata."""
    output_dir = Path(config.output_dir)
    check_writable(output_dir, "folder")  # before the work, in one line naming the path
    digest, source_digest = fingerprints(config)
    if (output_dir / METADATA_FILE).exists() and not force:
        try:
            existing = load_metadata(output_dir)
        except DataError:
            existing = {}
        if existing.get("fingerprint") == digest:
            logger.info(f"{output_dir} is up to date (same config, source and tokenizer); nothing to do")
            return existing
    elif output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / METADATA_FILE).exists():
        raise DataError(
            f"{output_dir} exists and is not a preprocessed data set; remove it or pick another output_dir"
        )
    for folder in (output_dir.parent, output_dir):  # what killed runs left behind
        remove_stale_temps(folder, output_dir.name)

    def build(folder: Path) -> None:
        metadata = _build(config, folder, progress)
        metadata.update(fingerprint=digest, source_fingerprint=source_digest)
        write_metadata(folder, metadata)

    build_folder(output_dir, build, last=METADATA_FILE)
    return load_metadata(output_dir)


def fingerprints(config: DataConfig) -> tuple[str, str]:
    """``(fingerprint, source fingerprint)``; the first changes whenever the output would."""
    source_digest = sources.fingerprint(config.source)
    settings = to_dict(config)
    for key in ("name", "output_dir", "num_workers"):  # they do not change the shards
        settings.pop(key)
    parts = {
        "format_version": FORMAT_VERSION,
        "example_end": "eos",  # sft/dpo examples end with the model's EOS (was the EOD): rebuild older sets
        "config": settings,
        "source": source_digest,
        "valid_source": sources.fingerprint(config.valid_source) if config.valid_source else None,
        "tokenizer": _tokenizer_fingerprint(config.tokenizer),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return digest, source_digest


def _tokenizer_fingerprint(config: TokenizerConfig) -> str | None:
    if config.path is None:
        return None  # a hub name or training settings: already in the config
    digest = hashlib.sha256()
    generation = tokenizer_source(config.path) / GENERATION_CONFIG  # may name the end of sequence
    for path in [*definition_files(config.path), *([generation] if generation.is_file() else [])]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def load_or_train_tokenizer(config: DataConfig) -> Tokenizer:
    tok = config.tokenizer
    if tok.train is None:
        if tok.path is not None:
            return Tokenizer.from_path(tok.path, tok.eod_token, tok.eos_token)
        return Tokenizer.from_hub(tok.hf_name, tok.eod_token, tok.eos_token)
    logger.info(
        f"training a byte-level BPE tokenizer (vocab {tok.train.vocab_size}) on {config.source.describe()}"
    )
    texts = sources.read_all_texts(
        config.source, list(config.fields.values()), config.on_bad_record == "skip"
    )
    return Tokenizer.train_bpe(texts, tok.train.vocab_size, tok.train.min_frequency)


def _build(config: DataConfig, folder: Path, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    task = task_spec(config.task_type)
    for source in (config.source, config.valid_source):
        if source is not None:
            _check_source(source, task)
    tokenizer = load_or_train_tokenizer(config)
    logger.info(end_tokens_line(tokenizer, task))
    tokenizer.save(folder)
    dtype = token_dtype(tokenizer.vocab_size)
    splits = ["train", "valid"] if (config.valid_fraction or config.valid_source) else ["train"]
    writers = {
        split: {
            stream: IndexedDatasetWriter(
                shard_prefix(folder, split, stream), np.uint8 if stream.endswith("loss_mask") else dtype
            )
            for stream in task.streams
        }
        for split in splits
    }
    stats = {split: Counter() for split in splits}
    # RL prompts keep their records' fields (the original prompt, the reward's reference) beside the shards.
    side = {split: open(fields_path(folder, split), "w", encoding="utf-8") for split in splits} \
        if task.keeps_fields else {}
    counts: Counter = Counter()
    encoder = task.encoder(tokenizer, config)
    jobs = [(config.source, "fraction" if config.valid_fraction else "train")]
    if config.valid_source is not None:
        jobs.append((config.valid_source, "valid"))
    logged = 0
    try:
        for source, destination in jobs:
            base = 0
            for encoded in _encode_stream(source, encoder, config, progress):
                counts.update(encoded.counts)
                for message in encoded.warnings:
                    if logged < MAX_LOGGED_WARNINGS:
                        logger.warning(f"warning: {message}")
                    logged += 1
                ids = base + encoded.positions
                base += encoded.num_records
                if destination == "fraction":
                    in_valid = np.modf((ids + 1) * _PHI)[0] < config.valid_fraction
                    _write(encoded, ~in_valid, writers["train"], stats["train"], side.get("train"))
                    _write(encoded, in_valid, writers["valid"], stats["valid"], side.get("valid"))
                else:
                    _write(encoded, None, writers[destination], stats[destination], side.get(destination))
    finally:
        for file in side.values():
            file.close()
    for split_writers in writers.values():
        for writer in split_writers.values():
            writer.finalize()
    if logged > MAX_LOGGED_WARNINGS:
        logger.warning(f"warning: {logged - MAX_LOGGED_WARNINGS} more warnings not shown")
    if not stats["train"]["documents"]:
        raise DataError(f"{config.source.describe()}: no usable records (counts: {dict(counts)})")
    if "valid" in stats and not stats["valid"]["documents"]:
        logger.warning("warning: the validation split is empty (source too small for valid_fraction?)")
    return _metadata(config, tokenizer, dtype, task, stats, counts, time.perf_counter() - start)


def _metadata(config: DataConfig, tokenizer: Tokenizer, dtype: np.dtype, task: TaskSpec,
              stats: dict[str, Counter], counts: Counter, seconds: float) -> dict[str, Any]:
    """The dataset's ``metadata.json``: what was built, from what, and how many of each thing."""
    splits = list(stats)
    return {
        "name": config.name,
        "task_type": config.task_type,
        "max_seq_length": config.max_seq_length,
        "append_eod": config.append_eod,
        "tokenizer": {
            "identity": tokenizer.identity,
            "vocab_size": tokenizer.vocab_size,
            "eod_id": tokenizer.eod_id,
            "eod_token": tokenizer.eod_token,
            "eos_id": tokenizer.eos_id,
            "eos_token": tokenizer.eos_token,
            "dtype": dtype.name,
        },
        "splits": {
            split: {
                **{key: int(value) for key, value in stats[split].items()},
                "shards": {s: shard_prefix("", split, s).name for s in task.streams},
                **({"fields": fields_path("", split).name} if task.keeps_fields else {}),
            }
            for split in splits
        },
        "counts": {key: int(value) for key, value in sorted(counts.items())},
        "config": to_dict(config),
        "ironcore_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
    }


def end_tokens_line(tokenizer: Tokenizer, task: TaskSpec) -> str:
    """Which end tokens this build appends, and where each came from: a wrong one is silent otherwise."""
    eod = f"end of document: {tokenizer.eod_token} (id {tokenizer.eod_id})"
    if task.name == "pretrain":
        return eod
    return (f"end of example: {tokenizer.eos_token} (id {tokenizer.eos_id}) from {tokenizer.eos_origin}; {eod}")


def _check_source(source: SourceConfig, task: TaskSpec) -> None:
    """Records with named fields are needed unless the task reads plain text files (pretraining documents)."""
    if task.text_files or source.hf_name is not None:
        return
    for path in sources.list_files(source):
        if (
            path.suffix.lower() not in sources.JSONL_SUFFIXES
            and path.suffix.lower() not in sources.DATASETS_SUFFIXES
        ):
            raise ConfigError(
                f"{path}: a {task.name} source must hold records (.jsonl, .json, .parquet, .csv), "
                "not plain text"
            )


def _write(
    encoded: Encoded, select: np.ndarray | None, writers: dict[str, IndexedDatasetWriter], stats: Counter,
    side: IO[str] | None = None,
) -> None:
    """Append the selected examples of a batch to a split's shards (whole batch when select is None), and
    their records' fields to ``side`` when the task keeps them."""
    if select is not None and not select.any():
        return
    if side is not None and encoded.records is not None:
        records = encoded.records if select is None else \
            [record for record, keep in zip(encoded.records, select, strict=True) if keep]
        side.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    for stream, writer in writers.items():
        items, lengths = encoded.arrays[stream], encoded.lengths[stream]
        if select is not None and not select.all():
            items, lengths = items[np.repeat(select, lengths)], lengths[select]
        writer.add_batch(items, lengths)
        if stream.endswith("loss_mask"):
            stats["trained_tokens"] += int(items.sum(dtype=np.int64))
        else:
            stats["tokens"] += len(items)
    stats["documents"] += len(lengths)


# ---- running the encoder over a source, in worker processes ----------------------------------------------

_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder, parent: int) -> None:
    global _worker_encoder
    _worker_encoder = encoder
    die_with_parent(parent)


def _encode_in_worker(chunk: sources.Chunk) -> Encoded:
    assert _worker_encoder is not None
    return _worker_encoder(chunk)


def _encode_stream(
    source: SourceConfig, encoder: Encoder, config: DataConfig, progress: bool
) -> Iterator[Encoded]:
    """Encoded chunks of ``source`` in source order, from a bounded pipeline of workers."""
    from tqdm import tqdm

    total = sources.total_bytes(source)
    bar = tqdm(
        total=total,
        unit="B" if total is not None else " records",
        unit_scale=True,
        desc=f"preprocess {config.name}",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    tokens = 0

    def advance(chunk: sources.Chunk, encoded: Encoded) -> Encoded:
        nonlocal tokens
        tokens += sum(len(encoded.arrays[s]) for s in encoded.arrays if not s.endswith("loss_mask"))
        bar.update(chunk.num_bytes if total is not None else encoded.num_records)
        bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
        return encoded

    executor, work = _executor(encoder, config.num_workers)
    pending: deque = deque()
    try:
        for chunk in sources.iter_chunks(source):
            pending.append((chunk, executor.submit(work, chunk)))
            if len(pending) >= 2 * max(config.num_workers, 1):
                done, future = pending.popleft()
                yield advance(done, future.result())
        while pending:
            done, future = pending.popleft()
            yield advance(done, future.result())
    finally:
        executor.shutdown(wait=not pending, cancel_futures=True)
        bar.close()


def _executor(encoder: Encoder, num_workers: int) -> tuple[Executor, Callable[[sources.Chunk], Encoded]]:
    """Worker processes holding ``encoder`` (fork where safe: Linux; else spawn), or, for
    ``num_workers: 0``, two threads in this process: the Rust tokenizer releases the GIL and uses its
    own threads, so one chunk's tokenization overlaps the other's Python work."""
    if num_workers == 0:
        return ThreadPoolExecutor(2), encoder
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    # Workers tokenize single-threaded: set before forking so the child starts that way (and the Rust
    # library does not warn about forking after its thread pool was used, e.g. by BPE training).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        executor = ProcessPoolExecutor(
            num_workers, multiprocessing.get_context(method), initializer=_init_worker, initargs=(encoder, os.getpid())
        )
        # Start the workers now, while the variable is set (the executor forks lazily otherwise).
        list(executor.map(_ready, range(num_workers)))
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return executor, _encode_in_worker


def _ready(_: int) -> None:
    """A no-op task that makes the executor start its worker processes."""


def die_with_parent(parent: int) -> None:
    """Ask Linux to kill this worker when its parent dies, so a killed run leaves no workers behind."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:  # not glibc: workers then end when they find their queue closed
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
