"""The cache format, version 1: Parquet schemas, shard writing, the manifest.

A cache folder holds one source model's signals over one corpus:

    cache/<source>/
        manifest.json                 written LAST, atomically: a folder without it is not a cache
        README.md                     generated dataset card
        shards/part-r00000-00000.parquet ...
        aligned/<pivot>/              the same rows on a pivot's tokens (its own manifest + shards)

Everything is plain Parquet (zstd) readable by pyarrow, polars or duckdb; no pickle, no code. The
schemas below are the contract between cache_builder and fuse_trainer (see docs/contracts.md). All
offsets are UTF-8 byte offsets into the row's canonical text; per-position arrays have one entry per
prediction (T-1 for T tokens), position t predicting token t+1.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_NAME = "logit-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CARD = "README.md"
SHARD_DIR = "shards"
ALIGNED_DIR = "aligned"
LOGIT_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
# Deterministic writer settings: equal tables give equal bytes (resume relies on it). Small row groups
# let readers stream a shard with bounded memory. Byte-stream-split on the top-k logits groups the bytes of
# equal significance (sign and exponent bits are alike) before zstd: 224.8 -> 215.6 B/token at k=64
# (benchmarks/README.md). Only on floats, where every Parquet reader has it; on the int32 ids it would save
# 10 B/token more, but readers older than 2024 cannot decode integer byte-stream-split.
TOPK_LEAVES = [f"{name}.list.element.list.element" for name in ("topk_logits", "native_topk_logits")]
PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=["record_id", "doc_id", "domain", "split"],
    use_byte_stream_split=TOPK_LEAVES,
    write_statistics=False,
    row_group_size=64,
)


def _per_position(value_type: pa.DataType) -> pa.DataType:
    return pa.list_(value_type)


def _per_position_topk(value_type: pa.DataType, k: int) -> pa.DataType:
    return pa.list_(pa.list_(value_type, k))  # (T-1, K) as list<fixed_size_list<K>>


def _stats_fields() -> list[pa.Field]:
    return [
        pa.field("logsumexp", _per_position(pa.float32()), nullable=False),
        pa.field("logit_mean", _per_position(pa.float32()), nullable=False),
        pa.field("logit_std", _per_position(pa.float32()), nullable=False),
        pa.field("z_logsumexp", _per_position(pa.float32()), nullable=False),
        pa.field("gold_logprob", _per_position(pa.float32()), nullable=False),
    ]


def source_schema(k: int, logit_dtype: str) -> pa.Schema:
    """Source-native rows: one per record window, in the source model's own tokenization."""
    return pa.schema(
        [
            pa.field("record_id", pa.string(), nullable=False),
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("window", pa.int32(), nullable=False),
            pa.field("domain", pa.string()),
            pa.field("split", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("response_spans", pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32())])), nullable=False),
            pa.field("num_tokens", pa.int32(), nullable=False),
            pa.field("mean_nll", pa.float32(), nullable=False),
            pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("token_end", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_ids", _per_position_topk(pa.int32(), k), nullable=False),
            pa.field("topk_logits", _per_position_topk(LOGIT_DTYPES[logit_dtype], k), nullable=False),
            *_stats_fields(),
        ],
        metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "layer": "source"},
    )


def aligned_schema(k: int) -> pa.Schema:
    """Pivot-aligned rows: a source's signals gathered at the pivot positions that have a partner."""
    return pa.schema(
        [
            pa.field("record_id", pa.string(), nullable=False),
            pa.field("domain", pa.string()),
            pa.field("split", pa.string(), nullable=False),
            pa.field("num_tokens", pa.int32(), nullable=False),
            pa.field("token_ids", pa.list_(pa.int32()), nullable=False),  # pivot tokens (T_p)
            pa.field("token_end", pa.list_(pa.int32()), nullable=False),
            pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),  # (T_p-1) predicts a response byte
            pa.field("aligned_pos", pa.list_(pa.int32()), nullable=False),  # (A) pivot positions with a partner
            pa.field("src_pos", pa.list_(pa.int32()), nullable=False),  # (A) the partner source positions
            pa.field("topk_ids", _per_position_topk(pa.int32(), k), nullable=False),  # pivot ids, -1 = empty
            pa.field("topk_logits", _per_position_topk(pa.float32(), k), nullable=False),
            pa.field("native_topk_logits", _per_position_topk(pa.float32(), k), nullable=False),  # before mapping
            *_stats_fields(),
            pa.field("kept_mass", _per_position(pa.float32()), nullable=False),
            pa.field("chunk_logprob", _per_position(pa.float32()), nullable=False),
        ],
        metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "layer": "aligned"},
    )


