"""Teacher gates: where a source may teach the pivot, at its aligned positions.

`--gate` names one gate or several joined with "+" (all must agree). Each gate is a pure (N,) bool mask over
the source's N aligned positions (src.row, src.pos), computed without gradient:
    token      the source beats the pivot on its own next token (different events where the tokenizers differ)
    chunk      the source beats the pivot on the text up to the next shared boundary (the same bytes for both)
    record     the same comparison summed over the record, per pivot token
    candidate  the source's mapped candidates name the pivot's gold next token
"""

import torch

from fuse_trainer.config import TrainConfig
from fuse_trainer.data import Batch, SourceBatch
from fuse_trainer.losses import chunk_logprob_sum, record_ratio


def gate_mask(
    src_gold_logprob: torch.Tensor, piv_gold_logprob: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """Token-level teacher gate: True where the source beats the pivot on the gold next text.

        gate = src_gold_logprob > piv_gold_logprob + margin          (N,) bool, no grad

    At an aligned position the two models predict their own next tokens, which cover the same bytes only
    where the tokenizers agree; elsewhere they are different events, and the model with the shorter token
    wins more often. `--gate chunk` applies this function to chunk log-probs (`chunk_logprob_sum`), the
    same bytes for both models.
    """
    return src_gold_logprob.detach() > piv_gold_logprob.detach() + margin


def candidate_gate_mask(src_topk_ids: torch.Tensor, piv_gold_ids: torch.Tensor) -> torch.Tensor:
    """Candidate gate: True where the pivot's gold next token is among the source's mapped candidates.

        src_topk_ids (N, K) pivot ids, -1 = empty slot; piv_gold_ids (N,)  ->  (N,) bool

    Where the tokenizers split the text differently, the source's confident candidates can all be other
    events than the pivot's next token; a top-k target there drives the gold token's probability toward
    zero (experiments/target_ceiling.py measures the cost). This gate distils only targets that name the
    gold token.
    """
    return ((src_topk_ids >= 0) & (src_topk_ids == piv_gold_ids.unsqueeze(-1))).any(dim=-1)


def record_gate_mask(
    src_chunk_logprob: torch.Tensor,
    piv_chunk_logprob: torch.Tensor,
    chunk_length: torch.Tensor,
    record_index: torch.Tensor,
    num_records: int,
    margin: float = 0.0,
) -> torch.Tensor:
    """Record-level teacher gate over the record's ALM chunks, broadcast back to its chunks.

        gate_r = sum_k (src_chunk_k - piv_chunk_k) / sum_k chunk_length_k > margin

    The chunks are the same bytes for both models, so this compares the two on the record's aligned text,
    in nats per pivot token (a mean over next-token log-probs would compare different events wherever the
    tokenizers split the text differently). Returns (A,) bool: every chunk gets its record's decision, so it
    drops in where `gate_mask` does.

    Args:
        src_chunk_logprob, piv_chunk_logprob: (A,) log-likelihood of each chunk (`chunk_logprob_sum`).
        chunk_length: (A,) pivot tokens in each chunk.
        record_index: (A,) int64 in [0, num_records), the record of each chunk.
    """
    gain = record_ratio(src_chunk_logprob - piv_chunk_logprob, chunk_length, record_index, num_records)  # (R,)
    return (gain > margin)[record_index.long()]


def teacher_gate(batch: Batch, src: SourceBatch, piv_gold: torch.Tensor, gates: tuple[str, ...],
                 margin: float) -> torch.Tensor:
    """(N,) bool: where every one of `gates` (`TrainConfig.gates_of` the source) lets the source teach, at its
    aligned positions (src.row, src.pos).

    piv_gold (B, T) is the pivot's log-prob of each gold token."""
    let_in = torch.ones_like(src.row, dtype=torch.bool)
    for gate in gates:
        if gate != "none":
            let_in &= one_gate(gate, batch, src, piv_gold, margin)
    return let_in


def one_gate(gate: str, batch: Batch, src: SourceBatch, piv_gold: torch.Tensor, margin: float) -> torch.Tensor:
    """(N,) bool: where one named gate lets the source teach (see teacher_gate)."""
    if gate == "token":
        return gate_mask(src.gold_logprob, piv_gold[src.row, src.pos], margin)
    if gate in ("chunk", "record"):  # the same event for both models: the text up to the next shared boundary
        piv_chunk, length = chunk_logprob_sum(piv_gold.detach(), src.row, src.pos, batch.num_positions)
        if gate == "record":  # summed over the record, per pivot token
            return record_gate_mask(src.chunk_logprob, piv_chunk, length, src.row, len(batch.input_ids), margin)
        return gate_mask(src.chunk_logprob, piv_chunk, margin)
    if gate == "candidate":  # the mapped candidates name the pivot's gold next token
        return candidate_gate_mask(src.topk_ids, batch.labels[src.row, src.pos])
    raise ValueError(f"unknown gate {gate!r}")
