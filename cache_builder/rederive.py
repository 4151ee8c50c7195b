"""cache-verify --deep: re-derive a sample of aligned rows from the source layer beside them and compare.

Checksums and value ranges cannot tell a forged aligned layer from a real one when every value is
plausible; the source-native layer and the pivot's tokenizer can: cache-align is deterministic, so every
aligned row equals `align_row` of its source row (integers exactly, floats to float32 rounding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignment import token_surface, tokenizer_fingerprint
from cache_builder.align import DEFAULT_VOCAB_STRATEGY, align_row, source_row, vocabulary_maps
from cache_builder.format import MANIFEST
from cache_builder.manifest import load_manifest
from cache_builder.models import ModelSource, load_tokenizer
from cache_builder.reader import read_shard
from cache_builder.untrusted import shown
from cache_builder.vocab_file import read_vocab

FLOAT_TOLERANCE = 1e-5  # relative and absolute: the same code on the same inputs, up to summation order


def rederive_problems(aligned: Path, n_rows: int, pivot: ModelSource, seed: int = 0) -> list[str]:
    """Differences between `n_rows` random rows of an aligned layer and the same rows aligned again."""
    aligned = Path(aligned)
    source = aligned.parent.parent
    if not (source / MANIFEST).is_file():
        return [f"{shown(aligned)}: --deep needs the source-native layer beside it ({shown(source)} has no {MANIFEST})"]
    manifest, src_manifest = load_manifest(aligned), load_manifest(source)
    tokenizer = load_tokenizer(pivot)
    if tokenizer_fingerprint(tokenizer) != manifest["pivot"]["tokenizer_fingerprint"]:
        return [f"{shown(aligned)}: aligned to another pivot tokenizer than {shown(pivot.name)}'s"]
    surface = token_surface(tokenizer)
    strategy = manifest["build"].get("vocab_map", DEFAULT_VOCAB_STRATEGY)
    _, src_to_piv = vocabulary_maps(read_vocab(source, src_manifest), tokenizer, strategy, src_manifest)
    bounds = np.cumsum([0] + [s["rows"] for s in src_manifest["shards"]])
    picks = np.sort(np.random.default_rng(seed).choice(bounds[-1], size=min(n_rows, bounds[-1]), replace=False))
    problems = []
    for index, shard in enumerate(src_manifest["shards"]):
        local = picks[(picks >= bounds[index]) & (picks < bounds[index + 1])] - bounds[index]
        if not local.size:
            continue
        src, stored = read_shard(source, shard["path"]), read_shard(aligned, shard["path"])
        for i in local.tolist():
            fresh = align_row(src["text"][i], [tuple(s) for s in src["response_spans"].row(i)], source_row(src, i), tokenizer,
                              surface, pivot.add_bos, src_to_piv)
            problems += row_differences(stored, i, src["record_id"][i], fresh, shown(aligned / shard["path"]))
    return problems


def row_differences(stored: dict, i: int, record_id: str, fresh: dict, where: str) -> list[str]:
    """The columns of stored row i that differ from a fresh alignment of its source row (record `record_id`)."""
    if len(stored["record_id"]) <= i or stored["record_id"][i] != record_id:
        return [f"{where}: row {i} is not the source row's record {shown(record_id, 12)}"]
    different = []
    for name, values in fresh.items():
        kept = stored[name].row(i)
        if kept.shape != np.shape(values):
            different.append(name)
        elif np.issubdtype(kept.dtype, np.floating):
            if not np.allclose(kept, values, rtol=FLOAT_TOLERANCE, atol=FLOAT_TOLERANCE):
                different.append(name)
        elif not np.array_equal(kept, values):
            different.append(name)
    if not different:
        return []
    return [f"{where}: row {i} (record {shown(stored['record_id'][i], 12)}) differs from its source row aligned again "
            f"in {', '.join(different)}"]
