"""A λ schedule (`lambda_start`): λ moves linearly from lambda_start at the first step to lambda at the last, and
each step's objective is (1-λ_t)·SFT + λ_t·fusion with that step's λ."""

import json

import pytest

from fuse_trainer.config import TrainConfig
from fuse_trainer.train import fusion_weight, fuse_train
from tests.runs import run_losses, train_config

QUIET = dict(log=lambda *_: None)


def test_lambda_is_constant_without_a_start_and_linear_from_it_with_one():
    constant = TrainConfig(mode="unified", lam=0.7).validate()
    ramp = TrainConfig(mode="unified", lam=0.7, lambda_start=0.0).validate()
    decay = TrainConfig(mode="unified", lam=0.1, lambda_start=0.9).validate()
    assert [fusion_weight(constant, s, 5) for s in range(5)] == [0.7] * 5
    assert [fusion_weight(ramp, s, 5) for s in range(5)] == pytest.approx([0.0, 0.175, 0.35, 0.525, 0.7])
    assert [fusion_weight(decay, s, 3) for s in range(3)] == pytest.approx([0.9, 0.5, 0.1])
    assert fusion_weight(ramp, 0, 1) == 0.0  # a one-step run trains at the start value


@pytest.mark.parametrize("settings, message", [
    (dict(mode="unified", lambda_start=1.5), "lambda_start must be in [0, 1]"),
    (dict(mode="sft", lambda_start=0.0), "mode sft learns the gold text only: drop lambda_start"),
])
def test_a_lambda_start_out_of_range_or_for_sft_is_refused_naming_it(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig(**settings).validate()


def test_each_step_trains_with_its_scheduled_lambda(world, tmp_path):
    fuse_train(train_config(world, tmp_path / "ramp", mode="unified", lam=0.5, lambda_start=0.0), **QUIET)
    steps = [json.loads(line) for line in (tmp_path / "ramp" / "metrics.jsonl").read_text().splitlines()]
    assert [s["lambda"] for s in steps] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    for s in steps:  # lambda_scope all: the objective is (1-λ)·SFT + λ·fusion, per response token
        assert s["loss"] == pytest.approx((1 - s["lambda"]) * s["sft"] + s["lambda"] * s["fusion"], rel=1e-5)
    assert steps[-1]["fusion"] > 0


def test_a_schedule_from_lambda_to_itself_trains_the_constant_lambda_run(world, tmp_path):
    fuse_train(train_config(world, tmp_path / "constant", mode="unified", lam=0.5), **QUIET)
    fuse_train(train_config(world, tmp_path / "flat", mode="unified", lam=0.5, lambda_start=0.5), **QUIET)
    assert run_losses(tmp_path / "flat") == run_losses(tmp_path / "constant")