# ----------------------------------------------------------------------------------------------
# numpy -> Arrow, without Python loops per token
# ----------------------------------------------------------------------------------------------


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def ragged(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """Concatenated values (N, ...) + per-row lengths -> list<value_type> (one list per row)."""
    return pa.ListArray.from_arrays(pa.array(offsets_from_lengths(lengths)), pa.array(values, type=value_type))


def ragged_topk(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """Concatenated (N, K) arrays + per-row lengths -> list<fixed_size_list<K>>."""
    k = values.shape[1]
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), k)
    return pa.ListArray.from_arrays(pa.array(offsets_from_lengths(lengths)), inner)


def table_from_columns(schema: pa.Schema, columns: dict[str, pa.Array]) -> pa.Table:
    """Build a table in exactly `schema` (types are never inferred); a missing column is an error."""
    missing = set(schema.names) - set(columns)
    if missing:
        raise KeyError(f"columns missing for the {schema.metadata[b'layer'].decode()} schema: {sorted(missing)}")
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


# ----------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_and_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _temporary_beside(final: Path) -> tuple[int, Path]:
    """A new, exclusively created temporary file in `final`'s folder (never an existing name or a symlink)."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    return fd, Path(name)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a new temporary file in the same folder, fsync, then rename over `path`."""
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _fsync_and_rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the cache folder, always under shards/
    rows: int
    tokens: int
    bytes: int
    sha256: str


def write_parquet_atomic(table: pa.Table, final: Path, **options) -> None:
    """Write a Parquet file to a new temporary file, fsync it, then rename it to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_beside(final)
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, **options)
        _fsync_and_rename(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(table: pa.Table, folder: Path, relpath: str) -> ShardInfo:
    """Write one shard atomically and describe it for the manifest."""
    write_parquet_atomic(table, folder / relpath, **PARQUET_OPTIONS)
    return shard_info(folder, relpath)


def shard_info(folder: Path, relpath: str) -> ShardInfo:
    """Describe an existing shard: row and token counts from its metadata, size and sha256 from its bytes."""
    path = folder / relpath
    meta = pq.ParquetFile(path)
    tokens = int(pq.read_table(path, columns=["num_tokens"]).column(0).to_numpy().sum())
    return ShardInfo(relpath, meta.metadata.num_rows, tokens, path.stat().st_size, sha256_file(path))


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def write_manifest(folder: Path, manifest: dict) -> None:
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def new_manifest(layer: str, *, top_k: int, logit_dtype: str, source: dict, corpus: dict, build: dict,
                 shards: list[ShardInfo], pivot: dict | None = None) -> dict:
    """The manifest of a finished cache layer (`source` or `aligned`)."""
    from cache_builder import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layer": layer,
        "created_by": f"logit-cache-fusion {__version__}",
        "top_k": top_k,
        "logit_dtype": logit_dtype,
        "source": source,
        "pivot": pivot,
        "corpus": corpus,
        "build": build,
        "shards": [asdict(s) for s in shards],
        "totals": {
            "rows": sum(s.rows for s in shards),
            "tokens": sum(s.tokens for s in shards),
            "bytes": sum(s.bytes for s in shards),
        },
    }


def expected_schema(manifest: dict) -> pa.Schema:
    if manifest["layer"] == "source":
        schema = source_schema(manifest["top_k"], manifest["logit_dtype"])
    else:
        schema = aligned_schema(manifest["top_k"])
    return with_missing(schema, missing_statistics(manifest))


# ----------------------------------------------------------------------------------------------
# Imported layers: statistics their producer did not keep (cache-import)
#
# A cache imported from another tool's format (DistillKit, axolotl, FuseLLM) holds top-k values
# only. The statistics those tools never stored are written as nulls, never invented, and named in
# the manifest's `missing_statistics`; `topk_values` says what the top-k values are. Per-position
# nulls sit inside the lists (the row keeps one entry per position); `mean_nll` becomes a nullable
# scalar. Readers see the nulls as NaN (reader.column_to_numpy).
# ----------------------------------------------------------------------------------------------

# What `topk_logits` holds: raw logits (our builds), raw log-probs (logits - logsumexp, whose
# full-vocabulary logsumexp is 0 by definition), or log-probs renormalised over the kept k.
TOPK_VALUES = ("logits", "logprobs", "renormalized-logprobs")
NULLABLE_EXTRA = ("mean_nll", "kept_mass", "chunk_logprob")  # besides STAT_COLUMNS, which may all be missing


def missing_statistics(manifest: dict) -> tuple[str, ...]:
    """Statistics stored as nulls in this layer (wholly or at some positions); () for a built cache."""
    return tuple(manifest.get("missing_statistics", ()))


def topk_values(manifest: dict) -> str:
    """What the layer's top-k values are (one of TOPK_VALUES); "logits" for a built cache."""
    return manifest.get("topk_values", "logits")


