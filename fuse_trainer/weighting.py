"""Unified-mode source weights: how much each source's fusion term counts, per record.

Every weighting maps a score matrix (S, R) (S sources, R records; or R positions for per-token
weights, the functions do not care) to weights (S, R) that are >= 0 and sum to 1 over the sources
of every record. The score is a per-source cost, lower = more trusted:
    uniform  any score; 1 / S for every available source
    mince    per-source CE on the gold text, in nats per PIVOT token (the trainer: `record_chunk_ce`
             over the record's aligned response chunks); one-hot on the lowest CE,
             ties broken by the lowest source index (FuseLLM's MinCE)
    avgce    per-source CE; softmax over sources of -ce / temperature (FuseLLM's AvgCE)
    entropy  per-source MEAN PREDICTIVE ENTROPY of the record (nats; the mean over its positions of
             `topk_entropy`); softmax of -entropy / temperature, so a more certain source gets
             more weight
The CE must be in one unit for every source: a source's mean gold log-prob per token of its OWN
tokenizer is not (the source with the shorter tokens looks surer, and MinCE would pick it for that).
`record_chunk_ce` scores each source on the text of its aligned chunks (both tokenizers end a token at
the chunk's boundaries) and divides by the pivot tokens that text spans.
A source that has no score for a record (not cached, no aligned position) is marked +inf: it gets
weight 0, and a record where every source is +inf gets all-zero weights.
"""

from typing import Callable

import torch

from fuse_trainer.losses import record_ratio


def _available(score: torch.Tensor) -> torch.Tensor:
    """(S, R) -> (S, R) bool: sources that have a score (finite or -inf) for the record."""
    if bool(torch.isnan(score).any()):
        raise ValueError("source scores contain NaN; mark a missing source with +inf instead")
    return score != float("inf")


def uniform_weights(score: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(S, R) -> (S, R): equal weight over the sources available for each record."""
    avail = _available(score).to(torch.float32)  # (S, R)
    return avail / avail.sum(dim=0, keepdim=True).clamp_min(1.0)


def mince_weights(score: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(S, R) -> (S, R): one-hot on the source with the lowest score; ties -> lowest index."""
    avail = _available(score)  # (S, R)
    best = torch.argmin(score, dim=0)  # (R,) first minimum on ties
    onehot = torch.nn.functional.one_hot(best, score.shape[0]).T.to(torch.float32)  # (S, R)
    return onehot * avail.any(dim=0, keepdim=True)


def softmin_weights(score: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(S, R) -> (S, R): softmax over sources of -score / temperature (AvgCE, entropy modes)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    avail = _available(score)  # (S, R)
    logits = (-score.to(torch.float32) / temperature).masked_fill(~avail, float("-inf"))
    any_avail = avail.any(dim=0, keepdim=True)  # (1, R)
    logits = torch.where(any_avail, logits, torch.zeros_like(logits))
    return torch.softmax(logits, dim=0) * any_avail


def record_chunk_ce(
    chunk_logprob: torch.Tensor,
    chunk_length: torch.Tensor,
    record_index: torch.Tensor,
    keep: torch.Tensor,
    num_records: int,
) -> torch.Tensor:
    """(R,) a source's CE per record in nats per pivot token: -sum of its kept chunk log-probs / their pivot length.

        ce_r = -sum_{k in r, keep_k} chunk_logprob_k / sum_{k in r, keep_k} chunk_length_k

    +inf for a record with no kept chunk (the weightings read that as "no score").

    Args:
        chunk_logprob: (A,) the source's log-likelihood of each ALM chunk (cache column `chunk_logprob`).
        chunk_length: (A,) pivot tokens in each chunk (`losses.chunk_spans`: end - start).
        record_index: (A,) int64 in [0, num_records), the record of each chunk.
        keep: (A,) bool, chunks to count (those that start at a response position).
    """
    kept = keep.to(torch.float64)  # (A,)
    return record_ratio(-chunk_logprob * kept, chunk_length * kept, record_index, num_records).to(torch.float32)


def topk_entropy(topk_logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Predictive entropy (nats) from a cached top-k, with the tail as one bucket.

        p_k = exp(logit_k - lse),  p_tail = max(1 - sum_k p_k, 0)
        H   = -sum_k p_k log p_k - p_tail log p_tail

    A lower bound on the full-vocabulary entropy (the tail's spread is unknown). Average it over a
    record's positions to get the `entropy` mode's score.

    Args:
        topk_logits: (N, K) source-native top-k logits (every slot filled).
        lse: (N,) full-vocabulary logsumexp.

    Returns:
        (N,) entropy per position.
    """
    p = (topk_logits.double() - lse.double().unsqueeze(-1)).exp()  # (N, K)
    p_tail = (1.0 - p.sum(dim=-1)).clamp_min(0.0)  # (N,)
    return (-torch.xlogy(p, p).sum(dim=-1) - torch.xlogy(p_tail, p_tail)).to(torch.float32)


# mode -> fn(score (S, R), temperature) -> weights (S, R); see the module docstring for the score.
SOURCE_WEIGHTINGS: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": uniform_weights,
    "mince": mince_weights,
    "avgce": softmin_weights,
    "entropy": softmin_weights,
}


def source_weights(score: torch.Tensor, mode: str, temperature: float = 1.0) -> torch.Tensor:
    """Per-record source weights (S, R) for a unified-mode `mode` (a key of SOURCE_WEIGHTINGS).

    Args:
        score: (S, R) per-source CE (modes uniform, mince, avgce) or per-source mean predictive
            entropy (mode entropy); +inf where a source has no score for a record.
        temperature: softmax temperature of avgce / entropy; ignored by the others.
    """
    if mode not in SOURCE_WEIGHTINGS:
        choices = sorted(SOURCE_WEIGHTINGS)
        raise ValueError(f"unknown source weighting {mode!r}; choose one of {choices}")
    if score.dim() != 2:
        raise ValueError(f"score must be (sources, records), got shape {tuple(score.shape)}")
    return SOURCE_WEIGHTINGS[mode](score, temperature)
