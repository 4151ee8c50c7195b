"""axolotl's knowledge-distillation columns (axolotl-ai-cloud/axolotl, src/axolotl/integrations/kd/).

A Hugging Face dataset (Parquet shards `data-{i:05d}.parquet`, or a `save_to_disk` folder on import) with
`input_ids`, `labels` (-100 outside the response), `attention_mask` (T each) and, per next-token position,
`target_token_ids` list<list<int64>>, `target_logprobs` list<list<float32>> and `target_mask`
list<list<int32>>. Target t is the distribution of token t+1, paired with the student's logits at t
(`topk_logprob/forward_kl.py`, and the kernel's labels shifted by one). Log-probs are renormalised over
the kept candidates, as axolotl's own preprocessing leaves them. We write T-1 target positions (its collator
pads the targets to the labels' length); an input with T positions has its last one (no next token) dropped.

Kept: token ids, the response mask (labels), top-k ids, the candidates' relative probabilities. Lost: the tail
mass (renormalised values sum to 1), hence the gold log-prob, logsumexp, mean and std; the text (rebuilt).
Positions without a target (no source partner, prompt positions) and empty slots get target_mask 0, id 0 and
PAD_LOGPROB, the collator's own padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from cache_builder.format import ragged
from cache_builder.interop.nested import Nested, nested_array
from cache_builder.interop.source_layer import ImportedRow
from cache_builder.interop.staging import InteropError
from cache_builder.interop.targets import TargetBatch
from cache_builder.interop.writer import write_peer_files
from cache_builder.reader import column_to_numpy

PAD_LOGPROB = -1e9
IGNORE = -100
SCHEMA = pa.schema([
    pa.field("input_ids", pa.list_(pa.int64())),
    pa.field("labels", pa.list_(pa.int64())),
    pa.field("attention_mask", pa.list_(pa.int8())),
    pa.field("target_token_ids", pa.list_(pa.list_(pa.int64()))),
    pa.field("target_logprobs", pa.list_(pa.list_(pa.float32()))),
    pa.field("target_mask", pa.list_(pa.list_(pa.int32()))),
])


def export_table(batch: TargetBatch) -> pa.Table:
    n_tokens, n_pos = batch.input_ids.lengths, np.diff(batch.position_offsets)
    tokens = batch.input_ids.values.astype(np.int64)
    first = batch.input_ids.offsets[:-1]
    # labels[t] = token t where position t-1 predicts a response token; the first token of a row is never one
    is_first = np.zeros(len(tokens), dtype=bool)
    is_first[first[n_tokens > 0]] = True
    labelled = np.zeros(len(tokens), dtype=bool)
    labelled[~is_first] = batch.response
    labels = np.where(labelled, tokens, IGNORE)
    kept = batch.ids >= 0  # (P, K)
    mask = kept & (batch.has_target & batch.response)[:, None]
    logprobs = np.where(kept, batch.renormalized_logprobs(), PAD_LOGPROB).astype(np.float32)
    return pa.Table.from_arrays([
        ragged(tokens, n_tokens, pa.int64()),
        ragged(labels, n_tokens, pa.int64()),
        ragged(np.ones(len(tokens), dtype=np.int8), n_tokens, pa.int8()),
        nested_array(np.where(kept, batch.ids, 0), n_pos, pa.int64()),
        nested_array(logprobs, n_pos, pa.float32()),
        nested_array(mask.astype(np.int32), n_pos, pa.int32()),
    ], schema=SCHEMA)


def export(batches: Iterator[TargetBatch], folder: Path, rows_per_file: int) -> None:
    """Write data-{i:05d}.parquet of at least `rows_per_file` rows each into `folder`."""
    write_peer_files((export_table(batch) for batch in batches), folder, "data-{:05d}.parquet".format, rows_per_file)


def read_tables(folder: Path) -> Iterator[tuple[str, pa.Table]]:
    """(name, table) of a Parquet-sharded dataset or a datasets `save_to_disk` folder."""
    files = sorted(folder.glob("*.parquet"))
    if files:
        import pyarrow.parquet as pq

        for path in files:
            yield path.name, pq.read_table(path)
    elif (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(folder))
        if isinstance(dataset, DatasetDict):
            raise InteropError(f"{folder} holds a DatasetDict ({', '.join(dataset)}); pass the folder of one split")
        yield folder.name, dataset.data.table
    else:
        raise InteropError(f"{folder} has neither .parquet shards nor a datasets save_to_disk folder")


def import_rows(folder: Path) -> Iterator[ImportedRow]:
    for name, table in read_tables(folder):
        needed = {"input_ids", "target_token_ids", "target_logprobs", "target_mask"}
        if not needed <= set(table.column_names):
            raise InteropError(f"{folder / name}: missing axolotl KD columns {sorted(needed - set(table.column_names))}")
        input_ids = column_to_numpy(table.column("input_ids"))
        labels = column_to_numpy(table.column("labels")) if "labels" in table.column_names else None
        ids, logprobs, mask = (Nested.of(table.column(c)) for c in ("target_token_ids", "target_logprobs", "target_mask"))
        for r in range(table.num_rows):
            yield _row(f"{name} row {r}", input_ids.row(r), None if labels is None else labels.row(r),
                       ids.grid(r), logprobs.grid(r), mask.grid(r))


def _row(origin: str, tokens: np.ndarray, labels: np.ndarray | None, ids, logprobs, mask) -> ImportedRow:
    tokens = tokens.astype(np.int64)
    if ids is None or logprobs is None or mask is None or not ids.shape == logprobs.shape == mask.shape:
        return ImportedRow.broken(origin, tokens, "its target columns are ragged or of different shapes")
    if len(ids) == len(tokens):  # one target per token: the last one has no next token
        ids, logprobs, mask = ids[:-1], logprobs[:-1], mask[:-1]
    values = np.where(logprobs.astype(np.float64) <= PAD_LOGPROB / 10, -np.inf, logprobs).astype(np.float32)
    if labels is not None and len(labels) == len(tokens):
        response = labels != IGNORE
    else:
        response = np.concatenate([[False], mask.astype(bool).any(axis=1)]) if len(mask) == len(tokens) - 1 else None
    return ImportedRow(origin, tokens, ids.astype(np.int64), values, response_tokens=response)
