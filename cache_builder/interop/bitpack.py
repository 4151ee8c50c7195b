"""Fixed-width bit packing, most significant bit first: DistillKit's layout for top-k token ids.

N integers of `bits` bits each become ceil(N * bits / 8) bytes: the bits of value 0 (MSB first), then those
of value 1, ..., the last byte zero-padded on the right. One position's ids are packed together, so a
position of k ids takes ceil(k * bits / 8) bytes.

Both directions go through each value's 8 big-endian bytes: a width that is a whole number of bytes is a
slice of them; any other width is a slice of their 64 bits (np.unpackbits / np.packbits), one uint8 per bit.
"""

from __future__ import annotations

import numpy as np


def index_bits(vocab_size: int) -> int:
    """Bits per packed id for a vocabulary of `vocab_size` ids: ceil(log2(vocab_size)), as DistillKit computes it."""
    return int(np.ceil(np.log2(np.float32(vocab_size))))


def _check(bits: int) -> None:
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(..., N) non-negative integers -> (..., ceil(N * bits / 8)) uint8; each value keeps its low `bits` bits."""
    _check(bits)
    v = np.asarray(values).astype(">u8")  # (..., N) big-endian
    lead, n = v.shape[:-1], v.shape[-1]
    octets = v.view(np.uint8).reshape(*lead, n, 8)  # (..., N, 8) most significant byte first
    if bits % 8 == 0:
        return np.ascontiguousarray(octets[..., 8 - bits // 8 :]).reshape(*lead, n * bits // 8)
    stream = np.unpackbits(octets, axis=-1)[..., 64 - bits :]  # (..., N, bits) MSB first
    return np.packbits(stream.reshape(*lead, n * bits), axis=-1)  # (..., bytes), zero-padded


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: (..., M) uint8 -> (..., count) int64; ValueError if M bytes hold fewer bits."""
    _check(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if count * bits > packed.shape[-1] * 8:
        raise ValueError(f"{count} values of {bits} bits need {count * bits} bits; the bytes hold {packed.shape[-1] * 8}")
    lead = packed.shape[:-1]
    octets = np.zeros((*lead, count, 8), dtype=np.uint8)  # (..., count, 8) big-endian, zero high bytes
    if bits % 8 == 0:
        octets[..., 8 - bits // 8 :] = packed[..., : count * bits // 8].reshape(*lead, count, bits // 8)
    else:
        stream = np.unpackbits(packed, axis=-1, count=count * bits).reshape(*lead, count, bits)
        octets = np.packbits(np.concatenate([np.zeros((*lead, count, 64 - bits), np.uint8), stream], axis=-1), axis=-1)
    return octets.view(">u8")[..., 0].astype(np.int64)  # (..., count)
