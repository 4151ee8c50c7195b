"""fuse-train configuration: YAML file < command-line flags, unknown keys refused, SFT mode means λ = 0."""

import pytest
import torch
from click.testing import CliRunner

from fuse_trainer.cli import evaluate, train
from fuse_trainer.config import TrainConfig, load_yaml, resolve_config
from cache_builder.models import pick_device


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss: alm\nlambda: 0.3\ntemperature: 0.5\ngate: token\n")
    cfg = resolve_config(load_yaml(path), {"temperature": 2.0})
    assert (cfg.loss, cfg.lam, cfg.temperature, cfg.gate) == ("alm", 0.3, 2.0, "token")


def test_unknown_yaml_keys_are_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss: alm\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown settings \\['learning_rate'\\]"):
        load_yaml(path)


def test_invalid_values_name_the_choices():
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="nope").validate()
    assert TrainConfig(mode="sft", lam=0.7).validate().lam == 0.0
    with pytest.raises(ValueError, match="only the token/chunk/record gates do: drop gate_margin"):
        TrainConfig(gate="candidate", gate_margin=1.0).validate()
    assert TrainConfig(gate="candidate+token", gate_margin=1.0).validate().gates == ("candidate", "token")
    for bad in ("cand", "candidate+none", "token+token"):
        with pytest.raises(ValueError, match="gate must be one of"):
            TrainConfig(gate=bad).validate()


def test_cli_reports_a_missing_cache_clearly(tmp_path):
    result = CliRunner().invoke(train, ["--shards", str(tmp_path), "--pivot", "smollm2", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "no source under" in result.output and "cache-align" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_cuda_without_a_gpu_names_the_fix(tmp_path):
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="use --device cpu"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        TrainConfig(device="tpu").validate()
    result = CliRunner().invoke(evaluate, ["--model", "smollm2", "--data", str(tmp_path), "--device", "cuda"])
    assert result.exit_code == 2 and "use --device cpu" in result.output and "Traceback" not in result.output
