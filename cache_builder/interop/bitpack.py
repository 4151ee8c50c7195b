"""Fixed-width bit packing, most significant bit first: DistillKit's layout for top-k token ids.

N integers of `bits` bits each become ceil(N * bits / 8) bytes: the bits of value 0 (MSB first), then those
of value 1, ..., the last byte zero-padded on the right. One position's ids are packed together, so a
position of k ids takes ceil(k * bits / 8) bytes.
"""

from __future__ import annotations

import numpy as np


def index_bits(vocab_size: int) -> int:
    """Bits per packed id for a vocabulary of `vocab_size` ids: ceil(log2(vocab_size)), as DistillKit computes it."""
    return int(np.ceil(np.log2(np.float32(vocab_size))))


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(..., N) non-negative integers -> (..., ceil(N * bits / 8)) uint8; each value keeps its low `bits` bits."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    v = np.asarray(values).astype(np.uint64)  # (..., N)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)  # (bits,) MSB first
    stream = ((v[..., None] >> shifts) & np.uint64(1)).astype(np.uint8)  # (..., N, bits)
    return np.packbits(stream.reshape(*v.shape[:-1], -1), axis=-1)  # (..., bytes), zero-padded


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: (..., M) uint8 -> (..., count) int64; ValueError if M bytes hold fewer bits."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    packed = np.asarray(packed, dtype=np.uint8)
    if count * bits > packed.shape[-1] * 8:
        raise ValueError(f"{count} values of {bits} bits need {count * bits} bits; the bytes hold {packed.shape[-1] * 8}")
    stream = np.unpackbits(packed, axis=-1, count=count * bits)  # (..., count * bits)
    stream = stream.reshape(*packed.shape[:-1], count, bits).astype(np.uint64)
    weights = np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64)  # (bits,)
    return (stream * weights).sum(axis=-1, dtype=np.uint64).astype(np.int64)  # (..., count)
