"""cache-align: express a source-native cache on a pivot's tokens, without loading the source model.

For every source shard, one aligned shard (same index) under `<cache>/aligned/<pivot>/`:
  1. tokenize each row's canonical text with the pivot tokenizer (byte offsets of its tokens);
  2. pair pivot and source positions that share their context (same byte prefix);
  3. gather the source's statistics at the paired positions, map its top-k ids into the pivot
     vocabulary (duplicates merged by logsumexp, lost mass tracked), and sum its gold log-probs
     between shared boundaries (the ALM chunks).
Only the pivot TOKENIZER is loaded. The vocabulary map is saved next to the shards.
"""

from __future__ import annotations

import json
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
    shard_info,
    table_from_columns,
    topk_values,
    with_missing,
    write_manifest,
    write_shard,
    write_text_atomic,
)
from cache_builder.manifest import load_manifest
from cache_builder.models import load_tokenizer, resolve_model
from cache_builder.reader import Ragged, iter_shard_batches
from cache_builder.vocab_file import read_vocab, surface_fingerprint
from cache_builder.verify import verify_layer

VOCAB_MAP_FILE = "vocab_map.npz"
SETTINGS_FILE = "align-settings.json"
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


def _row(batch: dict, i: int) -> dict:
    return {name: col.row(i) for name, col in batch.items() if isinstance(col, Ragged)}


def load_or_build_vocab_map(folder: Path, src_surface, piv_tokenizer, strategy: str) -> VocabMap:
    """The saved vocabulary map if it matches both tokenizers and the strategy, else a new one (saved)."""
    path = folder / VOCAB_MAP_FILE
    piv_surface = token_surface(piv_tokenizer)
    wanted = (surface_fingerprint(src_surface), surface_fingerprint(piv_surface), strategy)
    if path.exists():
        saved = VocabMap.load(path)
        if (saved.src_fingerprint, saved.piv_fingerprint, saved.strategy) == wanted:
            return saved
    vocab_map = build_vocab_map(src_surface, piv_surface, strategy=strategy, pivot_tokenizer=piv_tokenizer)
    vocab_map.save(path)
    return vocab_map


def align_cache(cache: str | Path, pivot: str, *, strategy: str = DEFAULT_VOCAB_STRATEGY, log=print) -> Path:
    """Build `<cache>/aligned/<pivot>/` from a verified source-native cache; returns that folder."""
    started = time.time()
    cache = Path(cache)
    problems, _ = verify_layer(cache)
    if problems:
        raise ValueError(f"{cache} does not verify; refusing to align it:\n  " + "\n  ".join(problems))
    src_manifest = load_manifest(cache)
    k = src_manifest["top_k"]
    piv_source = resolve_model(pivot)
    folder = cache / ALIGNED_DIR / piv_source.name
    with exclusive_lock(folder / ".lock"):
        settings = {"source_manifest_sha256": sha256_file(cache / MANIFEST), "vocab_map": strategy}
        settings_path = folder / SETTINGS_FILE
        if settings_path.exists() and json.loads(settings_path.read_text()) == settings:
            if (folder / MANIFEST).exists():
                log(f"{folder}: already aligned, nothing to do")
                return folder
        else:  # another source cache or strategy: nothing written before may be reused
            (folder / MANIFEST).unlink(missing_ok=True)
            for stale in folder.glob("shards/*.parquet"):
                stale.unlink()
            write_text_atomic(settings_path, json.dumps(settings, sort_keys=True) + "\n")
        piv_tokenizer = load_tokenizer(piv_source)
        piv_surface = token_surface(piv_tokenizer)
        src_surface = read_vocab(cache, src_manifest)
        vocab_map = load_or_build_vocab_map(folder, src_surface, piv_tokenizer, strategy)
        # Output rows past the tokenizer (padded vocabularies, e.g. Qwen's 151,936 for 151,665 tokens) map to nothing.
        src_to_piv = np.full(max(src_manifest["source"]["vocab_size"], len(vocab_map.src_to_piv)), -1, dtype=np.int32)
        src_to_piv[: len(vocab_map.src_to_piv)] = vocab_map.src_to_piv
        shards = []
        for shard in tqdm(src_manifest["shards"], desc=f"cache-align -> {piv_source.name}", unit="shard"):
            relpath = shard["path"]
            if (folder / relpath).exists():
                shards.append(shard_info(folder, relpath))
                continue
            tables = []
            for batch in iter_shard_batches(cache, [relpath], batch_rows=max(shard["rows"], 1)):
                rows = [
                    align_row(batch["text"][i], [tuple(s) for s in batch["response_spans"].row(i)], _row(batch, i),
                              piv_tokenizer, piv_surface, piv_source.add_bos, src_to_piv,
                              topk_values(src_manifest) == "logprobs")
                    for i in range(len(batch["record_id"]))
                ]
                tables.append(aligned_table(batch, rows, k, aligned_missing(src_manifest)))
            shards.append(write_shard(pa.concat_tables(tables), folder, relpath))
        coverage = alignment_figures(folder, [s.path for s in shards])
        pivot_info = {
            "name": piv_source.name,
            "identity": piv_source.identity,
            "tokenizer_fingerprint": tokenizer_fingerprint(piv_tokenizer),
            "vocab_size": max(len(piv_tokenizer), int(vocab_map.src_to_piv.max()) + 1),
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
        write_text_atomic(folder / CARD, dataset_card(manifest))
        write_manifest(folder, manifest)
    kept = coverage["mean_kept_mass"]
    log(f"aligned {cache.name} -> {piv_source.name}: coverage {coverage['coverage']:.3f} of response positions, "
        f"mean kept top-k mass {'unknown (missing in the source)' if kept is None else f'{kept:.3f}'}")
    return folder


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
