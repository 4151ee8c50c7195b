"""Our cache layers as next-token targets, the view every exporter writes from.

Position t of a row (0 <= t < T-1, T tokens) is the distribution of token t+1: the index of a student's
logits at t. That is our format's convention, DistillKit's (vLLM prompt log-probs without the first, empty
entry), axolotl's (`target_logprobs[t]` against `student_logits[t]`) and FuseLLM's (`per_step_logits[t]`
from `logits[t]`), so no exporter shifts anything.

A source-native layer has a target at every position; a pivot-aligned layer only at its aligned pivot
positions (`has_target`), with empty slots (-1) where a candidate found no pivot token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cache_builder.build import response_positions
from cache_builder.format import missing_statistics, topk_values
from cache_builder.interop.staging import InteropError
from cache_builder.manifest import load_manifest
from cache_builder.reader import Ragged, iter_batches

SOURCE_COLUMNS = ["record_id", "text", "token_ids", "token_end", "response_spans", "mean_nll", "topk_ids",
                  "topk_logits", "logsumexp"]
ALIGNED_COLUMNS = ["record_id", "token_ids", "loss_mask", "aligned_pos", "topk_ids", "topk_logits", "logsumexp",
                   "chunk_logprob"]


@dataclass(frozen=True)
class TargetBatch:
    """Rows of a layer as (P, K) targets over all P = sum(T - 1) positions of the batch."""

    record_id: np.ndarray  # (R,)
    input_ids: Ragged  # (T,) per row: the layer's tokens (the pivot's for an aligned layer)
    position_offsets: np.ndarray  # (R+1,) row r owns positions offsets[r]:offsets[r+1]
    ids: np.ndarray  # (P, K) int64, -1 = empty slot or no target
    values: np.ndarray  # (P, K) float32 as stored (see `kind`), -inf where ids is -1
    lse: np.ndarray  # (P,) float32 full-vocabulary logsumexp of `values`; NaN where unknown
    has_target: np.ndarray  # (P,) bool
    response: np.ndarray  # (P,) bool: the position predicts a response token
    mean_nll: np.ndarray  # (R,) float32 the source's mean loss per token of the row; NaN where unknown
    kind: str  # "logits" | "logprobs" | "renormalized-logprobs" (cache_builder.format.TOPK_VALUES)
    text: list[str] | None = None  # (R,) the canonical texts (a source-native layer; None for an aligned one)

    @property
    def usable(self) -> np.ndarray:
        """(P,) bool: positions with a target that kept at least one candidate."""
        return self.has_target & (self.ids >= 0).any(axis=1)

    @property
    def next_ids(self) -> np.ndarray:
        """(P,) the gold token each position predicts (token t+1 of its row)."""
        starts = np.repeat(self.input_ids.offsets[:-1] + 1 - self.position_offsets[:-1], np.diff(self.position_offsets))
        return self.input_ids.values[starts + np.arange(len(self.has_target))].astype(np.int64)

    def raw_logprobs(self) -> np.ndarray:
        """(P, K) the source's log-probabilities, -inf in empty slots; InteropError if the layer cannot know them."""
        if self.kind == "logprobs":
            return self.values
        unknown = self.has_target & np.isnan(self.lse)
        if self.kind == "renormalized-logprobs" or unknown.any():
            raise InteropError("this layer's top-k values are not raw log-probs and its logsumexp is missing, so the "
                               "source's log-probabilities are unknown; export it to axolotl or fusellm instead")
        return (self.values - self.lse[:, None]).astype(np.float32)

    def renormalized_logprobs(self) -> np.ndarray:
        """(P, K) log-probs renormalised over the kept candidates of each position, -inf in empty slots."""
        with np.errstate(invalid="ignore", divide="ignore"):
            top = np.max(self.values, axis=1, keepdims=True)  # (P, 1)
            top = np.where(np.isfinite(top), top, 0.0)
            lse = np.log(np.exp(self.values - top).sum(axis=1, keepdims=True)) + top  # (P, 1)
        return np.where(self.ids >= 0, self.values - lse, -np.inf).astype(np.float32)


