"""cache-align: express a source-native cache on a pivot's tokens, without loading the source model.

For every source shard, one aligned shard (same index) under `<cache>/aligned/<pivot>/`:
  1. tokenize each row's canonical text with the pivot tokenizer (byte offsets of its tokens);
  2. pair pivot and source positions that share their context (same byte prefix);
  3. gather the source's statistics at the paired positions, map its top-k ids into the pivot
     vocabulary (duplicates merged by logsumexp, lost mass tracked), and sum its gold log-probs
     between shared boundaries (the ALM chunks).
Only the pivot TOKENIZER is loaded. The vocabulary map is saved next to the shards (never read back: a
layer is always rebuilt whole, in a fresh folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from alignment import (
    VocabMap,
    align_positions,
    build_vocab_map,
    chunk_logprobs,
    project_topk,
    token_surface,
    tokenizer_fingerprint,
)
from cache_builder.build import exclusive_lock, response_positions, tokenize
from cache_builder.card import dataset_card
from cache_builder.format import (
    ALIGNED_DIR,
    CARD,
    MANIFEST,
    STAT_COLUMNS,
    aligned_schema,
    missing_statistics,
    new_manifest,
    nullable_ragged,
    ragged,
    ragged_topk,
    sha256_file,
    table_from_columns,
    topk_values,
    with_missing,
    write_manifest,
    write_shard,
    write_text_atomic,
)
from cache_builder.manifest import CacheError
from cache_builder.models import load_tokenizer, resolve_model
from cache_builder.reader import Ragged, iter_shard_batches
from cache_builder.untrusted import shown
from cache_builder.verify import verify_layer
from cache_builder.vocab_file import read_vocab

VOCAB_MAP_FILE = "vocab_map.npz"
DEFAULT_VOCAB_STRATEGY = "exact+first-token"


def align_row(text: str, spans, src: dict, piv_tokenizer, piv_surface, piv_bos: bool, src_to_piv: np.ndarray,
              values_are_logprobs: bool = False) -> dict:
    """One source-native row -> the aligned row's arrays (see docs/contracts.md).

    A source row cut at cache-build's --max-tokens covers a prefix of the text; the pivot row then covers
    the same prefix (tokenized on its own), so the last ALM chunk ends at the same byte on both sides."""
    data, src_bytes = text.encode(), int(src["token_end"][-1]) if len(src["token_end"]) else 0
    if src_bytes < len(data):
        text = data[:src_bytes].decode("utf-8", errors="ignore")
    piv_ids, piv_end = tokenize(text, piv_tokenizer, piv_surface, piv_bos, max_tokens=None)  # (T_p,), (T_p,)
    piv_pos, src_pos = align_positions(piv_end, src["token_end"])  # (A,), (A,)
    # An imported layer of raw log-probs has no stored logsumexp; the log-probs' own is 0 (kept mass = sum p).
    lse = np.zeros(len(src_pos)) if values_are_logprobs else src["logsumexp"][src_pos]
    topk_ids, topk_logits, kept = project_topk(
        src["topk_ids"][src_pos], src["topk_logits"][src_pos].astype(np.float32), lse, src_to_piv
    )
    return {
        "token_ids": piv_ids,
        "token_end": piv_end,
        "loss_mask": response_positions(piv_end, spans, len(text.encode())),
        "aligned_pos": piv_pos.astype(np.int32),
        "src_pos": src_pos.astype(np.int32),
        "topk_ids": topk_ids,
        "topk_logits": topk_logits,
        "native_topk_logits": src["topk_logits"][src_pos].astype(np.float32),
        **{name: src[name][src_pos] for name in STAT_COLUMNS},
        "kept_mass": kept,
        "chunk_logprob": chunk_logprobs(src_pos, src["gold_logprob"]),
    }


def aligned_table(batch: dict, rows: list[dict], k: int, missing: tuple[str, ...] = ()) -> pa.Table:
    """Aligned rows (dicts of arrays) + their source batch's per-row fields -> a table in aligned_schema(k);
    NaN in the `missing` statistics (of an imported source) is written as null."""
    n_tok = np.array([len(r["token_ids"]) for r in rows], dtype=np.int32)
    n_pos = np.maximum(n_tok - 1, 0)
    n_al = np.array([len(r["aligned_pos"]) for r in rows], dtype=np.int32)

    def cat(name: str, dtype) -> np.ndarray:
        return np.concatenate([np.asarray(r[name], dtype=dtype) for r in rows])

    columns = {
        "record_id": pa.array(batch["record_id"], pa.string()),
        "domain": pa.array(batch["domain"], pa.string()),
        "split": pa.array(batch["split"], pa.string()),
        "num_tokens": pa.array(n_tok, pa.int32()),
        "token_ids": ragged(cat("token_ids", np.int32), n_tok, pa.int32()),
        "token_end": ragged(cat("token_end", np.int32), n_tok, pa.int32()),
        "loss_mask": ragged(cat("loss_mask", bool), n_pos, pa.bool_()),
        "aligned_pos": ragged(cat("aligned_pos", np.int32), n_al, pa.int32()),
        "src_pos": ragged(cat("src_pos", np.int32), n_al, pa.int32()),
        "topk_ids": ragged_topk(cat("topk_ids", np.int32).reshape(-1, k), n_al, pa.int32()),
        "topk_logits": ragged_topk(cat("topk_logits", np.float32).reshape(-1, k), n_al, pa.float32()),
        "native_topk_logits": ragged_topk(cat("native_topk_logits", np.float32).reshape(-1, k), n_al, pa.float32()),
    }
    for name in STAT_COLUMNS + ("kept_mass", "chunk_logprob"):
        columns[name] = (nullable_ragged if name in missing else ragged)(cat(name, np.float32), n_al, pa.float32())
    return table_from_columns(with_missing(aligned_schema(k), missing), columns)


def aligned_missing(src_manifest: dict) -> tuple[str, ...]:
    """Statistics an aligned layer lacks because its (imported) source lacks them."""
    missing = [name for name in missing_statistics(src_manifest) if name in STAT_COLUMNS]
    if "logsumexp" in missing and topk_values(src_manifest) != "logprobs":
        missing.append("kept_mass")
    if "gold_logprob" in missing:
        missing.append("chunk_logprob")
    return tuple(missing)


def source_row(batch: dict, i: int) -> dict:
    """The per-position arrays of row i of a source batch."""
    return {name: col.row(i) for name, col in batch.items() if isinstance(col, Ragged)}


def vocabulary_maps(src_surface, piv_tokenizer, strategy: str, src_manifest: dict) -> tuple[VocabMap, np.ndarray]:
    """The vocabulary map and its (V_out,) int32 lookup over every output row of the source: rows past the
    tokenizer (padded vocabularies, e.g. Qwen's 151,936 for 151,665 tokens) map to nothing (-1). The source's
    vocab_size was checked against its vocabulary file (verify.vocabulary_size)."""
    vocab_map = build_vocab_map(src_surface, token_surface(piv_tokenizer), strategy=strategy, pivot_tokenizer=piv_tokenizer)
    src_to_piv = np.full(src_manifest["source"]["vocab_size"], -1, dtype=np.int32)
    src_to_piv[: len(vocab_map.src_to_piv)] = vocab_map.src_to_piv
    return vocab_map, src_to_piv


def align_cache(cache: str | Path, pivot: str, *, strategy: str = DEFAULT_VOCAB_STRATEGY, log=print) -> Path:
    """Build `<cache>/aligned/<pivot>/` from a verified source-native cache; returns that folder.

    The layer is always built afresh in a new temporary folder from files this call writes itself, then
    renamed into place: nothing found in an existing aligned folder (settings, vocabulary map, shards) is
    trusted or reused, and no planted name can redirect a write outside the cache."""
    started = time.time()
    cache = Path(cache).resolve()
    check = verify_layer(cache)  # also refuses any symlink or special file in the whole tree
    if check.problems:
        raise CacheError(f"{shown(cache)} does not verify; refusing to align it: " + "; ".join(check.problems))
    src_manifest = check.manifest
    k = src_manifest["top_k"]
    piv_source = resolve_model(pivot)
    parent = cache / ALIGNED_DIR
    parent.mkdir(exist_ok=True)
    with exclusive_lock(parent / f".{piv_source.name}.lock"):
        for stale in [*parent.glob(f".{piv_source.name}.new-*"), *parent.glob(f".{piv_source.name}.old-*")]:
            shutil.rmtree(stale)  # left by a killed run (the tree holds no symlink: verified above)
        work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{piv_source.name}.new-"))
        try:
            settings = {"source_manifest_sha256": sha256_file(cache / MANIFEST), "vocab_map": strategy}
            piv_tokenizer = load_tokenizer(piv_source)
            piv_surface = token_surface(piv_tokenizer)
            src_surface = read_vocab(cache, src_manifest)
            vocab_map, src_to_piv = vocabulary_maps(src_surface, piv_tokenizer, strategy, src_manifest)
            vocab_map.save(work / VOCAB_MAP_FILE)
            shards = []
            for shard in tqdm(src_manifest["shards"], desc=f"cache-align -> {piv_source.name}", unit="shard"):
                tables = []
                for batch in iter_shard_batches(cache, [shard["path"]]):
                    rows = [
                        align_row(batch["text"][i], [tuple(s) for s in batch["response_spans"].row(i)], source_row(batch, i),
                                  piv_tokenizer, piv_surface, piv_source.add_bos, src_to_piv,
                                  topk_values(src_manifest) == "logprobs")
                        for i in range(len(batch["record_id"]))
                    ]
                    tables.append(aligned_table(batch, rows, k, aligned_missing(src_manifest)))
                empty = with_missing(aligned_schema(k), aligned_missing(src_manifest)).empty_table()
                shards.append(write_shard(pa.concat_tables(tables) if tables else empty, work, shard["path"]))
            coverage = alignment_figures(work, [s.path for s in shards])
            pivot_info = {
                "name": piv_source.name,
                "identity": piv_source.identity,
                "tokenizer_fingerprint": tokenizer_fingerprint(piv_tokenizer),
                "vocab_size": max(len(piv_tokenizer), int(vocab_map.src_to_piv.max(initial=-1)) + 1),
                "add_bos": piv_source.add_bos,
                "vocab_map": {"strategy": strategy, "exact": vocab_map.n_exact, "fallback": vocab_map.n_fallback,
                              "unmapped": vocab_map.n_unmapped},
                "alignment": coverage,
            }
            manifest = new_manifest(
                "aligned", top_k=k, logit_dtype="float32", source=src_manifest["source"], corpus=src_manifest["corpus"],
                build={**settings, "seconds": round(time.time() - started, 1)},
                shards=shards, pivot=pivot_info,
            )
            if missing_statistics(src_manifest):  # an imported source: say what it lacks and what its values are
                manifest["missing_statistics"] = list(aligned_missing(src_manifest))
                manifest["topk_values"] = topk_values(src_manifest)
            write_text_atomic(work / CARD, dataset_card(manifest))
            write_manifest(work, manifest)
            folder = replace_folder(work, parent / piv_source.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    kept = coverage["mean_kept_mass"]
    log(f"aligned {cache.name} -> {piv_source.name}: coverage {coverage['coverage']:.3f} of response positions, "
        f"mean kept top-k mass {'unknown (missing in the source)' if kept is None else f'{kept:.3f}'}")
    return folder


def replace_folder(new: Path, final: Path) -> Path:
    """Put the finished folder `new` at `final` (a sibling), removing what was there; returns `final`.

    The old folder is first renamed aside (rename never follows a symlink), then deleted; the tree was
    checked for symlinks before, and rmtree does not follow them either."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise CacheError(f"{shown(final)}: is not a folder (a symlink or file planted in the cache); remove it")
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.rename(final, old)
    os.rename(new, final)
    if old is not None:
        shutil.rmtree(old)
    return final


def alignment_figures(folder: Path, shard_paths: list[str]) -> dict:
    """Coverage (share of pivot response positions with a partner) and mean kept top-k mass."""
    response = aligned = 0
    kept_sum, kept_n = 0.0, 0
    for batch in iter_shard_batches(folder, shard_paths, ["loss_mask", "aligned_pos", "kept_mass"]):
        mask, pos = batch["loss_mask"], batch["aligned_pos"]
        response += int(mask.values.sum())
        row_start = mask.offsets[:-1]
        rows = np.repeat(np.arange(len(pos)), pos.lengths)
        aligned += int(mask.values[row_start[rows] + pos.values].sum())
        known = batch["kept_mass"].values[~np.isnan(batch["kept_mass"].values)]  # null where the source lacks it
        kept_sum += float(known.sum())
        kept_n += known.size
    return {
        "response_positions": response,
        "aligned_response_positions": aligned,
        "coverage": aligned / max(response, 1),
        "mean_kept_mass": kept_sum / kept_n if kept_n else None,
    }