def with_missing(schema: pa.Schema, missing: tuple[str, ...]) -> pa.Schema:
    """`schema` with the named statistic columns nullable (a null mean_nll; per-position lists already take nulls)."""
    nullable = STAT_COLUMNS + NULLABLE_EXTRA
    for name in missing:
        if name not in nullable:
            raise ValueError(f"{name!r} cannot be missing; only {nullable} can")
        if name in schema.names:
            i = schema.get_field_index(name)
            schema = schema.set(i, schema.field(i).with_nullable(True))
    return schema


def nullable_ragged(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.ListArray:
    """Like `ragged` for a float statistic, with NaN written as null (a missing value)."""
    values = np.asarray(values, dtype=np.float32)
    nan = np.isnan(values)
    inner = pa.array(values, value_type, mask=nan if nan.any() else None)
    return pa.ListArray.from_arrays(pa.array(offsets_from_lengths(lengths)), inner)


# ----------------------------------------------------------------------------------------------
# Rows -> tables
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRow:
    """One scored record window: what a source-native row holds, as numpy arrays."""

    record: object  # cache_builder.corpus.Record
    token_ids: np.ndarray  # (T,) int32
    token_end: np.ndarray  # (T,) int32 byte offsets
    scored: object  # cache_builder.scoring.ScoredSequence, arrays of (T-1, K) and (T-1,)
    mean_nll: float


STAT_COLUMNS = ("logsumexp", "logit_mean", "logit_std", "z_logsumexp", "gold_logprob")


def source_table(rows: list[SourceRow], k: int, logit_dtype: str, missing: tuple[str, ...] = ()) -> pa.Table:
    """Source-native rows -> a table in `source_schema(k, logit_dtype)`; NaN in the `missing` statistics
    (an imported layer's) is written as null."""
    schema = with_missing(source_schema(k, logit_dtype), missing)
    n_tokens = np.array([len(r.token_ids) for r in rows], dtype=np.int32)
    n_pos = np.maximum(n_tokens - 1, 0)
    records = [r.record for r in rows]
    spans = [[{"start": s, "end": e} for s, e in rec.response_spans] for rec in records]

    def cat(name: str, dtype) -> np.ndarray:
        parts = [np.asarray(getattr(r.scored, name), dtype=dtype) for r in rows]
        return np.concatenate(parts) if parts else np.zeros((0,), dtype)

    columns = {
        "record_id": pa.array([r.record_id for r in records], pa.string()),
        "doc_id": pa.array([r.doc_id for r in records], pa.string()),
        "window": pa.array([r.window for r in records], pa.int32()),
        "domain": pa.array([r.domain for r in records], pa.string()),
        "split": pa.array([r.split for r in records], pa.string()),
        "text": pa.array([r.text for r in records], pa.string()),
        "response_spans": pa.array(spans, schema.field("response_spans").type),
        "num_tokens": pa.array(n_tokens, pa.int32()),
        "mean_nll": pa.array([r.mean_nll for r in rows], pa.float32(), from_pandas="mean_nll" in missing),
        "token_ids": ragged(np.concatenate([r.token_ids for r in rows]).astype(np.int32), n_tokens, pa.int32()),
        "token_end": ragged(np.concatenate([r.token_end for r in rows]).astype(np.int32), n_tokens, pa.int32()),
        "topk_ids": ragged_topk(cat("topk_ids", np.int32).reshape(-1, k), n_pos, pa.int32()),
        "topk_logits": ragged_topk(cat("topk_logits", logit_dtype).reshape(-1, k), n_pos, LOGIT_DTYPES[logit_dtype]),
    }
    for name in STAT_COLUMNS:
        columns[name] = (nullable_ragged if name in missing else ragged)(cat(name, np.float32), n_pos, pa.float32())
    return table_from_columns(schema, columns)
