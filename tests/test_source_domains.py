"""source_domains: a source teaches only the records of the domains named for it (e.g. Qwen on code only)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fuse_trainer.cli import parse_per_source, train
from fuse_trainer.config import TrainConfig
from cache_builder.reader import Ragged
from fuse_trainer.data import (FusionData, check_source_domains, collate, discover_sources, emptied_rows,
                                 taught_records)
from tests.runs import train_args


def _terms(model, batch, cfg):
    from fuse_trainer.train import micro_batch_terms

    return {k: v.item() for k, v in micro_batch_terms(model, batch, cfg).items()}


def _rows_of(dataset, rows, domain):
    return np.array([r for r in rows if dataset.domains[r] == domain])


def test_taught_records_and_emptied_rows():
    domains = ["code", "prose", None, "code"]
    assert taught_records(domains, ["code"]).tolist() == [True, False, False, True]
    assert taught_records(domains, ["prose", "code"]).tolist() == [True, True, False, True]
    column = Ragged(np.arange(10).reshape(5, 2), np.array([0, 2, 3, 3, 5]))  # rows of 2, 1, 0, 2 positions
    emptied = emptied_rows(column, np.array([True, False, True, True]))
    assert [emptied.row(r).tolist() for r in range(4)] == [[[0, 1], [2, 3]], [], [], [[6, 7], [8, 9]]]


def test_a_source_taught_on_code_only_is_the_sum_of_both_sources_on_code_and_the_other_alone_elsewhere(world):
    """Unified, MinCE: with srcq teaching code only, a batch's terms equal those of its code records with both
    sources plus those of its prose records with srcg alone (srcq neither distils nor takes MinCE's weight there)."""
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(mode="unified", weighting="mince", lam=0.5, lambda_scope="distilled").validate()
    layers = discover_sources(world["cache"], "pivot")
    restricted = FusionData(layers, source_domains={"srcq": ["code"]})
    everywhere = FusionData(layers)
    model = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"]).eval()
    checked = 0
    for shard, rows in everywhere.plan(0, 256, seed=0):
        dataset = everywhere.shard(shard)
        code, prose = _rows_of(dataset, rows, "code"), _rows_of(dataset, rows, "prose")
        if not len(code) or not len(prose):
            continue
        with torch.no_grad():
            got = _terms(model, collate(restricted.shard(shard), rows), cfg)
            on_code = _terms(model, collate(dataset, code), cfg)
            alone = collate(dataset, prose)
            alone.sources.pop("srcq")
            on_prose = _terms(model, alone, cfg)
            assert on_prose["fusion_sum"] > 0 and on_code["fusion_sum"] > 0  # both parts teach something
            for key in ("fusion_sum", "objective_sum", "sft_sum", "gated_in", "fusion_positions"):
                assert got[key] == pytest.approx(on_code[key] + on_prose[key], rel=1e-4, abs=1e-4), key
            everywhere_terms = _terms(model, collate(dataset, rows), cfg)
        assert got["fusion_positions"] < everywhere_terms["fusion_positions"]  # the restriction removed positions
        checked += 1
    assert checked, "no micro-batch held both code and prose records"


def test_unknown_sources_and_domains_are_refused_by_name(world):
    layers = discover_sources(world["cache"], "pivot")
    check_source_domains(layers, {"srcq": ["code"], "srcg": ["prose", "code"]})
    with pytest.raises(ValueError, match="'qwen', not a source of this run"):
        check_source_domains(layers, {"qwen": ["code"]})
    with pytest.raises(ValueError, match=r"srcq the domain\(s\) cod, which its corpus does not have \(its domains: code, prose\)"):
        check_source_domains(layers, {"srcq": ["cod"]})
    with pytest.raises(ValueError, match="mode sft learns the gold text only: drop source_domains"):
        TrainConfig(mode="sft", source_domains={"srcq": ["code"]}).validate()
    with pytest.raises(ValueError, match="source_domains must map source names to lists"):
        TrainConfig(source_domains={"srcq": []}).validate()


def test_parse_per_source():
    assert parse_per_source("qwen=code+math,gemma3=prose", "--source-domains", "qwen=code") == {
        "qwen": ["code", "math"], "gemma3": ["prose"]}
    assert parse_per_source("", "--source-domains", "qwen=code") == {}
    for bad in ("qwen", "qwen=", "=code", "qwen=code+", "qwen=code,qwen=math"):
        with pytest.raises(ValueError, match=r"--source-gates: .* is not SOURCE=NAME\[\+NAME...\] \(e.g. sft=none\)"):
            parse_per_source(bad, "--source-gates", "sft=none")


def test_fuse_train_source_domains_from_the_command_line(world, tmp_path):
    """The flag reaches the run: saved in its config, a misspelt domain stops it with one line, and a resume
    with other domains is refused."""
    args = train_args(world, "unified", "--max-steps", "2", "--lr", "1e-3", "--out", str(tmp_path / "run"))
    runner = CliRunner()
    result = runner.invoke(train, args + ["--source-domains", "srcq=cod"])
    assert result.exit_code != 0 and "cod, which its corpus does not have" in result.output
    result = runner.invoke(train, args + ["--source-domains", "srcq=code"])
    assert result.exit_code == 0, result.output
    import yaml

    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["source_domains"] == {"srcq": ["code"]}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    result = runner.invoke(train, args + ["--source-domains", "srcq=prose", "--resume"])
    assert result.exit_code != 0 and "source_domains" in result.output


@pytest.mark.parametrize("gate, loss", [("candidate+chunk", "topk-kl"), ("token", "topk-kl"), ("record", "topk-kl"),
                                        ("none", "infifusion"), ("none", "alm"), ("none", "fusellm")])
def test_a_micro_batch_a_source_does_not_teach_at_all_trains_as_without_that_source(world, gate, loss):
    """A batch of prose records only, with srcq teaching code: srcq has no aligned position in it, and every gate,
    loss and MinCE still give the terms of the batch without srcq (the recommended recipe's gates included)."""
    from transformers import AutoModelForCausalLM

    margin = -2.0 if gate in ("candidate+chunk", "record") else 0.0
    cfg = TrainConfig(mode="unified", weighting="mince", lam=0.7, lambda_scope="distilled", gate=gate,
                      gate_margin=margin, loss=loss, uld_top_k=4).validate()
    layers = discover_sources(world["cache"], "pivot")
    restricted = FusionData(layers, source_domains={"srcq": ["code"]})
    model = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"]).eval()
    shard, rows = next((s, r) for s, r in restricted.plan(0, 256, seed=0)
                       if len(_rows_of(restricted.shard(s), r, "prose")))
    prose = _rows_of(restricted.shard(shard), rows, "prose")
    batch = collate(restricted.shard(shard), prose)
    assert batch.sources["srcq"].pos.numel() == 0
    without = collate(restricted.shard(shard), prose)
    without.sources.pop("srcq")
    with torch.no_grad():
        got, expected = _terms(model, batch, cfg), _terms(model, without, cfg)
    assert expected["fusion_positions"] > 0
    for key in ("fusion_sum", "objective_sum", "sft_sum", "gated_in", "fusion_positions"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), key
