"""Every command meets a newcomer's mistakes with one line that names the fix, exit code 2, never a traceback."""

import pytest
from click.testing import CliRunner

from cache_builder.cli import build
from fuse_trainer.cli import evaluate, merge, train


def run(command, args: list[str]):
    result = CliRunner().invoke(command, args)
    return result.exit_code, result.output


def test_fuse_eval_with_an_unknown_model_names_the_choices(world):
    code, output = run(evaluate, ["--model", "x=nosuch", "--data", str(world["corpus"]), "--device", "cpu"])
    assert code == 2 and "Traceback" not in output
    assert "error: --model x=nosuch: unknown model 'nosuch': use one of ['gemma3', 'qwen', 'smollm2']" in output


def test_fuse_merge_with_an_unknown_base_names_the_choices(tmp_path):
    code, output = run(merge, ["--base", "nosuch", "--model", str(tmp_path), "--out", str(tmp_path / "merged")])
    assert code == 2 and "error: --base nosuch: unknown model 'nosuch'" in output and "Traceback" not in output


def test_cache_build_over_a_corpus_of_bad_records_fails_and_writes_nothing(world, tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": 5}\nnot json\n')
    code, output = run(build, ["--model", str(world["models"]["srcq"]), "--corpus", str(corpus), "--out",
                               str(tmp_path / "cache")])
    assert code == 2 and "Traceback" not in output
    assert f"error: {corpus}: no usable record (2 bad, listed above): fix them" in output
    assert not (tmp_path / "cache").exists()


def test_fuse_train_over_a_missing_cache_root_says_how_to_build_one(tmp_path):
    nowhere = tmp_path / "nowhere"
    code, output = run(train, ["--shards", str(nowhere), "--pivot", "smollm2"])
    assert code == 2 and "Traceback" not in output and "cache-align" not in output
    assert f"error: cache root {nowhere} does not exist: build one with `cache-build" in output


@pytest.mark.parametrize("args, line", [
    (["--recipe", "nosuch"], "error: no recipe 'nosuch': give a YAML file or one of"),
    (["--gate", "cand"], "gate must be one of"),
    (["--top-k", "4"], "--top-k is now --uld-top-k"),
])
def test_fuse_train_refuses_bad_settings_before_reading_anything(tmp_path, args, line):
    code, output = run(train, ["--shards", str(tmp_path), *args])
    assert code == 2 and line in output and "Traceback" not in output


@pytest.mark.parametrize("old, new", [("--method", "--merge"), ("--density", "--ties-density"),
                                      ("--weights", "--merge-weights")])
def test_fuse_merge_refuses_its_old_option_names_with_the_recipe_names(tmp_path, old, new):
    code, output = run(merge, ["--base", "smollm2", "--model", str(tmp_path), "--out", str(tmp_path / "m"), old, "1"])
    assert code == 2 and f"{old} is now {new}" in output
