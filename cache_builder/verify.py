"""cache-verify: everything a lab checks before it trusts a cache it downloaded.

Checks, in order, each reported with the file it concerns:
1. the tree: no symlink, FIFO, socket or device anywhere under the cache (untrusted.py);
2. manifest: strict JSON, every field typed and bounded (schema.py), format name and version, shard paths
   confined to shards/ and listed once, totals equal to the sums over the shards (manifest.py);
3. the vocabulary: a source layer's vocabulary size is bounded by its vocab.parquet (sha256 checked);
4. shards: regular files, size and sha256 as recorded, Parquet footer bounded before anything is decoded
   (reader.check_footer), schema exactly the versioned schema, row and token counts as recorded, read a
   row group at a time;
5. values (`--deep` is the default here): lengths consistent per row, floats finite and in range, ids inside
   the vocabulary, offsets monotone and inside the text, spans inside the text, positions inside the row,
   top-k logits sorted and below the logsumexp, record ids unique (values.py);
6. an aligned layer next to its source-native cache: aligned from that very build (manifest sha256);
7. across sources (a cache root): the same record ids, corpus fingerprint and pivot fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache_builder.format import ALIGNED_DIR, MANIFEST, expected_schema, missing_statistics, sha256_file
from cache_builder.manifest import CacheError, find_layers, load_manifest, open_layer
from cache_builder.reader import column_to_numpy, declared_values, open_shard, row_groups
from cache_builder.schema import MAX_SHARD_BYTES, MAX_VOCAB_PADDING
from cache_builder.untrusted import refuse_unsafe_tree, sha256_regular, shown
from cache_builder.values import value_problems
from cache_builder.vocab_file import VOCAB_FILE, vocab_rows


def stale_alignment(folder: Path, manifest: dict) -> list[str]:
    """A problem if `folder` is an aligned layer made from another build than the source cache beside it
    (rebuilt since); [] for a source-native layer or an aligned layer shared without its source."""
    folder = Path(folder)
    source_manifest = folder.parent.parent / MANIFEST
    if manifest["layer"] != "aligned" or folder.parent.name != ALIGNED_DIR or not source_manifest.is_file():
        return []
    if manifest["build"].get("source_manifest_sha256") == sha256_file(source_manifest):
        return []
    return [f"{shown(folder)}: aligned from an earlier build of {shown(folder.parent.parent)} (its manifest changed "
            f"since); rerun `cache-align --cache {shown(folder.parent.parent)} --pivot {shown(folder.name)}`"]


def vocabulary_size(folder: Path, manifest: dict) -> int:
    """The size of the vocabulary ids are checked against. A source layer's comes from its manifest only
    within bounds set by its vocab.parquet: at least the vocabulary's tokens, at most MAX_VOCAB_PADDING more
    (padded output layers). An aligned layer's pivot size is bounded by the schema here, and equal to the
    loaded pivot's in fuse-train (fuse_trainer.data.check_pivot)."""
    if manifest["layer"] == "aligned":
        return manifest["pivot"]["vocab_size"]
    declared = manifest["source"]["vocab_size"]
    if "vocab_file" not in manifest["source"]:
        return declared
    tokens = vocab_rows(folder, manifest)
    if not tokens <= declared <= tokens + MAX_VOCAB_PADDING or manifest["source"].get("tokenizer_size", tokens) != tokens:
        raise CacheError(f"{shown(folder / MANIFEST)}: source.vocab_size {declared} (tokenizer_size "
                         f"{manifest['source'].get('tokenizer_size')}) disagrees with the {tokens} tokens of {VOCAB_FILE}")
    return declared


