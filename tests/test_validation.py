"""Validation during training (fuse-train --eval-every, --keep-best) on the tiny models of the `world` fixture.

The fixture's corpus has train and heldout records; these runs score the heldout split (--eval-split heldout).
"""

import json
import math
import subprocess
import sys

import pytest

from cache_builder.manifest import CacheError
from fuse_trainer.config import TrainConfig, dump_yaml
from fuse_trainer.data import discover_sources
from fuse_trainer.evaluate import evaluate_model
from fuse_trainer.plot import plot_runs
from fuse_trainer.train import fuse_train, train_run
from fuse_trainer.validation import cache_records
from tests.runs import kill_9_when, run_losses, train_config

QUIET = dict(log=lambda *_: None)
# a high rate: the heldout code figure passes its minimum at step 3 and rises after it (the pooled one keeps falling)
SCORED = dict(eval_split="heldout", eval_every=1, lr=0.1, max_steps=8)


def logged(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def heldout(world):
    return cache_records(discover_sources(world["cache"], "pivot"), "heldout")


@pytest.mark.parametrize("metric", ["all", "code"])
def test_keep_best_keeps_the_step_with_the_best_logged_figure(world, tmp_path, metric):
    final = fuse_train(train_config(world, tmp_path / "run", keep_best=metric, **SCORED), **QUIET)
    rows = logged(tmp_path / "run")
    figures = {r["step"]: r["val_bpb"][metric] for r in rows}
    best_step = min(figures, key=figures.get)
    assert set(figures) == set(range(1, 9))
    assert best_step < 8 or metric == "all"  # on code the last step is not the best: a real choice
    kept = json.loads((final / "best.json").read_text())
    assert kept["step"] == best_step and kept["metric"] == metric
    assert [r["step"] for r in rows if r.get("best")][-1] == best_step
    # final/ holds that step's model: fuse-eval on it gives the figure logged at that step
    again = {r.domain: r.bits_per_byte for r in evaluate_model(str(final), heldout(world))}
    assert again[metric] == pytest.approx(figures[best_step], rel=1e-5)
    assert not (tmp_path / "run" / "best").exists() and not (tmp_path / "run" / "checkpoint").exists()


def test_the_logged_figure_is_fuse_eval_of_the_model_at_that_step(world, tmp_path):
    final = fuse_train(train_config(world, tmp_path / "run", eval_split="heldout", eval_every=4), **QUIET)
    rows = logged(tmp_path / "run")
    assert [r["step"] for r in rows if "val_bpb" in r] == [4, 6]  # every 4 steps, and the last one (max_steps 6)
    expected = {r.domain: r.bits_per_byte for r in evaluate_model(str(final), heldout(world))}
    assert rows[-1]["val_bpb"] == pytest.approx(expected, rel=1e-5)
    assert set(expected) == {"code", "prose", "all"}


def test_eval_every_does_not_change_the_training_losses(world, tmp_path):
    fuse_train(train_config(world, tmp_path / "plain"), **QUIET)
    fuse_train(train_config(world, tmp_path / "scored", eval_split="heldout", eval_every=1, keep_best="all"), **QUIET)
    plain, scored = run_losses(tmp_path / "plain"), run_losses(tmp_path / "scored")
    assert len(plain) == 6 and scored == pytest.approx(plain, rel=1e-6)


def test_resume_keeps_the_best(world, tmp_path):
    layers = discover_sources(world["cache"], "pivot")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_run(train_config(world, straight, keep_best="code", **SCORED), layers, straight, **QUIET)
    train_run(train_config(world, broken, keep_best="code", save_every=2, **SCORED), layers, broken, stop_after=4, **QUIET)
    kept_before = json.loads((broken / "best" / "best.json").read_text())
    (broken / "best").rename(broken / ".best.old")  # killed between the two renames of a best/ save
    train_run(train_config(world, broken, keep_best="code", save_every=2, resume=True, **SCORED), layers, broken, **QUIET)
    kept = json.loads((broken / "final" / "best.json").read_text())
    assert kept == json.loads((straight / "final" / "best.json").read_text()) == kept_before  # a step before the stop
    assert [r.get("val_bpb") for r in logged(broken)] == [r.get("val_bpb") for r in logged(straight)]


def test_kill_9_and_resume_keep_the_best(world, tmp_path):
    straight = tmp_path / "straight"
    train_run(train_config(world, straight, keep_best="code", **SCORED), discover_sources(world["cache"], "pivot"),
              straight, **QUIET)
    killed = tmp_path / "killed"
    recipe = tmp_path / "recipe.yaml"  # the straight run's settings, as a recipe
    recipe.write_text(dump_yaml(train_config(world, killed, keep_best="code", save_every=4, **SCORED)))
    command = [sys.executable, "-c", "from fuse_trainer.cli import train; train()", "--recipe", str(recipe)]
    kill_9_when(command, killed / "checkpoint" / "trainer_state.pt")
    assert not (killed / "final").exists() and (killed / "best" / "best.json").exists()  # killed past a best and a checkpoint
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    kept, expected = (json.loads((run / "final" / "best.json").read_text()) for run in (killed, straight))
    assert kept["step"] == expected["step"] <= 4  # scored by the killed process only: the resumed one starts at 4
    assert kept["val_bpb"] == pytest.approx(expected["val_bpb"], rel=1e-5)


def test_pairwise_keeps_each_sources_best_and_scores_the_merged_model(world, tmp_path):
    merged = fuse_train(train_config(world, tmp_path / "pw", mode="pairwise", keep_best="all", **SCORED), **QUIET)
    for source in ("srcq", "srcg"):
        run = tmp_path / "pw" / f"pairwise-{source}"
        figures = {r["step"]: r["val_bpb"]["all"] for r in logged(run)}
        assert json.loads((run / "final" / "best.json").read_text())["step"] == min(figures, key=figures.get)
    scored = json.loads((merged / "validation.json").read_text())
    expected = {r.domain: r.bits_per_byte for r in evaluate_model(str(merged), heldout(world))}
    assert scored == {"split": "heldout", "val_bpb": pytest.approx(expected, rel=1e-6)}


def test_a_split_the_cache_lacks_and_an_unknown_domain_are_refused(world, tmp_path):
    with pytest.raises(CacheError, match="no records of split 'validation'.*--eval-split"):
        fuse_train(train_config(world, tmp_path / "a", eval_every=2), **QUIET)
    with pytest.raises(ValueError, match="--keep-best math: the heldout split has no such domain"):
        fuse_train(train_config(world, tmp_path / "b", eval_split="heldout", eval_every=2, keep_best="math"), **QUIET)


def test_keep_best_needs_eval_every_and_the_eval_split_is_never_trained_on():
    with pytest.raises(ValueError, match="give eval_every too"):
        TrainConfig(keep_best="all").validate()
    with pytest.raises(ValueError, match="eval_split 'generated' is trained on"):
        TrainConfig(train_splits=["train", "generated"], eval_split="generated").validate()


def test_the_curves_plot_has_a_validation_panel(world, tmp_path):
    fuse_train(train_config(world, tmp_path / "runs" / "scored", eval_split="heldout", eval_every=2), **QUIET)
    fuse_train(train_config(world, tmp_path / "runs" / "plain"), **QUIET)
    import matplotlib.pyplot as plt

    png = plot_runs(tmp_path / "runs", tmp_path / "curves.png")
    axes = plt.gcf().axes
    assert png.stat().st_size > 0 and len(axes) == 3
    lines = axes[2].get_lines()
    assert len(lines) == 1 and list(lines[0].get_xdata()) == [2, 4, 6]
    assert all(math.isfinite(y) for y in lines[0].get_ydata())
