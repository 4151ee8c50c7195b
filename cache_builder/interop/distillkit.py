"""DistillKit's offline teacher format (arcee-ai/DistillKit).

Parquet shards `data_{i}.parquet` with `input_ids` list<uint64> (T tokens) and, per next-token position
(T-1 of them, position t = distribution of token t+1), either the raw columns its reader accepts
(`token_ids` list<list<int64>>, `top_values` list<list<float32>> raw log-probs, best first) or the compressed
ones (`compressed_logprobs`, `bytepacked_indices` list<list<uint8>>, one byte string per position) with the
`compression_config.yaml` that decodes them (logprob_codec.py, bitpack.py).

Kept: token ids, top-k ids, raw log-probs (so the tail mass 1 - sum p, and the gold log-prob where the gold
token is among the top-k). Lost: the text and response spans (rebuilt from the ids on import: the whole text
counts as response), logsumexp, mean, std of the logits.

A pivot-aligned layer has positions without a source partner and empty slots; DistillKit has a full grid and
no mask, so those get FuseLLM's fallback: the gold next token at log-prob 0 (a position without partner) and
id 0 at FILL_BELOW under the last kept value (an empty slot: probability ~1e-13 of the last, finite and
monotone for the polynomial tail).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from cache_builder.format import ragged
from cache_builder.interop.bitpack import pack_bits, unpack_bits
from cache_builder.interop.logprob_codec import CONFIG_FILE, CodecError, CompressionConfig, decode_logprobs, encode_logprobs
from cache_builder.interop.nested import Nested, nested_array
from cache_builder.interop.source_layer import ImportedRow
from cache_builder.interop.staging import InteropError
from cache_builder.interop.targets import TargetBatch
from cache_builder.interop.writer import write_peer_files
from cache_builder.reader import column_to_numpy

FILL_BELOW = 30.0
RAW_SCHEMA = pa.schema([
    pa.field("input_ids", pa.list_(pa.uint64())),
    pa.field("token_ids", pa.list_(pa.list_(pa.int64()))),
    pa.field("top_values", pa.list_(pa.list_(pa.float32()))),
])
COMPRESSED_SCHEMA = pa.schema([
    pa.field("input_ids", pa.list_(pa.uint64())),
    pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
    pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
])


def dense_targets(batch: TargetBatch) -> tuple[np.ndarray, np.ndarray]:
    """(P, K) ids and raw log-probs with a value in every slot (see the module docstring)."""
    logprobs = batch.raw_logprobs().astype(np.float32)  # (P, K), -inf in empty slots
    none = ~batch.usable  # (P,) positions that get the gold fallback
    kept = (batch.ids >= 0) & ~none[:, None]  # (P, K)
    last = np.where(kept, logprobs, np.inf).min(axis=1)  # (P,) the last kept value
    ids, last = np.where(kept, batch.ids, 0), np.where(none, 0.0, last)
    ids[none, 0], logprobs[none, 0], kept[none, 0] = batch.next_ids[none], 0.0, True
    return ids, np.where(kept, logprobs, (last - FILL_BELOW)[:, None]).astype(np.float32)


def export_table(batch: TargetBatch, config: CompressionConfig | None) -> pa.Table:
    """One shard's table: raw columns, or compressed ones when a config is given."""
    ids, logprobs = dense_targets(batch)  # (P, K), (P, K)
    n_tokens, n_pos = batch.input_ids.lengths, np.diff(batch.position_offsets)
    input_ids = ragged(batch.input_ids.values.astype(np.uint64), n_tokens, pa.uint64())
    if config is None:
        return pa.Table.from_arrays([input_ids, nested_array(ids, n_pos, pa.int64()),
                                     nested_array(logprobs, n_pos, pa.float32())], schema=RAW_SCHEMA)
    if config.k != ids.shape[1]:
        raise InteropError(f"the compression config has k={config.k} but the layer stores k={ids.shape[1]}")
    if ids.size and ids.max() >= 2 ** config.index_bits:
        raise InteropError(f"id {ids.max()} needs more than the {config.index_bits} bits of d={config.d}; raise d")
    packed_ids = pack_bits(ids, config.index_bits)  # (P, ceil(K * bits / 8))
    packed_values = encode_logprobs(logprobs, config)  # (P, logprob_bytes)
    return pa.Table.from_arrays([input_ids, nested_array(packed_values, n_pos, pa.uint8()),
                                 nested_array(packed_ids, n_pos, pa.uint8())], schema=COMPRESSED_SCHEMA)


