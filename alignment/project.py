"""Source top-k distributions expressed on pivot ids, and source log-likelihoods of shared-boundary chunks."""

from __future__ import annotations

import numpy as np


def project_topk(
    topk_ids: np.ndarray,
    topk_logits: np.ndarray,
    logsumexp: np.ndarray,
    src_to_piv: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map source top-k candidates into the pivot vocabulary.

    topk_ids (N, K) int, topk_logits (N, K) float, logsumexp (N,) of the full source vocabulary,
    src_to_piv (V_src,) int with -1 = unmapped. Returns
      piv_ids    (N, K) int32, -1 in empty slots;
      piv_logits (N, K) float32, 0 in empty slots; candidates that land on the same pivot id are
                 merged in probability space (logsumexp of their logits); rows sorted descending,
                 ties in the order of the candidates' first slot;
      kept_mass  (N,) float32: sum of exp(logit - logsumexp) over the mapped candidates, i.e. the share
                 of the source's full-vocabulary probability that the kept entries carry.
    """
    ids = np.asarray(topk_ids)
    logits = np.asarray(topk_logits, dtype=np.float64)
    lse = np.asarray(logsumexp, dtype=np.float64)
    table = np.asarray(src_to_piv)
    if ids.ndim != 2 or logits.shape != ids.shape or lse.shape != ids.shape[:1]:
        raise ValueError(f"expected topk_ids (N, K), topk_logits (N, K), logsumexp (N,); got {ids.shape}, {logits.shape}, {lse.shape}")
    n, k = ids.shape
    if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
        raise ValueError(
            f"source ids span {ids.min()}..{ids.max()} but the vocabulary map covers 0..{len(table) - 1}: the model's "
            "(padded) vocabulary is larger than the tokenizer's; pad src_to_piv with -1 up to the model's vocabulary size."
        )
    piv = table[ids].astype(np.int64)  # (N, K)
    kept = piv >= 0  # (N, K)
    kept_mass = np.where(kept, np.exp(logits - lse[:, None]), 0.0).sum(axis=1)  # (N,)

    # Group equal pivot ids within a row: sort slots by (row, pivot id, slot), dropped slots last.
    slot = np.broadcast_to(np.arange(k), (n, k))
    key = np.where(kept, piv, np.iinfo(np.int64).max)
    order = np.lexsort((slot, key), axis=1)  # (N, K) slots of each row by (pivot id, slot)
    s_key = np.take_along_axis(key, order, axis=1)  # (N, K)
    s_logit = np.take_along_axis(logits, order, axis=1)  # (N, K)
    s_kept = np.take_along_axis(kept, order, axis=1)  # (N, K)
    starts = np.ones((n, k), dtype=bool)  # (N, K) first slot of each group
    starts[:, 1:] = s_key[:, 1:] != s_key[:, :-1]
    flat_starts = np.flatnonzero(starts.ravel())  # (G,)
    merged = np.logaddexp.reduceat(s_logit.ravel(), flat_starts) if flat_starts.size else np.zeros(0)  # (G,)
    g_row = flat_starts // max(k, 1)
    g_first_slot = order.ravel()[flat_starts]  # (G,) the group's first original slot
    g_id = s_key.ravel()[flat_starts]
    g_kept = s_kept.ravel()[flat_starts]

    # Scatter groups back to their first slot, then sort each row by merged logit, descending.
    out_logit = np.full((n, k), -np.inf)  # (N, K)
    out_id = np.full((n, k), -1, dtype=np.int64)  # (N, K)
    out_logit[g_row[g_kept], g_first_slot[g_kept]] = merged[g_kept]
    out_id[g_row[g_kept], g_first_slot[g_kept]] = g_id[g_kept]
    rank = np.argsort(-out_logit, axis=1, kind="stable")  # (N, K)
    piv_ids = np.take_along_axis(out_id, rank, axis=1).astype(np.int32)
    piv_logits = np.take_along_axis(out_logit, rank, axis=1)
    piv_logits = np.where(piv_ids >= 0, piv_logits, 0.0).astype(np.float32)
    return piv_ids, piv_logits, kept_mass.astype(np.float32)


def chunk_logprobs(src_pos: np.ndarray, src_gold_logprob: np.ndarray) -> np.ndarray:
    """(A,) source log-likelihood of the text between consecutive shared boundaries (ALM chunks).

    src_pos (A,) sorted aligned source positions; src_gold_logprob (T_s-1,) log p(token t+1 | tokens 0..t).
    Chunk k sums gold log-probs of positions src_pos[k] .. src_pos[k+1]-1; the last chunk runs to the end.
    """
    pos = np.asarray(src_pos, dtype=np.int64)  # (A,)
    gold = np.asarray(src_gold_logprob, dtype=np.float64)  # (T_s-1,)
    if pos.size and (pos.min() < 0 or pos.max() >= len(gold) or (np.diff(pos) <= 0).any()):
        raise ValueError(f"src_pos must be strictly increasing positions in 0..{len(gold) - 1} (T_s-1 gold log-probs)")
    before = np.r_[0.0, np.cumsum(gold)]  # (T_s,) sum of gold[:t]
    stop = np.r_[pos[1:], len(gold)]  # (A,)
    return (before[stop] - before[pos]).astype(np.float32)
