"""domain_epochs: a domain trained in the first N epochs only (e.g. prose seen once, the rest twice)."""

import json
from collections import Counter

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from fuse_trainer.cli import parse_domain_epochs, train
from fuse_trainer.config import TrainConfig
from fuse_trainer.data import FusionData, check_domain_epochs, discover_sources
from fuse_trainer.stream import MicroBatchStream
from tests.runs import train_args


def _served(data, plan):
    """Counter of the domains of the records a plan serves, and the (group, row) pairs it serves."""
    pairs = sorted((g, int(r)) for g, rows in plan for r in rows)
    return Counter(data.index[g].domains[r] for g, r in pairs), pairs


def test_a_domain_with_one_epoch_is_in_the_first_epoch_only_and_the_rest_in_every_epoch(world):
    layers = discover_sources(world["cache"], "pivot")
    every = FusionData(layers, window=2)
    once = FusionData(layers, window=2, domain_epochs={"prose": 1})
    first, all_pairs = _served(every, every.plan(0, 64, seed=0))
    assert first["prose"] and first["code"]
    assert [(g, r.tolist()) for g, r in once.plan(0, 64, seed=0)] == [(g, r.tolist()) for g, r in every.plan(0, 64, seed=0)]
    for epoch in (1, 2):
        later, pairs = _served(once, once.plan(epoch, 64, seed=0))
        assert later == Counter(code=first["code"])  # every code record once, no prose record
        assert pairs == [(g, r) for g, r in all_pairs if every.index[g].domains[r] == "code"]
    never_after_two = FusionData(layers, window=2, domain_epochs={"prose": 2})
    assert _served(never_after_two, never_after_two.plan(1, 64, seed=0))[0] == first
    assert "prose" not in _served(never_after_two, never_after_two.plan(2, 64, seed=0))[0]


def test_epochs_count_the_planned_micro_batches_when_later_epochs_are_shorter(world):
    layers = discover_sources(world["cache"], "pivot")
    every = MicroBatchStream(FusionData(layers, window=2), 64, seed=0)
    assert every.run_length(2.5) == int(2.5 * every.per_epoch)  # runs without domain_epochs: unchanged
    once = MicroBatchStream(FusionData(layers, window=2, domain_epochs={"prose": 1}), 64, seed=0)
    first, later = once.epoch_length(0), once.epoch_length(1)
    assert later < first
    assert once.run_length(2) == first + later
    assert once.run_length(2.5) == first + later + int(0.5 * once.epoch_length(2))
    served = [once[i] for i in range(once.run_length(2))]
    assert [(g, r.tolist()) for g, r in served] == [(g, r.tolist()) for e in (0, 1) for g, r in once.epoch(e)]


def test_unknown_domains_and_bad_counts_are_refused_by_name(world):
    layers = discover_sources(world["cache"], "pivot")
    check_domain_epochs(layers, {"prose": 1})
    with pytest.raises(ValueError, match=r"the domain\(s\) pros, which the corpus does not have \(its domains: code, prose\)"):
        check_domain_epochs(layers, {"pros": 1})
    with pytest.raises(ValueError, match="domain_epochs must map domains to a number of epochs of at least 1"):
        TrainConfig(domain_epochs={"prose": 0}).validate()
    assert parse_domain_epochs("prose=1,math=2") == {"prose": 1, "math": 2}
    assert parse_domain_epochs("") == {}
    for bad in ("prose", "prose=", "=1", "prose=0", "prose=one", "prose=1,prose=2"):
        with pytest.raises(ValueError, match="is not DOMAIN=EPOCHS"):
            parse_domain_epochs(bad)


def test_fuse_train_domain_epochs_from_the_command_line(world, tmp_path):
    """The flag reaches the run: fewer steps for the same --epochs (the later epochs are shorter), saved in its
    config, and a resume with another value is refused; SFT takes it too (it is about the data, not the sources)."""
    args = train_args(world, "sft", "--epochs", "2", "--lr", "1e-3")
    runner = CliRunner()
    result = runner.invoke(train, args + ["--out", str(tmp_path / "every")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(train, args + ["--domain-epochs", "prose=1", "--out", str(tmp_path / "once")])
    assert result.exit_code == 0, result.output

    def steps(run):
        return [json.loads(line)["step"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    layers = discover_sources(world["cache"], "pivot")
    expected = MicroBatchStream(FusionData(layers, window=8, domain_epochs={"prose": 1}), 256, seed=0).run_length(2)
    assert len(steps("once")) == expected < len(steps("every"))
    assert yaml.safe_load((tmp_path / "once" / "config.yaml").read_text())["domain_epochs"] == {"prose": 1}
    result = runner.invoke(train, args + ["--domain-epochs", "prose=2", "--out", str(tmp_path / "once"), "--resume"])
    assert result.exit_code != 0 and "domain_epochs" in result.output
    result = runner.invoke(train, args + ["--domain-epochs", "pros=1", "--out", str(tmp_path / "typo")])
    assert result.exit_code != 0 and "pros, which the corpus does not have" in result.output
