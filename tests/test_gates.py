"""fuse_trainer.gates: each teacher gate against a hand-worked case, and the shipped combination candidate+chunk."""

import pytest
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
            assert torch.equal(teacher_gate(batch, src, piv_gold, cfg.gates, cfg.gate_margin), candidate & chunk)
            assert (one_gate("chunk", batch, src, piv_gold, -2.0) >= chunk).all()  # a lower margin lets more in
        dropped_by["candidate"] += int((chunk & ~candidate).sum())
        dropped_by["chunk"] += int((candidate & ~chunk).sum())
    assert dropped_by["candidate"] > 0 and dropped_by["chunk"] > 0, dropped_by  # each drops what the other lets in


def test_a_source_with_a_gate_of_its_own_is_gated_by_it_and_the_others_by_gate(world):
    """source_gates: srcq ungated, srcg behind the candidate gate. Each source's gated-in positions are those of
    the same batch holding it alone under its own gate, and the fusion sum (uniform weights, 1/2 each with two
    sources) is half of each alone; naming both sources with `none` is the run with --gate none."""
    from transformers import AutoModelForCausalLM

    from fuse_trainer.config import TrainConfig
    from fuse_trainer.data import FusionData, collate, discover_sources
    from fuse_trainer.train import micro_batch_terms

    data = FusionData(discover_sources(world["cache"], "pivot"))
    shard, rows = data.plan(0, 256, seed=0)[0]
    model = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"]).eval()

    def terms(gate, source_gates=None, only=None):
        cfg = TrainConfig(mode="unified", weighting="uniform", lam=0.5, gate=gate,
                          source_gates=source_gates or {}).validate()
        batch = collate(data.shard(shard), rows)
        if only:
            batch.sources = {only: batch.sources[only]}
        with torch.no_grad():
            return {k: v.item() for k, v in micro_batch_terms(model, batch, cfg).items()}

    mixed = terms("candidate", {"srcq": "none"})
    q_alone, g_alone = terms("none", only="srcq"), terms("candidate", only="srcg")
    assert mixed["gated_in"] == q_alone["gated_in"] + g_alone["gated_in"]
    assert mixed["fusion_sum"] == pytest.approx((q_alone["fusion_sum"] + g_alone["fusion_sum"]) / 2, rel=1e-5)
    assert terms("candidate")["gated_in"] < mixed["gated_in"] < terms("none")["gated_in"]  # each gate does something
    both = terms("candidate", {"srcq": "none", "srcg": "none"})
    assert both == pytest.approx(terms("none"), rel=1e-6)
    with pytest.raises(ValueError, match="source_gates must map source names to a gate as --gate takes it"):
        TrainConfig(source_gates={"srcq": "none+candidate"}).validate()
    with pytest.raises(ValueError, match="mode sft learns the gold text only: drop source_gates"):
        TrainConfig(mode="sft", source_gates={"srcq": "none"}).validate()
    needed = TrainConfig(gate="candidate", source_gates={"srcq": "chunk"}).validate().needed_statistics()
    assert needed["chunk_logprob"] == "--gate chunk"  # an imported cache without it is refused up front


def test_fuse_train_source_gates_from_the_command_line(world, tmp_path):
    """The flag reaches the run's config; an unknown source or gate stops it with one line naming it."""
    import yaml
    from click.testing import CliRunner

    from fuse_trainer.cli import train
    from tests.runs import train_args

    args = train_args(world, "unified", "--max-steps", "1", "--gate", "candidate+chunk", "--out", str(tmp_path / "run"))
    runner = CliRunner()
    result = runner.invoke(train, args + ["--source-gates", "qwen=none"])
    assert result.exit_code != 0 and "source_gates names 'qwen', not a source of this run (srcg, srcq" in result.output
    result = runner.invoke(train, args + ["--source-gates", "srcq=nothing"])
    assert result.exit_code != 0 and "source_gates must map source names to a gate" in result.output
    result = runner.invoke(train, args + ["--source-gates", "srcq=none,srcg=candidate"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["source_gates"] == {"srcq": "none", "srcg": "candidate"} and saved["gate"] == "candidate+chunk"
