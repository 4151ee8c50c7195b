"""cache-build: run ONE source model once over a corpus and write its source-native shards.

The job, top to bottom:
  1. read the corpus (every rank reads it all: the record list is deterministic);
  2. resolve the model; refuse a cache folder built with other settings (unless --overwrite);
  3. take this rank's records (records[rank::world_size]) and cut them into shards of fixed size;
  4. for each shard not finished yet: tokenize, score in length buckets, write atomically;
  5. mark this rank done; the rank that finds every rank done writes the card and, last, the manifest.

A finished shard exists under its final name only (written to a temporary name, fsynced, renamed), so a
build killed at any point resumes by redoing the shard it was writing, and ends with identical bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alignment import token_byte_ends, token_surface, tokenizer_fingerprint
from cache_builder.card import dataset_card
from cache_builder.corpus import DEFAULT_WINDOW_CHARS, RENDER_VERSION, Corpus, Record, load_corpus
from cache_builder.device_map import load_spread
from cache_builder.format import (
    CARD,
    MANIFEST,
    SourceRow,
    new_manifest,
    shard_info,
    source_table,
    write_manifest,
    write_shard,
    write_text_atomic,
)
from cache_builder.models import ModelSource, ensure_converted, load_model, load_tokenizer, resolve_model
from cache_builder.scoring import length_buckets, score_batch, scoring_buffers
from cache_builder.untrusted import refuse_unsafe_tree, shown
from cache_builder.vocab_file import write_vocab

SETTINGS_FILE = "build-settings.json"
RANKS_DIR = "_ranks"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BuildSettings:
    """Everything that determines the bytes of a cache; a rerun with other settings is refused."""

    model: str
    top_k: int = 10
    window_chars: int = DEFAULT_WINDOW_CHARS
    max_tokens: int = 2048
    batch_tokens: int = 4096
    position_chunk: int = 256
    dtype: str = "fp32"
    logit_dtype: str = "float16"
    rows_per_shard: int = 256
    limit: int | None = None
    world_size: int = 1
    fused_epilogue: bool = False  # both normalisers of a chunk from one torch.compile'd read (scoring.fused_normalisers)


# Settings added after caches were built, with the value those builds used: their settings files still match.
SETTINGS_BEFORE_THEY_EXISTED = {"fused_epilogue": False}


@dataclass(frozen=True)
class BuildSummary:
    folder: Path
    records: int
    tokens: int
    skipped_records: int
    shards_written: int
    shards_skipped: int
    seconds: float
    complete: bool
    bytes_per_token: float | None


class BuildError(RuntimeError):
    """A build that must not go on; the message names the fix."""


def rank_from_env(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size from the flags, else torchrun's environment, else (0, 1)."""
    rank = rank if rank is not None else int(os.environ.get("RANK", 0))
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise BuildError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


@contextmanager
def exclusive_lock(path: Path):
    """Hold an exclusive lock on `path` or fail at once: two builds must never write one folder.

    The lock file is opened without following a symlink and never truncated: a planted `.lock` symlink
    cannot make the lock damage a file elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise BuildError(f"{shown(path)}: cannot be opened as a lock file ({err.strerror}; a symlink or FIFO "
                         "planted in the folder?); remove it") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BuildError(f"{shown(path)}: the lock is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(
                f"another cache-build is writing {path.parent} (lock {path.name} is held); wait for it or use another --out"
            ) from None
        yield
    finally:
        os.close(fd)


def check_settings(folder: Path, settings: BuildSettings, corpus_fingerprint: str, overwrite: bool) -> None:
    """Record the settings and the corpus on first use; refuse others on a later run unless overwrite."""
    path = folder / SETTINGS_FILE
    wanted = {**asdict(settings), "corpus_fingerprint": corpus_fingerprint}
    if path.exists():
        existing = {**SETTINGS_BEFORE_THEY_EXISTED, **json.loads(path.read_text())}
        if existing != wanted and not overwrite:
            changed = {k: (existing.get(k), v) for k, v in wanted.items() if existing.get(k) != v}
            what = "from another corpus" if set(changed) == {"corpus_fingerprint"} else f"with other settings {changed} (old, new)"
            raise BuildError(
                f"{folder} holds a cache built {what}; use another --out, or --overwrite to delete it and start again"
            )
        if existing != wanted and overwrite:
            for old in list(folder.glob("shards/*.parquet")) + list(folder.glob(f"{RANKS_DIR}/*.json")):
                old.unlink()
            (folder / MANIFEST).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(wanted, indent=2, sort_keys=True) + "\n")


def shard_plan(records: list[Record], rank: int, world_size: int, rows_per_shard: int) -> list[tuple[str, list[Record]]]:
    """(relative path, records) of this rank's shards: records[rank::world_size] in fixed-size chunks."""
    mine = records[rank::world_size]
    return [
        (f"shards/part-r{rank:05d}-{i // rows_per_shard:05d}.parquet", mine[i : i + rows_per_shard])
        for i in range(0, len(mine), rows_per_shard)
    ]


