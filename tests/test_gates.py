"""fuse_trainer.gates: each teacher gate against a hand-worked case, and the shipped combination candidate+chunk."""

import torch

from fuse_trainer.gates import candidate_gate_mask, gate_mask, record_gate_mask


def test_gate_masks():
    src = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0])
    piv = torch.tensor([-2.0, -1.0, -0.6, -1.0, -1.0], requires_grad=True)
    assert gate_mask(src, piv).tolist() == [True, False, True, False, False]
    assert gate_mask(src, piv, margin=0.5).tolist() == [True, False, False, False, False]
    record = torch.tensor([0, 0, 1, 1, 2])
    length = torch.tensor([1, 3, 1, 1, 2])  # pivot tokens per chunk
    # per pivot token: record 0 (1 - 1)/4 = 0 -> not > 0; record 1 (0.1 - 2)/2 = -0.95; record 2 0/2 = 0
    assert record_gate_mask(src, piv, length, record, 3).tolist() == [False] * 5
    assert record_gate_mask(src, piv, length, record, 3, margin=-0.5).tolist() == [True, True, False, False, True]
    assert record_gate_mask(src, piv, length, record, 3, margin=-1.0).tolist() == [True] * 5
    surer = record_gate_mask(src + 0.3, piv, length, record, 3, margin=0.1)  # 0.6 / 4, -1.3 / 2, 0.3 / 2
    assert surer.tolist() == [True, True, False, False, True]


def test_candidate_gate_mask():
    ids = torch.tensor([[5, 3, -1], [7, -1, -1], [-1, -1, -1], [2, 9, 4]])
    gold = torch.tensor([3, 8, 0, 4])
    assert candidate_gate_mask(ids, gold).tolist() == [True, False, False, True]
    assert not candidate_gate_mask(ids, torch.full((4,), -1)).any()  # an empty slot never names a token


def test_the_shipped_combination_lets_a_source_teach_only_where_both_gates_do(world):
    """recipes/recommended.yaml's gate, candidate+chunk at margin -2, on a real batch of the tiny sources: the AND of
    its two gates, and each gate drops positions the other lets in. The tiny sources (vocabularies of a few hundred)
    beat the pivot on every chunk by far, so the chunk gate is also checked at a margin where it bites: the
    median gain over the candidate gate's positions."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from fuse_trainer.config import resolve_config
    from fuse_trainer.data import FusionData, collate, discover_sources
    from fuse_trainer.gates import one_gate, teacher_gate
    from fuse_trainer.losses import chunk_logprob_sum
    from fuse_trainer.train import gold_logprobs

    shipped = resolve_config({})
    assert shipped.gates == ("candidate", "chunk") and shipped.gate_margin == -2.0
    data = FusionData(discover_sources(world["cache"], "pivot"))
    shard, rows = data.plan(0, 256, seed=0)[0]
    batch = collate(data.shard(shard), rows)
    model = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    piv_gold = gold_logprobs(logits, batch.labels, torch.logsumexp(logits, dim=-1))  # (B, T)
    dropped_by = {"candidate": 0, "chunk": 0}
    for src in batch.sources.values():
        candidate = one_gate("candidate", batch, src, piv_gold, 0.0)  # (N,)
        piv_chunk, _ = chunk_logprob_sum(piv_gold, src.row, src.pos, batch.num_positions)
        gain = src.chunk_logprob - piv_chunk  # (N,)
        margins = [shipped.gate_margin] + ([float(gain[candidate].median())] if candidate.any() else [])
        for cfg in (replace(shipped, gate_margin=m) for m in margins):
            chunk = one_gate("chunk", batch, src, piv_gold, cfg.gate_margin)
            assert torch.equal(teacher_gate(batch, src, piv_gold, cfg), candidate & chunk)
            assert (one_gate("chunk", batch, src, piv_gold, -2.0) >= chunk).all()  # a lower margin lets more in
        dropped_by["candidate"] += int((chunk & ~candidate).sum())
        dropped_by["chunk"] += int((candidate & ~chunk).sum())
    assert dropped_by["candidate"] > 0 and dropped_by["chunk"] > 0, dropped_by  # each drops what the other lets in
