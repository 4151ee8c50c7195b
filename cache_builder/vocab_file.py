"""The source vocabulary stored inside a cache (`vocab.parquet`), so the cache is self-contained.

cache-align maps a source's top-k ids into any pivot vocabulary from this file alone: a lab that
downloads a cache needs the pivot's tokenizer, never the source model or its tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from alignment import TokenSurface, surface_fingerprint
from cache_builder.format import PARQUET_OPTIONS, sha256_file, write_parquet_atomic
from cache_builder.manifest import CacheError
from cache_builder.reader import open_shard, read_table
from cache_builder.untrusted import sha256_regular, shown

VOCAB_FILE = "vocab.parquet"
MAX_VOCAB_BYTES = 1 << 30
VOCAB_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int32(), nullable=False),
        pa.field("piece", pa.binary(), nullable=False),  # the token's exact bytes ('' for special tokens)
        pa.field("special", pa.bool_(), nullable=False),
        pa.field("special_name", pa.string()),  # e.g. "<bos>" for special tokens, else null
    ]
)


def write_vocab(folder: Path, surface: TokenSurface) -> dict:
    """Write vocab.parquet; returns the manifest entry {path, sha256, convention, fingerprint}."""
    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(len(surface.pieces), dtype=np.int32)),
            pa.array(surface.pieces, pa.binary()),
            pa.array(np.asarray(surface.is_special, dtype=bool)),
            pa.array([surface.special_names.get(i) for i in range(len(surface.pieces))], pa.string()),
        ],
        schema=VOCAB_SCHEMA.with_metadata({"convention": surface.convention, "dummy_prefix": str(surface.dummy_prefix)}),
    )
    path = folder / VOCAB_FILE
    write_parquet_atomic(table, path, **{k: v for k, v in PARQUET_OPTIONS.items() if k != "use_dictionary"})
    return {"path": VOCAB_FILE, "sha256": sha256_file(path), "convention": surface.convention,
            "dummy_prefix": surface.dummy_prefix, "fingerprint": surface_fingerprint(surface)}


def _checked_path(folder: Path, manifest: dict) -> Path:
    """vocab.parquet of a cache, a regular file whose sha256 is the manifest's; CacheError otherwise."""
    entry = manifest["source"].get("vocab_file")
    if not entry or entry.get("path") != VOCAB_FILE:
        raise CacheError(f"{shown(folder)}: the manifest names no {VOCAB_FILE}; this cache cannot be re-aligned")
    path = folder / VOCAB_FILE
    if sha256_regular(path, MAX_VOCAB_BYTES)[1] != entry["sha256"]:
        raise CacheError(f"{shown(path)}: sha256 mismatch (the vocabulary was modified or corrupted)")
    return path


def vocab_rows(folder: Path, manifest: dict) -> int:
    """The number of tokens in a cache's vocab.parquet (checked, from its footer; nothing decoded)."""
    path = _checked_path(folder, manifest)
    with open_shard(path) as parquet:
        if not parquet.schema_arrow.equals(VOCAB_SCHEMA, check_metadata=False):
            raise CacheError(f"{shown(path)}: schema differs from the vocabulary schema")
        return parquet.metadata.num_rows


def read_vocab(folder: Path, manifest: dict) -> TokenSurface:
    """The source's TokenSurface from vocab.parquet, checked against the manifest's sha256 and fingerprint."""
    path = _checked_path(folder, manifest)
    table = read_table(path)
    if not table.schema.equals(VOCAB_SCHEMA, check_metadata=False):
        raise CacheError(f"{shown(path)}: schema differs from the vocabulary schema")
    if not np.array_equal(table.column("id").to_numpy(), np.arange(table.num_rows)):
        raise CacheError(f"{shown(path)}: ids are not 0, 1, 2, ... in order")
    entry = manifest["source"]["vocab_file"]
    surface = TokenSurface(
        convention=entry["convention"],
        pieces=table.column("piece").to_pylist(),
        is_special=table.column("special").to_numpy(zero_copy_only=False),
        dummy_prefix=bool(entry.get("dummy_prefix", False)),
        special_names={i: n for i, n in enumerate(table.column("special_name").to_pylist()) if n is not None},
    )
    if surface_fingerprint(surface) != entry["fingerprint"]:
        raise CacheError(f"{shown(path)}: the vocabulary does not match the tokenizer fingerprint in the manifest")
    return surface
