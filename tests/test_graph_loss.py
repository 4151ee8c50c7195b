"""InfiGFusion's graph-on-logits term: parity with dense graphs, the Gromov-Wasserstein bound, gradients, and the
trainer wiring (off by default, the same losses with weight 0, old runs resume)."""

import itertools

import numpy as np
import pytest
import torch

from fuse_trainer.graph_loss import graph_loss, sorted_within


def _case(seed, records, positions, k, vocab, empty=0.2, dtype=torch.float64):
    """Random (N, K) teacher/student activations, ids without repeats in a row (some -1), and sorted records."""
    g = torch.Generator().manual_seed(seed)
    n = records * positions
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])  # (N, K) distinct per row
    ids[torch.rand(n, k, generator=g) < empty] = -1
    src = torch.rand(n, k, generator=g, dtype=dtype)
    piv = torch.rand(n, k, generator=g, dtype=dtype)
    record = torch.randint(0, records, (n,), generator=g).sort().values
    return src, piv, ids, record


def _dense_graphs(src, piv, ids, record, r):
    """Record r's two co-activation graphs, built explicitly: (n, n) A = X^T X / T and B = Y^T Y / T."""
    rows = (record == r).nonzero().squeeze(-1).tolist()
    nodes = sorted({int(i) for row in rows for i in ids[row] if i >= 0})
    column = {node: c for c, node in enumerate(nodes)}
    x = torch.zeros(len(rows), len(nodes), dtype=src.dtype)
    y = torch.zeros(len(rows), len(nodes), dtype=piv.dtype)
    for t, row in enumerate(rows):
        for slot, node in enumerate(ids[row].tolist()):
            if node >= 0:
                x[t, column[node]], y[t, column[node]] = src[row, slot], piv[row, slot]
    return x.T @ x / len(rows), y.T @ y / len(rows)


def _dense_loss(src, piv, ids, record, records):
    """Reference: the dense graphs' row sums, sorted, compared rank by rank, one record at a time."""
    out = []
    for r in range(records):
        if not bool((record == r).any()):
            out.append(torch.zeros((), dtype=src.dtype))
            continue
        a, b = _dense_graphs(src, piv, ids, record, r)
        out.append((a.sum(1).sort().values - b.sum(1).sort().values).abs().sum())
    return torch.stack(out)


@pytest.mark.parametrize("records,positions,k,vocab", [(1, 1, 1, 3), (1, 6, 4, 9), (3, 5, 4, 12), (4, 7, 10, 40)])
def test_graph_loss_matches_dense_graphs(records, positions, k, vocab):
    src, piv, ids, record = _case(records * 10 + k, records, positions, k, vocab)
    assert torch.allclose(graph_loss(src, piv, ids, record, records), _dense_loss(src, piv, ids, record, records),
                          rtol=1e-12, atol=1e-14)


def test_empty_slots_and_positions_padding_and_absent_records():
    """Values at empty slots are never read; a position with no kept slot adds no node but counts as a position of
    its record (the caller passes only the positions it means); a record with no position has loss 0."""
    src, piv, ids, record = _case(3, 3, 6, 5, 20, empty=0.3)
    ids[record == 1] = -1  # record 1: positions, no node
    record[record == 2] = 3  # record 2 has no position; record 3 does
    expected = _dense_loss(src, piv, ids, record, 4)
    junk_src, junk_piv = src.clone(), piv.clone()
    junk_src[ids < 0], junk_piv[ids < 0] = 1e6, -1e6
    got = graph_loss(junk_src, junk_piv, ids, record, 4)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert got[1] == 0 and got[2] == 0 and got[0] > 0 and got[3] > 0
    empty = graph_loss(src[:0], piv[:0], ids[:0], record[:0], 2)
    assert empty.shape == (2,) and not empty.any()


