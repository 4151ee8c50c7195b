"""FuseLLM / FuseChat's logit datasets (fanqiwan/FuseAI: FuseLLM/src/utils/forward_for_logits.py,
token_alignment.py, data_collator.py), a `datasets.save_to_disk` folder, as their training scripts load it.

Source-native layer (a model's own tokens, as `forward_for_logits.py` writes them): `text`, `input_ids`,
`attention_mask`, `labels` (= input_ids), `per_step_logits` list<list<float16>> (raw top-k logits),
`per_step_indices` list<list<int64>> (position t from the logits at t: the distribution of token t+1) and
`metric_ce` (the row's mean next-token loss). We write the T-1 positions that have a next token.

Pivot-aligned layer (the pivot's tokens, as `token_alignment.py` leaves the base model's dataset): the source's
distributions under the aligned names `per_step_aligned_logits_{i}`, `per_step_aligned_indices_{i}` (pivot
ids, only the kept candidates, so lists vary in length) and `metric_ce_aligned_{i}` (the source's loss in nats
per pivot token over the aligned text). Positions without a partner get FuseLLM's fallback, the gold pivot
token with logit 1.0. Their collator also reads the base model's own `per_step_logits`; our cache does not hold
the pivot's distribution, so those carry the same one-hot gold fallback and `metric_ce` is null.

Kept: token ids, top-k ids and logits (softmax over the kept candidates is FuseLLM's target), the row's loss.
Lost: logsumexp (so tail mass and log-probs), mean, std, gold log-prob, response spans (rebuilt: whole text).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from cache_builder.format import ragged
from cache_builder.interop.nested import Nested, nested_array
from cache_builder.interop.source_layer import ImportedRow
from cache_builder.interop.staging import InteropError
from cache_builder.interop.targets import TargetBatch
from cache_builder.reader import column_to_numpy

ONE_HOT_LOGIT = 1.0


def _token_columns(batch: TargetBatch) -> dict[str, pa.Array]:
    n_tokens = batch.input_ids.lengths
    tokens = batch.input_ids.values.astype(np.int64)
    return {
        "input_ids": ragged(tokens, n_tokens, pa.int64()),
        "attention_mask": ragged(np.ones(len(tokens), dtype=np.int64), n_tokens, pa.int64()),
        "labels": ragged(tokens, n_tokens, pa.int64()),
    }


def _variable_lists(batch: TargetBatch) -> tuple[pa.Array, pa.Array]:
    """(logits, indices) list<list<>> with the kept candidates of each position, one-hot gold where none."""
    n_pos = np.diff(batch.position_offsets)
    gold = ~batch.usable[:, None]  # (P, 1) positions that get the one-hot fallback
    written = np.where(gold, np.arange(batch.ids.shape[1]) == 0, batch.ids >= 0)  # (P, K) slots written
    ids = np.where(gold, batch.next_ids[:, None], batch.ids)[written]
    logits = np.where(gold, ONE_HOT_LOGIT, batch.values)[written]
    cell_lengths = written.sum(axis=1)
    return (nested_array(logits.astype(np.float16), n_pos, pa.float16(), cell_lengths),
            nested_array(ids.astype(np.int64), n_pos, pa.int64(), cell_lengths))


def source_table(batch: TargetBatch) -> pa.Table:
    n_pos = np.diff(batch.position_offsets)
    return pa.table({
        "text": pa.array(batch.text, pa.string()),
        **_token_columns(batch),
        "per_step_logits": nested_array(batch.values.astype(np.float16), n_pos, pa.float16()),
        "per_step_indices": nested_array(batch.ids, n_pos, pa.int64()),
        "metric_ce": pa.array(batch.mean_nll, pa.float32(), from_pandas=True),
    })


def aligned_table(batch: TargetBatch, index: int) -> pa.Table:
    one_hot = replace(batch, has_target=np.zeros_like(batch.has_target))  # the pivot's own: gold only
    own_logits, own_ids = _variable_lists(one_hot)
    logits, ids = _variable_lists(batch)
    return pa.table({
        **_token_columns(batch),
        "per_step_logits": own_logits,
        "per_step_indices": own_ids,
        "metric_ce": pa.nulls(len(batch.record_id), pa.float32()),
        f"per_step_aligned_logits_{index}": logits,
        f"per_step_aligned_indices_{index}": ids,
        f"metric_ce_aligned_{index}": pa.array(batch.mean_nll, pa.float32(), from_pandas=True),
    })


def export(batches: Iterator[TargetBatch], folder: Path, index: int, fingerprint: str) -> None:
    """Collect the tables and save them as one dataset with datasets.save_to_disk (how FuseLLM loads them).
    fingerprint: the dataset's `datasets` fingerprint, given so that `datasets` does not hash every byte to make one."""
    from datasets import Dataset, disable_progress_bars
    from datasets.table import InMemoryTable

    disable_progress_bars()
    tables = [source_table(batch) if batch.text is not None else aligned_table(batch, index) for batch in batches]
    Dataset(InMemoryTable(pa.concat_tables(tables)), fingerprint=fingerprint).save_to_disk(str(folder))


def import_rows(folder: Path, split: str) -> Iterator[ImportedRow]:
    """Rows of a FuseLLM source dataset: per_step_* cut to the T-1 positions that have a next token."""
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(folder))
    except FileNotFoundError as err:
        raise InteropError(f"{folder} is not a datasets save_to_disk folder ({err})") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise InteropError(f"{folder} holds splits {', '.join(dataset)}; choose one with --split")
        dataset = dataset[split]
    table = dataset.data.table
    needed = {"input_ids", "per_step_logits", "per_step_indices"}
    if not needed <= set(table.column_names):
        raise InteropError(f"{folder}: missing FuseLLM columns {sorted(needed - set(table.column_names))}")
    input_ids = column_to_numpy(table.column("input_ids"))
    logits, indices = Nested.of(table.column("per_step_logits")), Nested.of(table.column("per_step_indices"))
    metric = (table.column("metric_ce").to_numpy(zero_copy_only=False).astype(np.float64)
              if "metric_ce" in table.column_names else np.full(table.num_rows, np.nan))
    for r in range(table.num_rows):
        yield _row(f"{folder.name} row {r}", input_ids.row(r), logits.grid(r), indices.grid(r), float(metric[r]))


def _row(origin: str, tokens: np.ndarray, logits, indices, metric: float) -> ImportedRow:
    tokens = tokens.astype(np.int64)
    if logits is None or indices is None or logits.shape != indices.shape:
        return ImportedRow.broken(origin, tokens, "its per-step lists hold different numbers of candidates (ragged)")
    n = len(tokens) - 1
    if len(logits) < n:
        return ImportedRow.broken(origin, tokens, f"{len(logits)} per-step positions for {len(tokens)} tokens; "
                                                  f"expected at least {n} (truncated row)")
    return ImportedRow(origin, tokens, indices[:n].astype(np.int64), logits[:n].astype(np.float32), mean_nll=metric)
