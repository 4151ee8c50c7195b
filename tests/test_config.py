"""fuse-train configuration: recommended recipe < --recipe < command-line flags, unknown and renamed keys refused,
SFT mode means λ = 0."""

import pytest
import torch
from click.testing import CliRunner

from fuse_trainer.cli import evaluate, train
from fuse_trainer.config import RECIPES, TrainConfig, load_yaml, recipe_names, resolve_config
from cache_builder.models import pick_device


def test_recommended_then_recipe_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss: alm\nlambda: 0.3\nalm_temperature: 0.5\ngate: token\n")
    cfg = resolve_config({"alm_temperature": 2.0}, str(path))
    assert (cfg.loss, cfg.lam, cfg.alm_temperature, cfg.gate, cfg.recipe) == ("alm", 0.3, 2.0, "token", str(path))
    assert cfg.lambda_scope == "distilled" and cfg.lr == 2e-4  # what the file leaves out: the recommended recipe's
    assert resolve_config({}, "sft").mode == "sft" and resolve_config({}, "sft").lam == 0.0


def test_every_shipped_recipe_loads_and_says_what_it_is_for():
    assert {"recommended", "sft", "infifusion", "fusellm"} <= set(recipe_names())
    for name in recipe_names():
        header = (RECIPES / f"{name}.yaml").read_text().split("\n\n")[0]
        assert header.startswith("# ") and len(header) > 80, name
        resolve_config({}, name)
    with pytest.raises(ValueError, match="no recipe 'nope': give a YAML file or one of anchored, fusellm, infifusion"):
        resolve_config({}, "nope")


def test_the_defaults_are_the_recommended_recipe():
    recommended = load_yaml(RECIPES / "recommended.yaml")
    cfg = resolve_config({})
    assert cfg.recipe == "recommended" and recommended and all(getattr(cfg, k) == v for k, v in recommended.items())
    assert (cfg.loss, cfg.lam, cfg.gate, cfg.gate_margin, cfg.weighting) == ("topk-kl", 0.7, "candidate+chunk", -2.0, "mince")


def test_renamed_settings_are_refused_with_their_new_names(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("top_k: 4\ntemperature: 0.5\n")
    with pytest.raises(ValueError, match="temperature is now fusion_temperature .* or alm_temperature .*top_k is now uld_top_k"):
        load_yaml(path)
    for old, new in (("--top-k", "--uld-top-k"), ("--temperature", "--fusion-temperature"), ("--config", "--recipe")):
        result = CliRunner().invoke(train, [old, "1"])
        assert result.exit_code == 2 and f"{old} is now {new}" in result.output, result.output


def test_help_lists_the_research_options_apart():
    text = CliRunner().invoke(train, ["--help"]).output
    options, research = text.split("Research options")
    assert "--recipe" in options and "--out" in options and "--gate" not in options
    assert all(flag in research for flag in ("--gate", "--lambda", "--uld-top-k", "--fusion-temperature"))


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
