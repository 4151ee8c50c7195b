"""Streaming reader: cache shards -> numpy arrays, a row group at a time, no Python loop per token.

Shards may come from strangers: each is opened as a regular file (no symlink, no FIFO), and its Parquet
footer is checked against fixed bounds before any page is decoded (`check_footer`)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cache_builder.format import MANIFEST
from cache_builder.manifest import load_manifest
from cache_builder.schema import MAX_SHARD_BYTES
from cache_builder.untrusted import CacheError, open_regular, shown

# Footer bounds: a row group of our writer (64 rows) at k=64 and 2,048 tokens a row declares about 72 MB.
MAX_ROW_GROUPS = 4096
MAX_ROW_GROUP_BYTES = 256 << 20
MAX_ROW_GROUP_VALUES = 256 << 20


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


def check_footer(meta: pq.FileMetaData, file_size: int, where: str) -> None:
    """Bounds on a Parquet footer, checked before any page is decoded (decompression bombs): few row groups,
    each of bounded declared size and value count, no two row groups reading the same column chunk, every
    chunk inside the file."""
    if meta.num_row_groups > MAX_ROW_GROUPS:
        raise CacheError(f"{where}: {meta.num_row_groups} row groups, more than {MAX_ROW_GROUPS}")
    chunks = set()
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        declared = sum(group.column(c).total_uncompressed_size for c in range(group.num_columns))
        if max(declared, group.total_byte_size) > MAX_ROW_GROUP_BYTES:
            raise CacheError(f"{where}: row group {g} decodes to {max(declared, group.total_byte_size)} bytes, more "
                             f"than {MAX_ROW_GROUP_BYTES} (a decompression bomb?)")
        for c in range(group.num_columns):
            column = group.column(c)
            start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
            if column.num_values > MAX_ROW_GROUP_VALUES or column.num_values < 0:
                raise CacheError(f"{where}: row group {g} declares {column.num_values} values in one column, "
                                 f"more than {MAX_ROW_GROUP_VALUES}")
            if start is None or start < 0 or start + column.total_compressed_size > file_size or start in chunks:
                raise CacheError(f"{where}: row group {g} points at column chunks outside the file or shared with "
                                 "another row group (a decompression bomb?)")
            chunks.add(start)


def declared_values(meta: pq.FileMetaData, leaf: str) -> int:
    """The number of values the footer declares for one leaf column (e.g. "token_ids.list.element")."""
    index = [meta.schema.column(c).path for c in range(meta.num_columns)].index(leaf)
    return sum(meta.row_group(g).column(index).num_values for g in range(meta.num_row_groups))


@contextmanager
def open_shard(path: Path) -> Iterator[pq.ParquetFile]:
    """A shard opened safely: a regular file (no symlink, no FIFO) of bounded size, its footer checked."""
    with open_regular(path, MAX_SHARD_BYTES) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            parquet = pq.ParquetFile(f, pre_buffer=False)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise CacheError(f"{shown(path)}: not readable as Parquet ({shown(err)})") from None
        check_footer(parquet.metadata, size, shown(path))
        yield parquet


def row_groups(parquet: pq.ParquetFile, where: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The row groups of an open shard, decoded one at a time; a decoding failure is a CacheError."""
    for g in range(parquet.num_row_groups):
        try:
            yield parquet.read_row_group(g, columns=columns)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise CacheError(f"{where}: row group {g} not readable as Parquet ({shown(err)})") from None


def iter_row_groups(path: Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The row groups of one shard, one at a time (memory bounded by the largest, see check_footer)."""
    with open_shard(path) as parquet:
        yield from row_groups(parquet, shown(path), columns)


def iter_batches(
    folder: str | Path, columns: list[str] | None = None, batch_rows: int = 64
) -> Iterator[dict[str, np.ndarray | Ragged]]:
    """Yield the rows of a cache layer (a folder with a manifest) as dicts of numpy arrays.

    Shards are read in manifest order, a row group at a time, then cut into `batch_rows` rows, so memory
    stays bounded by one row group whatever the cache size. Checksums are NOT verified here: call
    `verify_cache` first.
    """
    folder = Path(folder)
    shards = [s["path"] for s in load_manifest(folder)["shards"]]
    yield from iter_shard_batches(folder, shards, columns, batch_rows)


def iter_shard_batches(
    folder: Path, shard_paths: list[str], columns: list[str] | None = None, batch_rows: int = 64
) -> Iterator[dict[str, np.ndarray | Ragged]]:
    """Like iter_batches, over the given shards (relative paths) of a folder that may have no manifest yet."""
    for relpath in shard_paths:
        for table in iter_row_groups(Path(folder) / relpath, columns):
            for batch in table.to_batches(max_chunksize=batch_rows):
                yield {name: column_to_numpy(batch.column(name)) for name in batch.schema.names}


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One whole shard as a table, read row group by row group through the footer checks."""
    with open_shard(path) as parquet:
        tables = list(row_groups(parquet, shown(path), columns))
        if not tables:
            schema = parquet.schema_arrow
            return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()
    return pa.concat_tables(tables)


def read_shard(folder: str | Path, relpath: str, columns: list[str] | None = None) -> dict[str, np.ndarray | Ragged]:
    """One whole shard (a few hundred rows) as numpy arrays."""
    table = read_table(Path(folder) / relpath, columns)
    return {name: column_to_numpy(table.column(name)) for name in table.schema.names}


def read_rows(folder: str | Path, columns: list[str] | None = None) -> dict[str, np.ndarray | Ragged]:
    """The whole layer in memory (small caches, tests, tools)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    table = pa.concat_tables([read_table(folder / s["path"], columns) for s in manifest["shards"]])
    return {name: column_to_numpy(table.column(name)) for name in table.schema.names}


__all__ = ["Ragged", "check_footer", "column_to_numpy", "declared_values", "iter_batches", "iter_row_groups", "iter_shard_batches",
           "open_shard", "read_rows", "row_groups", "read_shard", "read_table", "MANIFEST"]