def test_loss_is_zero_for_a_student_equal_to_the_teacher_and_blind_to_node_order():
    """The strengths are compared by rank, not by node: swapping which ids carry which activations changes nothing."""
    src, piv, ids, record = _case(5, 2, 6, 4, 10, empty=0.0)
    assert not graph_loss(src, src.clone(), ids, record, 2).any()
    relabelled = torch.randperm(10, generator=torch.Generator().manual_seed(1))[ids]
    assert torch.allclose(graph_loss(src, piv, relabelled, record, 2), graph_loss(src, piv, ids, record, 2))


def test_loss_is_a_lower_bound_of_gromov_wasserstein():
    """loss = n^2 W1(row means) <= n^2 sum_ijkl |A_ik - B_jl| pi_ij pi_kl for EVERY coupling pi of the n nodes with
    uniform weights: the product coupling, permutations, and mixtures of permutations."""
    src, piv, ids, record = _case(7, 1, 5, 3, 7, empty=0.0)
    a, b = _dense_graphs(src, piv, ids, record, 0)
    n = a.shape[0]
    loss = graph_loss(src, piv, ids, record, 1)[0]
    cost = (a[:, None, :, None] - b[None, :, None, :]).abs()  # (i, j, k, l) |A_ik - B_jl|

    def gw(pi):
        return torch.einsum("ijkl,ij,kl->", cost, pi, pi)

    g = torch.Generator().manual_seed(0)
    permutations = [torch.eye(n, dtype=a.dtype)[torch.randperm(n, generator=g)] / n for _ in range(20)]
    mixtures = [sum(w * p for w, p in zip(torch.rand(4, generator=g, dtype=a.dtype).softmax(0), chosen))
                for chosen in itertools.combinations(permutations[:6], 4)]
    couplings = [torch.full((n, n), 1.0 / n**2, dtype=a.dtype), *permutations, *mixtures]
    assert all(torch.allclose(c.sum(0), torch.full((n,), 1.0 / n, dtype=a.dtype)) for c in couplings)
    assert all(loss <= n**2 * gw(c) + 1e-12 for c in couplings)
    assert loss > 0


def test_sorted_within_sorts_each_group_in_its_own_slots():
    values = torch.tensor([3.0, 1.0, 2.0, 9.0, 0.0, 5.0, 4.0])
    group = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    assert sorted_within(values, group).tolist() == [1.0, 2.0, 3.0, 9.0, 0.0, 4.0, 5.0]


def test_graph_loss_gradcheck():
    src, piv, ids, record = _case(11, 2, 3, 3, 8, empty=0.2)
    piv.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: graph_loss(src, p, ids, record, 2), (piv,))


def test_float32_inputs_give_float32_losses():
    src, piv, ids, record = _case(2, 2, 4, 3, 9, dtype=torch.float32)
    assert graph_loss(src, piv.half(), ids, record, 2).dtype == torch.float32


# ---------------------------------------------------------------- the trainer


def _micro_batch(world, **settings):
    from transformers import AutoModelForCausalLM

    from fuse_trainer.config import TrainConfig
    from fuse_trainer.data import FusionData, collate, discover_sources
    from fuse_trainer.train import micro_batch_terms

    data = FusionData(discover_sources(world["cache"], "pivot"))
    shard, rows = data.plan(0, 512, seed=0)[0]
    batch = collate(data.shard(shard), rows)
    model = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"]).eval()
    with torch.no_grad():
        return batch, micro_batch_terms(model, batch, TrainConfig(**{"mode": "unified", **settings}).validate())


