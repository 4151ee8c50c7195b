"""Arrow list<list<x>> columns <-> numpy (positions, k) grids: the shape every peer format stores top-k in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cache_builder.format import offsets_from_lengths


@dataclass(frozen=True)
class Nested:
    """A list<list<x>> column: row r holds positions rows[r]:rows[r+1]; position p holds values[cells[p]:cells[p+1]]."""

    rows: np.ndarray  # (R+1,) int64
    cells: np.ndarray  # (P+1,) int64
    values: np.ndarray  # (C,)

    @classmethod
    def of(cls, column: pa.Array | pa.ChunkedArray) -> "Nested":
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        rows = column.offsets.to_numpy().astype(np.int64)
        inner = column.flatten() if rows[0] == 0 else column.values.slice(rows[0], rows[-1] - rows[0])
        rows = rows - rows[0]
        cells = inner.offsets.to_numpy().astype(np.int64)
        values = inner.values.slice(cells[0], cells[-1] - cells[0]).to_numpy(zero_copy_only=False)
        return cls(rows, cells - cells[0], values)

    def grid(self, r: int) -> np.ndarray | None:
        """Row r as a (positions, k) array, or None when its positions hold different numbers of values."""
        first, last = self.rows[r], self.rows[r + 1]
        widths = np.diff(self.cells[first : last + 1])
        if len(widths) and (widths != widths[0]).any():
            return None
        k = int(widths[0]) if len(widths) else 0
        return self.values[self.cells[first] : self.cells[last]].reshape(last - first, k)


def nested_array(values: np.ndarray, row_lengths: np.ndarray, value_type: pa.DataType,
                 cell_lengths: np.ndarray | None = None) -> pa.ListArray:
    """Concatenated cells -> list<list<value_type>>: row r has row_lengths[r] positions; a (P, k) `values` grid
    gives every position k values, a flat `values` with `cell_lengths` (P,) gives position p cell_lengths[p]."""
    if cell_lengths is None:
        cell_lengths = np.full(values.shape[0], values.shape[1] if values.ndim == 2 else 1, dtype=np.int64)
    inner = pa.ListArray.from_arrays(pa.array(offsets_from_lengths(cell_lengths)),
                                     pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type))
    return pa.ListArray.from_arrays(pa.array(offsets_from_lengths(row_lengths)), inner)

