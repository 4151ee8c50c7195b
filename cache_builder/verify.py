"""cache-verify: everything a lab checks before it trusts a cache it downloaded.

Checks, in order, each reported with the file it concerns:
1. manifest: JSON, format name and version, shard paths confined to shards/ (see manifest.py);
2. shards: present, regular files, size and sha256 as recorded, Parquet that opens, schema exactly the
   versioned schema, row and token counts as recorded;
3. values: lengths consistent per row, floats finite, token and top-k ids inside the vocabulary, top-k
   sorted, record ids unique;
4. an aligned layer next to its source-native cache: aligned from that very build (manifest sha256);
5. across sources (a cache root): the same record ids, corpus fingerprint and pivot fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cache_builder.format import ALIGNED_DIR, MANIFEST, expected_schema, missing_statistics, sha256_file
from cache_builder.manifest import CacheError, check_shard_path, find_layers, load_manifest
from cache_builder.reader import column_to_numpy

FLOAT_COLUMNS = ("logsumexp", "logit_mean", "logit_std", "z_logsumexp", "gold_logprob", "kept_mass", "chunk_logprob")


def _check_values(name: str, columns: dict, manifest: dict) -> list[str]:
    """Per-row consistency and value ranges of one shard (vectorised over the whole shard)."""
    problems = []
    n_tokens = columns["num_tokens"].astype(np.int64)
    n_pos = np.maximum(n_tokens - 1, 0)
    aligned = manifest["layer"] == "aligned"
    vocab = manifest["pivot"]["vocab_size"] if aligned else manifest["source"]["vocab_size"]
    for col in ("token_ids", "token_end"):
        if not np.array_equal(columns[col].lengths, n_tokens):
            problems.append(f"{name}: {col} lengths disagree with num_tokens")
    per_row = columns["aligned_pos"].lengths if aligned else n_pos
    per_position = ("topk_ids", "topk_logits", "logsumexp", "logit_mean", "logit_std", "z_logsumexp", "gold_logprob")
    if aligned:
        per_position += ("native_topk_logits", "src_pos", "kept_mass", "chunk_logprob")
    for col in per_position:
        if not np.array_equal(columns[col].lengths, per_row):
            problems.append(f"{name}: {col} has the wrong number of positions per row")
    if aligned:
        if not np.array_equal(columns["loss_mask"].lengths, n_pos):
            problems.append(f"{name}: loss_mask has the wrong number of positions per row")
        pos = columns["aligned_pos"].values
        row_of = np.repeat(np.arange(len(n_pos)), columns["aligned_pos"].lengths)
        if pos.size and (pos.min() < 0 or np.any(pos >= n_pos[row_of])):
            problems.append(f"{name}: aligned_pos outside the row's positions")
    missing = missing_statistics(manifest)  # imported layers: nulls (read as NaN) allowed there, nowhere else
    for col in FLOAT_COLUMNS + ("topk_logits", "native_topk_logits"):
        if col not in columns:
            continue
        values = columns[col].values.astype(np.float32)
        if not np.all(np.isfinite(values[~np.isnan(values)] if col in missing else values)):
            problems.append(f"{name}: {col} contains NaN or infinite values")
    ids = columns["token_ids"].values
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        problems.append(f"{name}: token ids outside the vocabulary [0, {vocab})")
    topk = columns["topk_ids"].values
    low = -1 if aligned else 0
    if topk.size and (topk.min() < low or topk.max() >= vocab):
        problems.append(f"{name}: top-k ids outside the vocabulary [{low}, {vocab})")
    logits = columns["topk_logits"].values.astype(np.float32)
    if not aligned and logits.size and np.any(np.diff(logits, axis=1) > 0):
        problems.append(f"{name}: top-k logits are not sorted in descending order")
    return problems


def stale_alignment(folder: Path, manifest: dict) -> list[str]:
    """A problem if `folder` is an aligned layer made from another build than the source cache beside it
    (rebuilt since); [] for a source-native layer or an aligned layer shared without its source."""
    folder = Path(folder)
    source_manifest = folder.parent.parent / MANIFEST
    if manifest["layer"] != "aligned" or folder.parent.name != ALIGNED_DIR or not source_manifest.is_file():
        return []
    if manifest["build"].get("source_manifest_sha256") == sha256_file(source_manifest):
        return []
    return [f"{folder}: aligned from an earlier build of {folder.parent.parent} (its manifest changed since); rerun "
            f"`cache-align --cache {folder.parent.parent} --pivot {folder.name}`"]


def verify_layer(folder: Path, *, deep: bool = True) -> tuple[list[str], list[str]]:
    """(problems, record ids) of one cache layer. No problem means the layer is safe to use."""
    try:
        manifest = load_manifest(folder)
    except CacheError as err:
        return [str(err)], []
    problems: list[str] = stale_alignment(folder, manifest)
    schema = expected_schema(manifest)
    ids: list[str] = []
    for shard in manifest["shards"]:
        path = check_shard_path(folder, shard["path"])
        if not path.is_file():
            problems.append(f"{path}: shard listed in the manifest is missing")
            continue
        if path.stat().st_size != shard["bytes"]:
            problems.append(f"{path}: size {path.stat().st_size} != {shard['bytes']} recorded (truncated or replaced)")
            continue
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 mismatch (the shard was modified or corrupted)")
            continue
        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - any Parquet decoding failure is a corrupt shard
            problems.append(f"{path}: not readable as Parquet ({err})")
            continue
        if not table.schema.equals(schema, check_metadata=False):
            problems.append(f"{path}: schema differs from the format v{manifest['format_version']} {manifest['layer']} schema")
            continue
        columns = {n: column_to_numpy(table.column(n)) for n in table.schema.names}
        if table.num_rows != shard["rows"] or int(columns["num_tokens"].sum()) != shard["tokens"]:
            problems.append(f"{path}: row or token count differs from the manifest")
        if deep:
            problems += _check_values(str(path), columns, manifest)
        ids += list(columns["record_id"])
    duplicates = len(ids) - len(set(ids))
    if duplicates:
        problems.append(f"{folder}: {duplicates} duplicate record ids")
    return problems, ids


def verify_cache(path: str | Path, *, deep: bool = True) -> list[str]:
    """All problems found in a cache layer or a cache root with several sources; [] means verified."""
    layers = find_layers(path)
    if not layers:
        try:
            load_manifest(path)
        except CacheError as err:
            return [str(err)]
    problems: list[str] = []
    id_sets: dict[Path, set[str]] = {}
    corpus: dict[Path, str] = {}
    pivots: dict[Path, str] = {}
    for layer in layers:
        layer_problems, ids = verify_layer(layer, deep=deep)
        problems += layer_problems
        if not layer_problems:
            manifest = load_manifest(layer)
            id_sets[layer] = set(ids)
            corpus[layer] = manifest["corpus"]["fingerprint"]
            if manifest["layer"] == "aligned":
                pivots[layer] = manifest["pivot"]["tokenizer_fingerprint"]
    problems += cross_source_problems(id_sets, corpus, pivots)
    return problems


def cross_source_problems(id_sets: dict[Path, set[str]], corpus: dict[Path, str], pivots: dict[Path, str]) -> list[str]:
    """Sources that are to be trained on together must describe the same records."""
    problems = []
    layers = list(id_sets)
    for other in layers[1:]:
        first = layers[0]
        if corpus[other] != corpus[first]:
            problems.append(f"{other}: corpus fingerprint differs from {first} (built on a different corpus)")
        elif id_sets[other] != id_sets[first]:
            only = len(id_sets[other] ^ id_sets[first])
            problems.append(f"{other}: record ids differ from {first} ({only} ids in only one of them)")
    by_pivot_name: dict[str, set[str]] = {}
    for layer, fingerprint in pivots.items():
        by_pivot_name.setdefault(layer.name, set()).add(fingerprint)
    for name, fingerprints in by_pivot_name.items():
        if len(fingerprints) > 1:
            problems.append(f"aligned/{name}: the sources were aligned to different pivot tokenizers (fingerprints differ)")
    return problems