def export(batches: Iterator[TargetBatch], folder: Path, config: CompressionConfig | None, rows_per_file: int) -> None:
    """Write data_{i}.parquet of at least `rows_per_file` rows each (and compression_config.yaml) into `folder`."""
    if config is not None:
        if config.error_diffusion:
            raise InteropError("error_diffusion: true is not supported by our encoder; set it to false (files decode "
                               "the same either way)")
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=True))
    write_peer_files((export_table(batch, config) for batch in batches), folder, "data_{}.parquet".format,
                     rows_per_file, use_dictionary=config is not None)  # byte columns: smaller and faster with one


def shard_files(folder: Path) -> list[Path]:
    """The folder's Parquet shards in DistillKit's order (data_0, data_1, ..., data_10), other names after."""
    def key(path: Path) -> tuple:
        match = re.fullmatch(r"data_(\d+)\.parquet", path.name)
        return (0, int(match.group(1)), "") if match else (1, 0, path.name)

    files = sorted(folder.glob("*.parquet"), key=key)
    if not files:
        raise InteropError(f"{folder} has no .parquet shards")
    return files


def read_config(folder: Path) -> CompressionConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InteropError(f"{folder}: compressed columns but no {CONFIG_FILE} beside them to decode them")
    try:
        return CompressionConfig.from_dict(yaml.safe_load(path.read_text()))
    except (CodecError, TypeError, yaml.YAMLError) as err:
        raise InteropError(f"{path}: {err}") from None


def import_rows(folder: Path) -> Iterator[ImportedRow]:
    """Every row of every shard, positions as stored (DistillKit's convention is ours)."""
    config = None
    for path in shard_files(folder):
        parquet = pq.ParquetFile(path)
        names = set(parquet.schema_arrow.names)
        if {"token_ids", "top_values"} <= names:
            columns = ["input_ids", "token_ids", "top_values"]
        elif {"compressed_logprobs", "bytepacked_indices"} <= names:
            columns = ["input_ids", "compressed_logprobs", "bytepacked_indices"]
            config = config or read_config(folder)
        elif "packed_indices" in names:
            raise InteropError(f"{path}: DistillKit's legacy compression (packed_indices, exact_values, coeffs) is not "
                               "supported; recapture with its current compressor or export raw top-k")
        else:
            raise InteropError(f"{path}: no DistillKit top-k columns (token_ids + top_values, or compressed_logprobs "
                               f"+ bytepacked_indices); it has {sorted(names)}")
        row_base = 0
        for batch in parquet.iter_batches(batch_size=256, columns=columns):
            input_ids = column_to_numpy(batch.column("input_ids"))
            first, second = Nested.of(batch.column(columns[1])), Nested.of(batch.column(columns[2]))
            for r in range(len(batch)):
                yield _row(f"{path.name} row {row_base + r}", input_ids.row(r), first.grid(r), second.grid(r), config)
            row_base += len(batch)


def _row(origin: str, input_ids: np.ndarray, first: np.ndarray | None, second: np.ndarray | None,
         config: CompressionConfig | None) -> ImportedRow:
    ids = input_ids.astype(np.int64)
    if first is None or second is None:
        return ImportedRow.broken(origin, ids, "its positions hold different numbers of candidates (ragged row)")
    if config is None:
        return ImportedRow(origin, ids, first.astype(np.int64), second.astype(np.float32))
    try:
        values = decode_logprobs(first, config)  # (P, k)
        topk = unpack_bits(second, config.index_bits, config.k)  # (P, k)
    except (CodecError, ValueError) as err:
        return ImportedRow.broken(origin, ids, f"its compressed top-k does not decode ({err})")
    return ImportedRow(origin, ids, topk, values)
