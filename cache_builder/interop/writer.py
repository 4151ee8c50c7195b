"""Writing many Parquet files while the next one is computed: the pool every exporter and the importer share.

An export reads the layer, computes a table and writes it; writing with zstd costs more than reading, so it
runs on background threads (pyarrow releases the GIL while it encodes and compresses) while the main thread
reads and converts the next rows. Files are written atomically (cache_builder.format), results come back in
submission order, and the first failure is raised by `results()` or when the `with` block ends.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa

from cache_builder.format import write_parquet_atomic

WRITER_THREADS = 2
# Files for a peer's reader: one row group, no statistics (no peer reads them), no dictionary pages (top-k
# values have too many distinct values for one, and trying costs a quarter of the write); an exporter whose
# columns are all small integers (DistillKit's compressed bytes) turns dictionaries back on.
PEER_PARQUET = dict(compression="zstd", use_dictionary=False, write_statistics=False)


class BackgroundWriter:
    """A bounded pool of writer threads; `submit(fn, ...)` returns at once unless `WRITER_THREADS` writes wait."""

    def __init__(self, threads: int = WRITER_THREADS):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="interop-writer")
        self._pending: list[Future] = []
        self._limit = threads

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        """Run fn(*args, **kwargs) on a writer thread; blocks while as many writes as threads are still queued,
        and raises the failure of an earlier write as soon as it is seen."""
        for future in self._pending:
            if future.done() and future.exception() is not None:
                future.result()
        waiting = [f for f in self._pending if not f.done()]
        if len(waiting) >= self._limit:
            waiting[0].result()  # memory stays bounded by a few tables
        self._pending.append(self._pool.submit(fn, *args, **kwargs))

    def results(self) -> list:
        """Every submitted write's result, in submission order; re-raises the first failure."""
        return [f.result() for f in self._pending]

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            for future in self._pending:
                future.cancel()
        self._pool.shutdown(wait=True)
        if kind is None:
            self.results()


def grouped_tables(tables: Iterable[pa.Table], min_rows: int) -> Iterator[pa.Table]:
    """Consecutive tables joined into tables of at least `min_rows` rows (the last may have fewer)."""
    group: list[pa.Table] = []
    rows = 0
    for table in tables:
        group.append(table)
        rows += table.num_rows
        if rows >= min_rows:
            yield pa.concat_tables(group).combine_chunks()
            group, rows = [], 0
    if group:
        yield pa.concat_tables(group).combine_chunks()


def write_peer_files(tables: Iterable[pa.Table], folder: Path, name: Callable[[int], str], min_rows: int,
                     **options) -> None:
    """Write the tables, joined to at least `min_rows` rows each, as folder/name(i) on writer threads, with
    PEER_PARQUET updated by `options`."""
    with BackgroundWriter() as writer:
        for i, table in enumerate(grouped_tables(tables, min_rows)):
            writer.submit(write_parquet_atomic, table, folder / name(i), **{**PEER_PARQUET, **options})
