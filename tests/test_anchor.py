"""The anchored recipe (recipes/anchored.yaml): a checkpoint fuse-train wrote, cached with cache-build as a source
(the SFT-only pivot as its own teacher), and a run that trains from caches in two roots with it."""

import json
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from cache_builder.align import align_cache
from cache_builder.build import BuildSettings, build_cache
from fuse_trainer.cli import train
from fuse_trainer.train import fuse_train
from tests.runs import train_args, train_config


def _first_step(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def teacher(world, tmp_path_factory):
    """SFT the pivot a few steps, copy its final checkpoint to a folder named `sft` (the source's name), cache it
    over the world's corpus and align it to the pivot: (the checkpoint, the cache root)."""
    tmp_path = tmp_path_factory.mktemp("anchor")
    final = fuse_train(train_config(world, tmp_path / "sft-run", mode="sft", lam=0.0, max_steps=4), log=lambda *_: None)
    teacher = tmp_path / "teachers" / "sft"
    shutil.copytree(final, teacher)
    build_cache(world["corpus"], BuildSettings(model=str(teacher), top_k=4, rows_per_shard=5, batch_tokens=256,
                                               position_chunk=16), tmp_path / "cache-anchor", log=lambda *_: None)
    align_cache(tmp_path / "cache-anchor" / "sft", str(world["models"]["pivot"]), log=lambda *_: None)
    return teacher, tmp_path / "cache-anchor"


def test_an_sft_checkpoint_cached_as_a_source_teaches_itself_with_no_divergence(world, teacher, tmp_path):
    """The cached top-k of the SFT checkpoint, scored against that same checkpoint as the student, diverge by no
    more than the float16 storage of the logits; against the untrained pivot they diverge clearly. So a
    checkpoint of ours is a faithful source, as the anchored recipe needs."""
    checkpoint, anchor = teacher
    kl = {}
    for name, student in (("itself", checkpoint), ("untrained", world["models"]["pivot"])):
        cfg = train_config(world, tmp_path / name, shards=str(anchor), pivot=str(student), gate="none", max_steps=1)
        fuse_train(cfg, log=lambda *_: None)
        kl[name] = _first_step(tmp_path / name)["fusion"]
    assert 0 <= kl["itself"] < 1e-5 and kl["untrained"] > 0.01, kl


def test_the_anchored_recipe_trains_from_two_cache_roots(world, teacher, tmp_path):
    """`--recipe anchored` over the world's caches plus the SFT teacher's, with the source names of this world:
    the recipe's λ ramp and the teacher's own gate reach the run, which trains from both roots. With the
    recipe's own names (sft, qwen, gemma3) on caches that lack qwen and gemma3 it stops with one line."""
    _, anchor = teacher
    args = train_args(world, "unified", "--recipe", "anchored", "--max-steps", "3", "--lr", "1e-3", "--dtype", "fp32",
                      "--out", str(tmp_path / "run"), shards=f"{world['cache']},{anchor}")
    runner = CliRunner()
    result = runner.invoke(train, args)
    assert result.exit_code != 0 and "source_domains names 'gemma3', 'qwen', not a source of this run" in result.output
    result = runner.invoke(train, args + ["--source-domains", "sft=prose,srcq=code,srcg=code"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["source_gates"] == {"sft": "none"} and config["lambda_start"] == 0.0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["lambda"] == 0.0 and steps[-1]["lambda"] > 0
    assert len(steps) == 3 and all(np.isfinite([s["loss"] for s in steps]))
    provenance = (tmp_path / "run" / "final" / "fusion_provenance.json").read_text()
    assert all(name in provenance for name in ("srcq", "srcg", "sft"))
