"""Streaming reader: cache shards -> numpy arrays, a row group at a time, no Python loop per token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cache_builder.format import MANIFEST
from cache_builder.manifest import load_manifest


@dataclass(frozen=True)
class Ragged:
    """A column of variable-length rows: row i is values[offsets[i]:offsets[i+1]]."""

    values: np.ndarray  # (N,) or (N, K)
    offsets: np.ndarray  # (R+1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def column_to_numpy(column: pa.Array) -> np.ndarray | Ragged:
    """Arrow column -> numpy: scalars to (R,), list<x> to Ragged (N,), list<fixed_size_list<K>> to Ragged (N, K)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_list(column.type):
        return column.to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    inner = column.flatten()
    if pa.types.is_fixed_size_list(inner.type):
        k = inner.type.list_size
        values = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    elif pa.types.is_struct(inner.type):
        values = np.stack([inner.field(i).to_numpy(zero_copy_only=False) for i in range(inner.type.num_fields)], axis=1)
    else:
        values = inner.to_numpy(zero_copy_only=False)
    return Ragged(values, offsets)


def iter_batches(
    folder: str | Path, columns: list[str] | None = None, batch_rows: int = 64
) -> Iterator[dict[str, np.ndarray | Ragged]]:
    """Yield the rows of a cache layer (a folder with a manifest) as dicts of numpy arrays.

    Shards are read in manifest order, `batch_rows` rows at a time, so memory stays bounded by one
    batch whatever the cache size. Checksums are NOT verified here: call `verify_cache` first.
    """
    folder = Path(folder)
    shards = [s["path"] for s in load_manifest(folder)["shards"]]
    yield from iter_shard_batches(folder, shards, columns, batch_rows)


def iter_shard_batches(
    folder: Path, shard_paths: list[str], columns: list[str] | None = None, batch_rows: int = 64
) -> Iterator[dict[str, np.ndarray | Ragged]]:
    """Like iter_batches, over the given shards (relative paths) of a folder that may have no manifest yet."""
    for relpath in shard_paths:
        parquet = pq.ParquetFile(Path(folder) / relpath)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            yield {name: column_to_numpy(batch.column(name)) for name in batch.schema.names}


def read_shard(folder: str | Path, relpath: str, columns: list[str] | None = None) -> dict[str, np.ndarray | Ragged]:
    """One whole shard (a few hundred rows) as numpy arrays."""
    table = pq.read_table(Path(folder) / relpath, columns=columns)
    return {name: column_to_numpy(table.column(name)) for name in table.schema.names}


def read_rows(folder: str | Path, columns: list[str] | None = None) -> dict[str, np.ndarray | Ragged]:
    """The whole layer in memory (small caches, tests, tools)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    tables = [pq.read_table(folder / s["path"], columns=columns) for s in manifest["shards"]]
    table = pa.concat_tables(tables)
    return {name: column_to_numpy(table.column(name)) for name in table.schema.names}


__all__ = ["Ragged", "column_to_numpy", "iter_batches", "iter_shard_batches", "read_rows", "read_shard", "MANIFEST"]