def iter_targets(folder: str | Path, batch_rows: int = 256) -> Iterator[TargetBatch]:
    """The layer's rows, `batch_rows` at a time, as TargetBatch."""
    manifest = load_manifest(folder)
    source = manifest["layer"] == "source"
    kind = topk_values(manifest)
    lse_known = "logsumexp" not in missing_statistics(manifest)
    for batch in iter_batches(folder, SOURCE_COLUMNS if source else ALIGNED_COLUMNS, batch_rows):
        yield (source_targets if source else aligned_targets)(batch, kind, lse_known)


def _lse(batch: dict, kind: str, lse_known: bool) -> np.ndarray:
    if kind == "logprobs":  # log-probs are logits whose logsumexp is 0
        return np.zeros(len(batch["logsumexp"].values), dtype=np.float32)
    return batch["logsumexp"].values.astype(np.float32) if lse_known else np.full(len(batch["logsumexp"].values), np.nan, np.float32)


def source_targets(batch: dict, kind: str, lse_known: bool) -> TargetBatch:
    """A source-native batch: a target at every position."""
    tokens = batch["token_ids"]
    n_pos = np.maximum(tokens.lengths - 1, 0)
    offsets = np.concatenate([[0], np.cumsum(n_pos)]).astype(np.int64)
    response = np.concatenate([
        response_positions(batch["token_end"].row(r), [tuple(s) for s in batch["response_spans"].row(r)],
                           len(batch["text"][r].encode()))
        for r in range(len(tokens))
    ]) if len(tokens) else np.zeros(0, bool)
    return TargetBatch(
        record_id=batch["record_id"], input_ids=tokens, position_offsets=offsets,
        ids=batch["topk_ids"].values.astype(np.int64), values=batch["topk_logits"].values.astype(np.float32),
        lse=_lse(batch, kind, lse_known), has_target=np.ones(offsets[-1], dtype=bool), response=response,
        mean_nll=batch["mean_nll"].astype(np.float32), kind=kind, text=list(batch["text"]),
    )


def aligned_targets(batch: dict, kind: str, lse_known: bool) -> TargetBatch:
    """A pivot-aligned batch: targets at the aligned positions, none elsewhere. mean_nll is the source's loss in
    nats per pivot token over the aligned text (its ALM chunks), the unit fuse-train's MinCE compares."""
    tokens, pos = batch["token_ids"], batch["aligned_pos"]
    n_pos = np.maximum(tokens.lengths - 1, 0)
    offsets = np.concatenate([[0], np.cumsum(n_pos)]).astype(np.int64)
    flat = np.repeat(offsets[:-1], pos.lengths) + pos.values  # (A,) position index in the batch
    k = batch["topk_ids"].values.shape[1]
    ids = np.full((offsets[-1], k), -1, dtype=np.int64)
    values = np.full((offsets[-1], k), -np.inf, dtype=np.float32)
    lse = np.full(offsets[-1], np.nan, dtype=np.float32)
    src_ids = batch["topk_ids"].values.astype(np.int64)
    ids[flat] = src_ids
    values[flat] = np.where(src_ids >= 0, batch["topk_logits"].values, -np.inf)
    lse[flat] = _lse(batch, kind, lse_known)
    has = np.zeros(offsets[-1], dtype=bool)
    has[flat] = True
    chunk = batch["chunk_logprob"]
    first = np.array([pos.row(r)[0] if pos.lengths[r] else 0 for r in range(len(tokens))])
    covered = n_pos - first  # pivot positions covered by the row's chunks
    running = np.concatenate([[0.0], np.cumsum(chunk.values, dtype=np.float64)])
    chunk_sum = np.where(pos.lengths > 0, running[chunk.offsets[1:]] - running[chunk.offsets[:-1]], np.nan)
    return TargetBatch(
        record_id=batch["record_id"], input_ids=tokens, position_offsets=offsets, ids=ids, values=values, lse=lse,
        has_target=has, response=batch["loss_mask"].values.astype(bool),
        mean_nll=(-chunk_sum / np.maximum(covered, 1)).astype(np.float32), kind=kind,
    )