def tokenize(text: str, tokenizer, surface, add_bos: bool, max_tokens: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids (T,), token byte ends (T,)) of a canonical text, BOS first when the model needs it, cut
    at `max_tokens` (None: never)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        ids = [tokenizer.bos_token_id] + ids
    ids = np.asarray(ids, dtype=np.int32)
    ends = token_byte_ends(ids, surface, text)
    return ids[:max_tokens], ends[:max_tokens]


def response_positions(token_end: np.ndarray, spans, n_bytes: int) -> np.ndarray:
    """(T-1,) bool: position t predicts a token (t+1) that covers at least one response byte."""
    in_response = np.zeros(n_bytes + 1, dtype=np.int64)
    for start, end in spans:
        in_response[start + 1 : end + 1] = 1
    covered = np.cumsum(in_response)  # covered[b] = response bytes in [0, b)
    starts, ends = token_end[:-1], token_end[1:]
    return covered[ends] > covered[starts]


def score_shard(model, tokenizer, surface, records: list[Record], settings: BuildSettings, add_bos: bool,
                progress: Callable[[int, int], None] = lambda text_bytes, tokens: None,
                buffers: torch.Tensor | None = None) -> list[SourceRow]:
    """Tokenize and score one shard's records; rows come back in record order. `progress(text bytes, tokens)`
    is called after every batch; buffers: the job's `scoring_buffers`, reused by every batch."""
    tokenized = [tokenize(r.text, tokenizer, surface, add_bos, settings.max_tokens) for r in records]
    scored: list = [None] * len(records)
    lengths = [len(ids) for ids, _ in tokenized]
    for bucket in length_buckets(lengths, settings.batch_tokens):
        results = score_batch(model, [tokenized[i][0] for i in bucket], settings.top_k, settings.position_chunk,
                              buffers=buffers, fused=settings.fused_epilogue)
        for i, result in zip(bucket, results):
            scored[i] = result
        progress(sum(len(records[i].text.encode()) for i in bucket), sum(lengths[i] for i in bucket))
    rows = []
    for record, (ids, ends), result in zip(records, tokenized, scored):
        mask = response_positions(ends, record.response_spans, len(record.text.encode()))
        nll = -result.gold_logprob[mask] if mask.any() else -result.gold_logprob
        rows.append(SourceRow(record, ids, ends, result, float(nll.mean()) if nll.size else 0.0))
    return rows


def finish_if_complete(folder: Path, settings: BuildSettings, source_info: dict, corpus: Corpus) -> bool:
    """Write the card and then the manifest once every rank has marked itself done."""
    markers = [folder / RANKS_DIR / f"rank-{r:05d}-of-{settings.world_size:05d}.json" for r in range(settings.world_size)]
    if not all(m.exists() for m in markers):
        return False
    shards = [shard_info(folder, path) for m in markers for path in json.loads(m.read_text())["shards"]]
    manifest = new_manifest(
        "source",
        top_k=settings.top_k,
        logit_dtype=settings.logit_dtype,
        source=source_info,
        corpus={"fingerprint": corpus.fingerprint, "render_version": RENDER_VERSION, "summary": corpus.summary(),
                "bad_records": [{"origin": b.origin, "reason": b.reason} for b in corpus.bad]},
        build=asdict(settings),
        shards=shards,
    )
    write_text_atomic(folder / CARD, dataset_card(manifest))
    write_manifest(folder, manifest)
    return True


def output_vocab_size(source: ModelSource) -> int:
    """Rows of the model's output layer (may exceed the tokenizer's size: padded vocabularies)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ensure_converted(source), local_files_only=True).get_text_config().vocab_size


def source_description(source: ModelSource, tokenizer, settings: BuildSettings, surface, vocab_file: dict) -> dict:
    """The manifest's `source` entry: who produced the signals, with which tokenizer and dtype."""
    return {
        "vocab_file": vocab_file,
        "name": source.name,
        "identity": source.identity,
        "dtype": settings.dtype,
        "add_bos": source.add_bos,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_convention": surface.convention,
        "tokenizer_size": len(tokenizer),
        "vocab_size": output_vocab_size(source),
        "chat_template": "canonical-v1: '### User:' / '### Assistant:' plain-text markers, no model special tokens",
    }