def test_the_graph_term_is_off_by_default_and_adds_its_weight_times_its_sum(world):
    """The recommended recipe's objective is unchanged with graph_weight 0; with a weight w it is that objective plus
    w times the summed graph term, and the summed term is the per-record loss times the record's read positions."""
    from fuse_trainer.config import resolve_config
    from fuse_trainer.graph_loss import graph_loss as per_record_loss

    recommended = {k: v for k, v in vars(resolve_config({})).items() if k in ("loss", "lam", "lambda_scope", "gate",
                                                                            "gate_margin", "weighting")}
    recommended["gate"] = "chunk"  # the tiny random sources rarely name the gold token: the candidate gate lets nothing in
    batch, plain = _micro_batch(world, **recommended)
    _, zero = _micro_batch(world, **recommended, graph_weight=0.0)
    _, on = _micro_batch(world, **recommended, graph_weight=2.5)
    assert len(batch.input_ids) > 1 and plain["gated_in"] > 0
    assert all(torch.equal(plain[k], zero[k]) for k in plain) and plain["graph_sum"] == 0
    assert on["graph_sum"] > 0
    assert torch.allclose(on["objective_sum"], plain["objective_sum"] + 2.5 * on["graph_sum"], rtol=1e-6)
    assert all(torch.equal(plain[k], on[k]) for k in plain if k not in ("objective_sum", "graph_sum"))

    from transformers import AutoModelForCausalLM

    from fuse_trainer.config import TrainConfig
    from fuse_trainer.train import source_scores
    from fuse_trainer.weighting import source_weights

    settings = dict(loss="topk-kl", gate="none", weighting="avgce", graph_weight=1.0)
    _, weighted = _micro_batch(world, **settings)
    model = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"]).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    weights = source_weights(source_scores(batch, TrainConfig(**settings)), "avgce", 1.0)  # (S, B)
    assert 0 < float(weights.min()) < float(weights.max()) < 1  # records weigh the sources differently
    expected = 0.0
    for s, src in enumerate(batch.sources.values()):
        read = batch.loss_mask[src.row, src.pos] & (src.topk_ids >= 0).any(-1)
        ids = src.topk_ids[read]
        row, pos = src.row[read], src.pos[read]
        piv_p = torch.softmax(logits[row, pos], -1).gather(-1, ids.clamp_min(0))
        src_p = (src.topk_logits[read] - src.lse[read, None]).exp()
        per_record = per_record_loss(src_p, piv_p, ids, row, len(batch.input_ids))
        expected += (per_record * torch.bincount(row, minlength=len(batch.input_ids)) * weights[s]).sum()
    assert torch.allclose(weighted["graph_sum"], expected, rtol=1e-5)


def test_training_logs_the_graph_term_and_a_run_saved_before_it_existed_resumes(world, tmp_path):
    import json

    import yaml

    from fuse_trainer.data import discover_sources
    from fuse_trainer.train import train_run
    from tests.runs import run_losses, train_config

    layers = discover_sources(world["cache"], "pivot")
    plain, graph = tmp_path / "plain", tmp_path / "graph"
    train_run(train_config(world, plain, max_steps=2), layers, plain, log=lambda *_: None)
    train_run(train_config(world, graph, max_steps=2, graph_weight=1.0), layers, graph, log=lambda *_: None)
    first = json.loads((graph / "metrics.jsonl").read_text().splitlines()[0])
    assert first["graph"] > 0 and "graph" not in json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
    assert not np.allclose(run_losses(plain), run_losses(graph))

    saved = plain / "final" / "fusion_config.yaml"
    saved.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(saved.read_text()).items() if k != "graph_weight"}))
    messages = []
    train_run(train_config(world, plain, max_steps=2, resume=True), layers, plain, log=messages.append)
    assert "already trained" in messages[-1] and any("saved before graph_weight existed" in m for m in messages)
    with pytest.raises(ValueError, match="other settings.*'graph_weight': \\(0.0, 1.0\\)"):
        train_run(train_config(world, plain, max_steps=2, resume=True, graph_weight=1.0), layers, plain,
                  log=messages.append)


def test_graph_weight_is_a_research_flag_and_is_refused_where_it_means_nothing():
    from click.testing import CliRunner

    from fuse_trainer.cli import train
    from fuse_trainer.config import TrainConfig, resolve_config

    research = CliRunner().invoke(train, ["--help"]).output.split("Research options")[1]
    assert "--graph-weight" in research
    assert resolve_config({}).graph_weight == 0.0
    assert TrainConfig(graph_weight=1.0).needed_statistics()["logsumexp"].startswith("--graph-weight")
    for bad, message in ((dict(graph_weight=-1.0), "graph_weight must be 0"),
                         (dict(mode="sft", graph_weight=1.0), "mode sft learns the gold text only: drop graph_weight")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).validate()
