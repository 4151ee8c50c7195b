"""fuse_trainer.weighting: per-record source weights and the scores they rank, against plain references."""

import math

import pytest
import torch

from fuse_trainer.data import discover_sources
from fuse_trainer.losses import chunk_logprob_sum, chunk_spans
from fuse_trainer.weighting import SOURCE_WEIGHTINGS, record_chunk_ce, source_weights, topk_entropy
from tests.test_losses import _alm_batch, _source


def test_record_chunk_ce_is_nats_per_pivot_token_of_the_kept_chunks():
    piv_lp, rows, starts, chunk_lp, num_pos = _alm_batch()
    start, end = chunk_spans(rows, starts, num_pos, piv_lp.shape[1])
    keep = torch.tensor([True, True, False, True, False, False, True, True, True])  # row 1: nothing kept
    got = record_chunk_ce(chunk_lp, end - start, rows, keep, 4)  # row 3 has no chunk at all
    ref = []
    for r in range(4):
        kept = [k for k in range(len(rows)) if rows[k] == r and keep[k]]
        nats = -sum(chunk_lp[k].item() for k in kept)
        tokens = sum((end[k] - start[k]).item() for k in kept)
        ref.append(nats / tokens if tokens else math.inf)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32))
    # A source exactly as sure as the pivot of every chunk scores the pivot's own mean CE over those positions,
    # however many tokens of its own it spends on a chunk: the unit is the pivot token, not the source's.
    sums, _ = chunk_logprob_sum(piv_lp, rows, starts, num_pos)
    as_pivot = record_chunk_ce(sums, end - start, rows, torch.ones_like(keep), 3)
    expected = [-piv_lp[0, :9].mean(), -piv_lp[1, :6].mean(), -piv_lp[2, 1:8].mean()]
    torch.testing.assert_close(as_pivot, torch.stack(expected).float())


def test_source_weights_modes():
    ce = torch.tensor([[1.0, 2.0, 0.5, float("inf")],
                       [1.0, 1.0, 3.0, float("inf")],
                       [2.0, 0.5, 3.0, float("inf")]])  # (S=3, R=4); record 3 has no source
    uni = source_weights(ce, "uniform")
    torch.testing.assert_close(uni[:, :3], torch.full((3, 3), 1 / 3))
    assert uni[:, 3].tolist() == [0.0, 0.0, 0.0]
    mince = source_weights(ce, "mince")
    assert mince.T.tolist() == [[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]]  # tie -> index 0
    for mode in ("avgce", "entropy"):
        for temperature in (1.0, 0.3):
            w = source_weights(ce, mode, temperature=temperature)
            for r in range(3):
                ref = [math.exp(-c / temperature) for c in ce[:, r].tolist()]
                torch.testing.assert_close(w[:, r], torch.tensor([x / sum(ref) for x in ref]))
            assert w[:, 3].tolist() == [0.0, 0.0, 0.0]
    partial = torch.tensor([[1.0], [float("inf")]])
    assert source_weights(partial, "avgce").flatten().tolist() == [1.0, 0.0]
    assert source_weights(partial, "uniform").flatten().tolist() == [1.0, 0.0]
    assert set(SOURCE_WEIGHTINGS) == {"uniform", "mince", "avgce", "entropy"}
    with pytest.raises(ValueError, match="unknown"):
        source_weights(ce, "maxce")
    with pytest.raises(ValueError, match="NaN"):
        source_weights(torch.tensor([[float("nan")]]), "avgce")


def test_topk_entropy_k_equals_v_is_dense_entropy():
    src = _source(3, 8, 8)
    p = torch.softmax(src["full"], -1)
    ref = -(p * p.log()).sum(-1)
    torch.testing.assert_close(topk_entropy(src["topk_logits"], src["lse"]), ref.float())
    # with a tail: one extra bucket
    k = 3
    pk = torch.sort(p, -1, descending=True).values[:, :k]
    tail = 1 - pk.sum(-1)
    ref = -(pk * pk.log()).sum(-1) - tail * tail.log()
    torch.testing.assert_close(topk_entropy(src["topk_logits"][:, :k], src["lse"]), ref.float())


def test_mince_scores_every_source_in_nats_per_pivot_token(world):
    """The unified weighting's CE of a source for a record: its kept chunks' log-likelihood over the pivot tokens
    those chunks span (one unit whatever the tokenizer), checked per row against a loop over the aligned positions."""
    from fuse_trainer.config import TrainConfig
    from fuse_trainer.data import FusionData, collate
    from fuse_trainer.train import source_scores

    data = FusionData(discover_sources(world["cache"], "pivot"))
    shard, rows = data.plan(0, 256, seed=0)[0]
    batch = collate(data.shard(shard), rows)
    scores = source_scores(batch, TrainConfig(mode="unified", weighting="mince").validate())  # (S, B)
    assert scores.shape == (2, len(batch.input_ids)) and bool(torch.isfinite(scores).all())
    for s, src in enumerate(batch.sources.values()):
        for r in range(len(batch.input_ids)):
            starts = src.pos[src.row == r].tolist()
            chunk_lp = src.chunk_logprob[src.row == r].tolist()
            ends = starts[1:] + [int(batch.num_positions[r])]
            kept = [k for k, t in enumerate(starts) if batch.loss_mask[r, t]]
            nats = -sum(chunk_lp[k] for k in kept)
            tokens = sum(ends[k] - starts[k] for k in kept)
            assert scores[s, r].item() == pytest.approx(nats / tokens, rel=1e-5)
