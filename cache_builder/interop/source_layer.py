"""Imported rows -> a format-v1 source-native layer, with text and byte offsets rebuilt from the token ids.

Every format hands us, per row, the token ids (T) and a top-k target for each of the T-1 next-token
positions. The canonical text is the concatenation of the tokens' bytes in the named model's tokenizer
(special tokens have zero width, as in a built cache); the record id is its sha256, so imported rows join
with built caches of the same texts. Statistics the input cannot know are NaN here and nulls on disk,
named in the manifest's `missing_statistics`. A row that cannot be imported is skipped and reported with
its reason (or, with strict, refuses the whole import); the layer appears under its final name only when
complete.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq

from alignment import TokenSurface, surface_fingerprint, token_surface
from cache_builder.build import output_vocab_size
from cache_builder.card import dataset_card
from cache_builder.corpus import Record, sha256_hex
from cache_builder.format import (
    CARD,
    STAT_COLUMNS,
    ShardInfo,
    SourceRow,
    new_manifest,
    source_schema,
    source_table,
    with_missing,
    write_manifest,
    write_shard,
    write_text_atomic,
)
from cache_builder.interop.staging import InteropError, staged_folder
from cache_builder.interop.writer import BackgroundWriter
from cache_builder.models import load_tokenizer, resolve_model
from cache_builder.vocab_file import write_vocab

# Statistics no peer format stores: always missing after an import.
UNKNOWN_STATISTICS = ("logsumexp", "logit_mean", "logit_std", "z_logsumexp")


@dataclass(frozen=True)
class ImportedRow:
    """One row as a peer format gives it, positions already in our convention (t = distribution of token t+1)."""

    origin: str  # "file row i", for reports
    input_ids: np.ndarray  # (T,) int64
    topk_ids: np.ndarray  # (T-1, K) int64
    values: np.ndarray  # (T-1, K) float32: logits, raw log-probs or renormalised log-probs (the format's kind)
    response_tokens: np.ndarray | None = None  # (T,) bool: token t is trained on; None: the whole text
    mean_nll: float = float("nan")  # the producer's mean next-token loss of the row, NaN if it gave none
    error: str = ""  # why the row cannot be read at all (reported as its reason)

    @classmethod
    def broken(cls, origin: str, input_ids: np.ndarray, error: str) -> "ImportedRow":
        empty = np.zeros((0, 0))
        return cls(origin, input_ids, empty, empty, error=error)


@dataclass(frozen=True)
class BadRow:
    origin: str
    reason: str


class RowError(ValueError):
    """A row that cannot be imported; the message is the reason reported for it."""


@dataclass(frozen=True)
class Tokenizer:
    """What an import needs of the named model: its token bytes and sizes, as per-vocabulary tables."""

    name: str
    identity: dict
    add_bos: bool
    surface: TokenSurface
    fingerprint: str
    tokenizer_size: int
    vocab_size: int  # rows of the output layer: top-k ids must be below it
    widths: np.ndarray  # (V,) int64 byte width of every token (surface.widths, computed once)
    piece_bytes: np.ndarray  # (sum of widths,) uint8 every token's bytes, token after token
    piece_starts: np.ndarray  # (V,) int64 where token i's bytes start in piece_bytes

    @classmethod
    def load(cls, model: str) -> "Tokenizer":
        source = resolve_model(model)
        tokenizer = load_tokenizer(source)
        try:
            vocab_size = output_vocab_size(source)
        except (OSError, ValueError):  # a tokenizer-only folder: the tokenizer's own size
            vocab_size = len(tokenizer)
        surface = token_surface(tokenizer)  # built once: the fingerprint is the surface's (tokenizer_fingerprint)
        widths = surface.widths.astype(np.int64)
        return cls(source.name, source.identity, source.add_bos, surface, surface_fingerprint(surface),
                   len(tokenizer), max(vocab_size, len(tokenizer)), widths,
                   np.frombuffer(b"".join(surface.pieces), dtype=np.uint8), np.cumsum(widths) - widths)

    def spell(self, ids: np.ndarray) -> tuple[bytes, np.ndarray]:
        """(the tokens' bytes joined, (T,) int64 byte end of every token): a gather from the per-vocabulary tables."""
        lengths = self.widths[ids]  # (T,)
        ends = np.cumsum(lengths)  # (T,)
        first = np.repeat(self.piece_starts[ids] - (ends - lengths), lengths)  # (bytes,) source minus output offset
        return self.piece_bytes[first + np.arange(len(first))].tobytes(), ends


def rebuild_text(ids: np.ndarray, tok: Tokenizer) -> tuple[str, np.ndarray]:
    """(canonical text, (T,) token byte ends) spelled by the token ids; RowError if they spell no UTF-8 text.

    The text is the tokens' pieces, so the ends are their cumulative widths (as alignment.token_byte_ends
    finds them), less the leading space a dummy-prefix tokenizer puts in front."""
    spelled, ends = tok.spell(ids)
    if tok.surface.dummy_prefix and spelled.startswith(b" "):  # the space the tokenizer itself put in front
        spelled, ends = spelled[1:], np.maximum(ends - 1, 0)
    try:
        text = spelled.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RowError(f"the token ids do not decode to UTF-8 text (invalid bytes at byte {err.start}: "
                       f"{spelled[err.start:err.start + 4]!r}); were they made by another tokenizer?") from None
    return text, ends.astype(np.int32)


def response_spans(token_end: np.ndarray, response_tokens: np.ndarray | None, n_bytes: int) -> tuple:
    """Byte spans [start, end) of the response tokens, byte-adjacent ones merged (zero-width tokens skipped);
    the whole text if None."""
    if response_tokens is None:
        return ((0, n_bytes),)
    starts = np.concatenate([[0], token_end[:-1]])
    kept = np.asarray(response_tokens, dtype=bool) & (starts != token_end)  # (T,)
    s, e = starts[kept], token_end[kept]
    if not len(s):
        return ()
    opens = np.flatnonzero(np.concatenate([[True], s[1:] != e[:-1]]))  # a span opens where bytes are not adjacent
    closes = np.concatenate([opens[1:], [len(s)]]) - 1
    return tuple((int(a), int(b)) for a, b in zip(s[opens], e[closes]))


def source_row(row: ImportedRow, tok: Tokenizer, k: int, kind: str, split: str) -> SourceRow:
    """One checked row of the layer; RowError with the reason when it cannot be imported."""
    if row.error:
        raise RowError(row.error)
    ids = np.asarray(row.input_ids, dtype=np.int64)
    topk_ids, values = np.asarray(row.topk_ids, dtype=np.int64), np.asarray(row.values, dtype=np.float32)
    if ids.ndim != 1 or len(ids) < 2:
        raise RowError(f"a row needs at least 2 tokens, got {ids.shape}")
    if topk_ids.shape != values.shape or topk_ids.ndim != 2:
        raise RowError(f"top-k ids {topk_ids.shape} and values {values.shape} are not one (positions, k) grid")
    if topk_ids.shape != (len(ids) - 1, k):
        raise RowError(f"{topk_ids.shape[0]} positions of {topk_ids.shape[1]} candidates for {len(ids)} tokens; "
                       f"expected {len(ids) - 1} positions (one per next token) of {k} (truncated or ragged row)")
    outside = ids[(ids < 0) | (ids >= tok.tokenizer_size)]
    if outside.size:
        raise RowError(f"token id {int(outside[0])} is outside {tok.name}'s tokenizer (0..{tok.tokenizer_size - 1})")
    outside = topk_ids[(topk_ids < 0) | (topk_ids >= tok.vocab_size)]
    if outside.size:
        raise RowError(f"top-k id {int(outside[0])} is outside {tok.name}'s vocabulary (0..{tok.vocab_size - 1})")
    if not np.isfinite(values).all():
        t = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise RowError(f"position {t} has a non-finite value (fewer than {k} candidates, or padding)")
    order = np.argsort(-values, axis=1, kind="stable")  # (T-1, K) best first, as our format stores them
    topk_ids, values = np.take_along_axis(topk_ids, order, 1), np.take_along_axis(values, order, 1)
    text, token_end = rebuild_text(ids, tok)
    n_bytes = len(text.encode())
    hit = topk_ids == ids[1:, None]  # (T-1, K) the gold next token among the candidates
    gold = np.full(len(ids) - 1, np.nan, dtype=np.float32)
    if kind == "logprobs":  # only raw log-probs are the model's log-probability of the gold token
        rows = hit.any(axis=1)
        gold[rows] = values[rows, hit[rows].argmax(axis=1)]
    unknown = np.full(len(ids) - 1, np.nan, dtype=np.float32)
    scored = SimpleNamespace(topk_ids=topk_ids.astype(np.int32), topk_logits=values,
                             **{name: unknown for name in UNKNOWN_STATISTICS}, gold_logprob=gold)
    mean_nll = row.mean_nll if np.isfinite(row.mean_nll) else (-float(gold.mean()) if np.isfinite(gold).all() else np.nan)
    record_id = sha256_hex(text)
    record = Record(record_id, record_id, 0, None, split, text, response_spans(token_end, row.response_tokens, n_bytes),
                    row.origin)
    return SourceRow(record, ids.astype(np.int32), token_end, scored, float(mean_nll))


def missing_of(rows: list[SourceRow]) -> tuple[str, ...]:
    """The statistics stored as nulls somewhere in these rows."""
    missing = list(UNKNOWN_STATISTICS)
    if any(np.isnan(r.scored.gold_logprob).any() for r in rows):
        missing.append("gold_logprob")
    if any(np.isnan(r.mean_nll) for r in rows):
        missing.append("mean_nll")
    return in_manifest_order(missing)


def in_manifest_order(names) -> tuple[str, ...]:
    """Missing statistic names in the order the manifest lists them."""
    return tuple(name for name in (*STAT_COLUMNS, "mean_nll") if name in names)


class RowConverter:
    """Checks and converts imported rows one at a time, keeping the rows it skips with their reasons and the
    record ids it has seen (a text met twice is reported as a duplicate). k is set by the first readable row;
    a row with another k is ragged."""

    def __init__(self, tok: Tokenizer, kind: str, split: str, strict: bool):
        self.tok, self.kind, self.split, self.strict = tok, kind, split, strict
        self.bad: list[BadRow] = []
        self.k: int | None = None
        self.seen: dict[str, str] = {}  # record id -> the origin of its first row, in layer order

    def convert(self, rows: Iterable[ImportedRow]) -> Iterator[SourceRow]:
        """The rows of the layer, as they are read; InteropError at the first bad row if strict."""
        for row in rows:
            if self.k is None and np.ndim(row.topk_ids) == 2 and np.shape(row.topk_ids)[1]:
                self.k = np.shape(row.topk_ids)[1]
            try:
                converted = source_row(row, self.tok, self.k or 0, self.kind, self.split)
            except RowError as err:
                if self.strict:
                    raise InteropError(f"{row.origin}: {err} (--strict refuses the import)") from None
                self.bad.append(BadRow(row.origin, str(err)))
                continue
            first = self.seen.setdefault(converted.record.record_id, row.origin)
            if first != row.origin:
                self.bad.append(BadRow(row.origin, f"the same text as {first} (duplicate record)"))
                continue
            yield converted


def shard_groups(rows: Iterator[SourceRow], size: int) -> Iterator[list[SourceRow]]:
    """Consecutive rows in lists of `size` (the last may hold fewer)."""
    group: list[SourceRow] = []
    for row in rows:
        group.append(row)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def rewrite_shard(folder: Path, relpath: str, k: int, missing: tuple[str, ...]) -> ShardInfo:
    """Write a shard again in the schema of the layer's `missing` statistics (their columns nullable): a shard
    written before a later one showed a statistic missing. Returns its new ShardInfo."""
    table = pq.read_table(folder / relpath).cast(with_missing(source_schema(k, "float32"), missing))
    return write_shard(table, folder, relpath)


def write_imported_layer(rows: Iterable[ImportedRow], *, fmt: str, input_dir: Path, model: str, out: str | Path,
                         kind: str, split: str = "train", rows_per_shard: int = 256, strict: bool = False,
                         overwrite: bool = False, extra: dict | None = None) -> tuple[Path, list[BadRow]]:
    """Write `out`/<model name>/ from imported rows; returns (its folder, the rows skipped with reasons).

    Rows are converted as they are read and written a shard at a time on writer threads
    (cache_builder.interop.writer), so memory holds a few shards and one record id per row (the duplicate
    check). A statistic missing in a later shard makes its column nullable in the layer's schema: the earlier
    shards that had it everywhere are then written again in that schema."""
    started = time.time()
    tok = Tokenizer.load(model)
    final = Path(out) / tok.name
    converter = RowConverter(tok, kind, split, strict)
    with staged_folder(final, overwrite) as folder, BackgroundWriter() as writer:
        writer.submit(write_vocab, folder, tok.surface)
        shard_missing: list[tuple[str, ...]] = []  # per shard: the statistics missing in it
        for i, group in enumerate(shard_groups(converter.convert(rows), rows_per_shard)):
            shard_missing.append(missing_of(group))
            writer.submit(write_shard, source_table(group, converter.k, "float32", shard_missing[-1]), folder,
                          f"shards/part-r00000-{i:05d}.parquet")
        bad, k = converter.bad, converter.k
        if not shard_missing:
            first = f"; first: {bad[0].origin}: {bad[0].reason}" if bad else ""
            raise InteropError(f"{input_dir}: no row could be imported ({len(bad)} bad rows{first})")
        vocab_file, *shards = writer.results()
        missing = in_manifest_order(set().union(*shard_missing))
        shards = [shard if shard_missing[i] == missing else rewrite_shard(folder, shard.path, k, missing)
                  for i, shard in enumerate(shards)]
        source = {
            "vocab_file": vocab_file, "name": tok.name, "identity": tok.identity,
            "add_bos": tok.add_bos, "tokenizer_fingerprint": tok.fingerprint,
            "tokenizer_convention": tok.surface.convention, "tokenizer_size": tok.tokenizer_size,
            "vocab_size": tok.vocab_size, "chat_template": f"as rendered by the {fmt} producer (imported)",
        }
        ids = "\n".join(converter.seen)  # every imported record's id, in layer order
        corpus = {
            "fingerprint": hashlib.sha256(ids.encode()).hexdigest(),
            "summary": {"records": len(converter.seen), "bad_records": len(bad),
                        "bad_reasons": dict(Counter(b.reason.split(" (")[0] for b in bad))},
            "bad_records": [{"origin": b.origin, "reason": b.reason} for b in bad],
        }
        build = {"imported_from": {"format": fmt, "path": str(input_dir), **(extra or {})}, "split": split,
                 "rows_per_shard": rows_per_shard, "seconds": round(time.time() - started, 1)}
        manifest = new_manifest("source", top_k=k, logit_dtype="float32", source=source, corpus=corpus, build=build,
                                shards=shards)
        manifest["missing_statistics"] = list(missing)
        manifest["topk_values"] = kind
        write_text_atomic(folder / CARD, dataset_card(manifest))
        write_manifest(folder, manifest)
    return final, bad
