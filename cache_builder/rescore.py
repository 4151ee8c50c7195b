"""cache-verify --rescore: re-run the source model on random cached rows and compare its signals.

The check a lab runs on a cache it downloaded: checksums prove the bytes are the ones the manifest
lists; rescoring proves the manifest's model really produced them. The model is the one the source
identity names (a packaged model with the recorded file sha256) or the caller's --model, never a path
written in the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache_builder.build import DTYPES, tokenize
from cache_builder.format import STAT_COLUMNS
from cache_builder.manifest import load_manifest
from cache_builder.models import load_model, load_tokenizer, model_from_identity, resolve_model
from cache_builder.reader import read_shard
from cache_builder.scoring import score_batch

# Differences allowed between a stored value and a fresh rescoring in the build's trunk dtype, on possibly
# other hardware and in another batch composition (relative to the values' magnitude, at least 1); "close":
# the share of a row's positions whose statistics and top-k logits must be that close; "top1": the share whose
# top-1 id must agree (near-ties may flip in reduced precision). In fp32 every position must be close. In a
# half-precision trunk the batch composition changes the rounding of every layer, and a few positions of a
# long row drift past any useful tolerance (Gemma-3 bf16: a logit mean 0.22 away, the row's others within
# 0.01), while another model or forged values are far off almost everywhere.
TOLERANCES = {
    "fp32": {"stats": 2e-3, "logits": 2e-3, "close": 1.0, "top1": 0.99},
    "bf16": {"stats": 3e-2, "logits": 3e-2, "close": 0.95, "top1": 0.95},
    "fp16": {"stats": 1e-2, "logits": 1e-2, "close": 0.97, "top1": 0.97},
}
FP16_STORAGE_TOLERANCE = 1e-3  # float16 storage of the top-k logits (relative)


def rescore_problems(folder: str | Path, n_rows: int, *, seed: int = 0, device: str = "cpu", model_name: str | None = None) -> list[str]:
    """Problems found re-scoring `n_rows` random rows of a source-native cache; [] means they match."""
    from alignment import token_surface

    folder = Path(folder)
    manifest = load_manifest(folder)
    if manifest["layer"] != "source":
        return [f"{folder}: --rescore needs a source-native cache, this is the {manifest['layer']} layer"]
    source = resolve_model(model_name) if model_name else model_from_identity(manifest["source"].get("identity"), folder)
    tokenizer = load_tokenizer(source)
    dtype = manifest["build"]["dtype"]
    tol = TOLERANCES[dtype]
    model = load_model(source, DTYPES[dtype], device)
    bounds = np.cumsum([0] + [shard["rows"] for shard in manifest["shards"]])  # global row index of each shard
    picks = np.sort(np.random.default_rng(seed).choice(bounds[-1], size=min(n_rows, bounds[-1]), replace=False))
    logit_tol = tol["logits"] + (FP16_STORAGE_TOLERANCE if manifest["logit_dtype"] == "float16" else 0.0)
    problems = []
    surface = token_surface(tokenizer)
    for shard_index, shard in enumerate(manifest["shards"]):
        local = picks[(picks >= bounds[shard_index]) & (picks < bounds[shard_index + 1])] - bounds[shard_index]
        if local.size:
            rows = read_shard(folder, shard["path"])  # only the shards that hold a picked row are read
            for i in local.tolist():
                fresh = fresh_scoring(model, tokenizer, surface, source.add_bos, manifest, rows, i)
                problems += row_problems(rows, i, fresh, tol, logit_tol)
    return problems


def fresh_scoring(model, tokenizer, surface, add_bos: bool, manifest: dict, rows: dict, i: int):
    """Row i scored again by the model, or None when the tokenizer does not reproduce its token ids."""
    ids, _ = tokenize(rows["text"][i], tokenizer, surface, add_bos, manifest["build"]["max_tokens"])
    if not np.array_equal(ids, rows["token_ids"].row(i)):
        return None
    (fresh,) = score_batch(model, [ids], manifest["top_k"])
    return fresh


def row_problems(rows: dict, i: int, fresh, tol: dict, logit_tol: float) -> list[str]:
    """Differences between the stored signals of row i and a fresh scoring of it, beyond tolerance."""
    rid = rows["record_id"][i]
    if fresh is None:
        return [f"row {rid[:12]}: the tokenizer gives other token ids than the cache holds"]
    problems = []
    for name in STAT_COLUMNS:
        stored = rows[name].row(i)  # (T-1,)
        diff = np.abs(getattr(fresh, name) - stored)  # (T-1,)
        if far_positions(diff, stored, tol["stats"], tol["close"]):
            problems.append(f"row {rid[:12]}: {name} differs by up to {diff.max(initial=0.0):.4g} from a fresh scoring")
    stored_logits = rows["topk_logits"].row(i).astype(np.float32)  # (T-1, K)
    worst = np.abs(fresh.topk_logits - stored_logits).max(axis=1, initial=0.0)  # (T-1,)
    if far_positions(worst, stored_logits, logit_tol, tol["close"]):
        problems.append(f"row {rid[:12]}: top-k logits differ by up to {worst.max(initial=0.0):.4g} from a fresh scoring")
    same_top1 = np.mean(fresh.topk_ids[:, 0] == rows["topk_ids"].row(i)[:, 0]) if len(fresh.topk_ids) else 1.0
    if same_top1 < tol["top1"]:
        problems.append(f"row {rid[:12]}: only {same_top1:.1%} of top-1 ids agree with a fresh scoring")
    return problems


def far_positions(diff: np.ndarray, stored: np.ndarray, relative: float, close_share: float) -> bool:
    """Whether more than 1 - close_share of a row's positions differ by more than `relative` x the row's
    largest stored magnitude (at least 1). diff: (T-1,) absolute differences per position."""
    if not diff.size:
        return False
    bound = relative * max(1.0, float(np.abs(stored).max(initial=1.0)))
    return float(np.mean(diff <= bound)) < close_share