def build_cache(
    corpus_path: str | Path,
    settings: BuildSettings,
    out: str | Path = "cache",
    *,
    rank: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    strict: bool = False,
    spread: dict[str, int] | None = None,
    log=print,
) -> BuildSummary:
    """Run the source model over this rank's records and write its shards (see the module docstring).

    strict: refuse (BuildError) a corpus with bad records instead of skipping them.
    spread: for a model larger than one device, spread it over this rank's GPUs (or the CPU with `device` cpu),
        then CPU memory, then disk (cache_builder.device_map), with these weight budgets ({"gpu": bytes, "cpu":
        bytes}; {} for the defaults). The rows are those of a build on one device.
    """
    started = time.time()
    corpus = load_corpus(corpus_path, max_chars=settings.window_chars, limit=settings.limit)
    log(f"corpus: {len(corpus.records)} records from {len(corpus.files)} files, {len(corpus.bad)} bad records skipped")
    for bad in corpus.bad[:10]:
        log(f"  skipped {bad.origin}: {bad.reason}")
    if len(corpus.bad) > 10:
        log(f"  ... and {len(corpus.bad) - 10} more (all are listed in the manifest's corpus.bad_records)")
    if not corpus.records:
        raise BuildError(f"{corpus_path}: no usable record ({len(corpus.bad)} bad, listed above): fix them, or point "
                         "--corpus at a .jsonl, .jsonl.zst, .parquet or .txt corpus with text records")
    if strict and corpus.bad:
        raise BuildError(f"--strict: {len(corpus.bad)} bad records in the corpus, first at {corpus.bad[0].origin}: "
                         f"{corpus.bad[0].reason}")
    source = resolve_model(settings.model)
    folder = Path(out) / source.name
    if folder.exists() or folder.is_symlink():
        refuse_unsafe_tree(folder)  # never write through a symlink planted in an existing cache
    with exclusive_lock(folder / f".lock-r{rank:05d}"):
        check_settings(folder, settings, corpus.fingerprint, overwrite)
        for stale in folder.glob(f"shards/.part-r{rank:05d}-*.tmp"):  # left by a killed run of this rank
            stale.unlink()
        plan = shard_plan(corpus.records, rank, settings.world_size, settings.rows_per_shard)
        todo = [(path, records) for path, records in plan if not (folder / path).exists()]
        marker = folder / RANKS_DIR / f"rank-{rank:05d}-of-{settings.world_size:05d}.json"
        if (folder / MANIFEST).exists() and not todo:
            log(f"{folder}: already complete, nothing to do")
            return _summary(folder, corpus, plan, 0, started, True)
        tokenizer = load_tokenizer(source)
        surface = token_surface(tokenizer)
        offload = folder / f".offload-r{rank:05d}"
        if not todo:
            model = None
        elif spread is not None:
            reserve = 2 * settings.position_chunk * output_vocab_size(source) * 4  # scoring's (chunk, V) buffers
            model = load_spread(source, DTYPES[settings.dtype], device, spread, reserve, offload, log)
        else:
            model = load_model(source, DTYPES[settings.dtype], device)
        total_bytes = sum(len(r.text.encode()) for _, recs in todo for r in recs)  # the bar's ETA is in text bytes
        log(f"{source.name}: {len(plan) - len(todo)} of {len(plan)} shards already done on rank {rank}")
        scored_tokens, scoring_started = 0, time.time()
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"cache-build {source.name}", dynamic_ncols=True) as bar:

            def progress(text_bytes: int, tokens: int) -> None:
                nonlocal scored_tokens
                scored_tokens += tokens
                bar.update(text_bytes)
                bar.set_postfix(tokens=scored_tokens, tok_s=f"{scored_tokens / (time.time() - scoring_started):.0f}")

            buffers = scoring_buffers(model, settings.position_chunk) if todo else None
            for path, records in todo:
                rows = score_shard(model, tokenizer, surface, records, settings, source.add_bos, progress, buffers)
                write_shard(source_table(rows, settings.top_k, settings.logit_dtype), folder, path)
        shutil.rmtree(offload, ignore_errors=True)  # weights accelerate could not read in place
        (folder / RANKS_DIR).mkdir(exist_ok=True)
        write_text_atomic(marker, json.dumps({"shards": [p for p, _ in plan]}) + "\n")
        info = source_description(source, tokenizer, settings, surface, write_vocab(folder, surface))
        complete = finish_if_complete(folder, settings, info, corpus)
    return _summary(folder, corpus, plan, len(todo), started, complete)


def _summary(folder: Path, corpus: Corpus, plan, written: int, started: float, complete: bool) -> BuildSummary:
    manifest = json.loads((folder / MANIFEST).read_text()) if complete else None
    totals = manifest["totals"] if manifest else None
    return BuildSummary(
        folder=folder,
        records=sum(len(r) for _, r in plan),
        tokens=totals["tokens"] if totals else 0,
        skipped_records=len(corpus.bad),
        shards_written=written,
        shards_skipped=len(plan) - written,
        seconds=time.time() - started,
        complete=complete,
        bytes_per_token=totals["bytes"] / max(totals["tokens"], 1) if totals else None,
    )