def verify_shard(path: Path, shard: dict, manifest: dict, vocab: int, deep: bool) -> tuple[list[str], list[str]]:
    """(problems, record ids) of one shard (its manifest entry `shard`, its checked `path`): bytes, footer,
    schema, counts, and with `deep` every value."""
    where = shown(path)
    if not path.exists() and not path.is_symlink():
        return [f"{where}: shard listed in the manifest is missing"], []
    size, digest = sha256_regular(path, MAX_SHARD_BYTES)
    if size != shard["bytes"]:
        return [f"{where}: size {size} != {shard['bytes']} recorded (truncated or replaced)"], []
    if digest != shard["sha256"]:
        return [f"{where}: sha256 mismatch (the shard was modified or corrupted)"], []
    problems, ids, tokens = [], [], 0
    with open_shard(path) as parquet:
        if parquet.metadata.num_rows != shard["rows"]:
            return [f"{where}: row count {parquet.metadata.num_rows} differs from the manifest ({shard['rows']})"], []
        if not parquet.schema_arrow.equals(expected_schema(manifest), check_metadata=False):
            return [f"{where}: schema differs from the format v{manifest['format_version']} {manifest['layer']} "
                    "schema"], []
        declared = declared_values(parquet.metadata, "token_ids.list.element")  # an empty row counts one slot
        if not shard["tokens"] <= declared <= shard["tokens"] + shard["rows"]:
            return [f"{where}: the footer declares {declared} token ids for {shard['tokens']} tokens in the manifest"], []
        for table in row_groups(parquet, where):
            columns = {n: column_to_numpy(table.column(n)) for n in table.schema.names}
            tokens += int(columns["num_tokens"].astype("int64").sum())
            if deep:
                found = value_problems(columns, manifest["layer"], vocab, missing_statistics(manifest))
                problems += [f"{where}: {p}" for p in found]
            ids += list(columns["record_id"])
    if tokens != shard["tokens"]:
        problems.append(f"{where}: row or token count differs from the manifest ({tokens} tokens, {shard['tokens']} "
                        "recorded)")
    return sorted(set(problems), key=problems.index), ids


@dataclass(frozen=True)
class LayerCheck:
    """What verifying one layer found: its problems ([] means safe to use), its record ids, and the manifest it
    checked (None when the manifest itself is unusable), so that no caller reads the manifest again."""

    problems: list[str]
    record_ids: list[str]
    manifest: dict | None


def verify_layer(folder: Path, *, deep: bool = True) -> LayerCheck:
    """Every check of one cache layer, reading its manifest once."""
    folder = Path(folder)
    try:
        opened = open_layer(folder)
        vocab = vocabulary_size(folder, opened.manifest)
    except CacheError as err:
        return LayerCheck([str(err)], [], None)
    manifest = opened.manifest
    problems: list[str] = stale_alignment(folder, manifest)
    ids: list[str] = []
    for shard, path in zip(manifest["shards"], opened.shard_paths):
        try:
            shard_problems, shard_ids = verify_shard(path, shard, manifest, vocab, deep)
        except CacheError as err:
            shard_problems, shard_ids = [str(err)], []
        problems += shard_problems
        ids += shard_ids
    duplicates = len(ids) - len(set(ids))
    if duplicates:
        problems.append(f"{shown(folder)}: {duplicates} duplicate record ids")
    return LayerCheck(problems, ids, manifest)


def verify_cache(path: str | Path, *, deep: bool = True) -> list[str]:
    """All problems found in a cache layer or a cache root with several sources; [] means verified."""
    try:
        refuse_unsafe_tree(Path(path))
    except CacheError as err:
        return [str(err)]
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
        check = verify_layer(layer, deep=deep)
        problems += check.problems
        if not check.problems:
            manifest = check.manifest
            id_sets[layer] = set(check.record_ids)
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
            problems.append(f"{shown(other)}: corpus fingerprint differs from {shown(first)} (built on a different corpus)")
        elif id_sets[other] != id_sets[first]:
            only = len(id_sets[other] ^ id_sets[first])
            problems.append(f"{shown(other)}: record ids differ from {shown(first)} ({only} ids in only one of them)")
    by_pivot_name: dict[str, set[str]] = {}
    for layer, fingerprint in pivots.items():
        by_pivot_name.setdefault(layer.name, set()).add(fingerprint)
    for name, fingerprints in by_pivot_name.items():
        if len(fingerprints) > 1:
            problems.append(f"aligned/{shown(name)}: the sources were aligned to different pivot tokenizers (fingerprints differ)")
    return problems
