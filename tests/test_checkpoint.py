"""fuse_trainer.checkpoint: resume equals an uninterrupted run, saves survive kills, and the settings rules."""

import numpy as np
import pytest

from fuse_trainer.data import discover_sources
from fuse_trainer.train import train_run
from tests.runs import run_losses, train_config


def test_resume_matches_an_uninterrupted_run(world, tmp_path):
    straight = tmp_path / "straight"
    train_run(train_config(world, straight, save_every=2), discover_sources(world["cache"], "pivot"), straight, log=lambda *_: None)
    broken = tmp_path / "broken"
    layers = discover_sources(world["cache"], "pivot")
    train_run(train_config(world, broken, save_every=2), layers, broken, log=lambda *_: None, stop_after=4)
    assert len(run_losses(broken)) == 4
    train_run(train_config(world, broken, save_every=2, resume=True), layers, broken, log=lambda *_: None)
    assert np.allclose(run_losses(broken), run_losses(straight), rtol=1e-5, atol=1e-6)
    assert not (broken / "checkpoint").exists()  # the final model supersedes it
    messages = []
    train_run(train_config(world, broken, save_every=2, resume=True), layers, broken, log=messages.append)
    assert any("nothing to do" in m for m in messages) and len(run_losses(broken)) == 6  # a rerun trains nothing
    with pytest.raises(ValueError, match="other settings"):  # --resume never continues or returns another run
        train_run(train_config(world, broken, save_every=2, resume=True, lr=1e-3), layers, broken, log=messages.append)
    train_run(train_config(world, broken, save_every=2, lr=1e-3), layers, broken, log=messages.append)
    assert not np.allclose(run_losses(broken), run_losses(straight))  # without --resume: trained again, from scratch


def test_activation_checkpointing_trains_the_same_model_and_may_change_on_resume(world, tmp_path, monkeypatch):
    """Recomputing the activations in the backward pass changes memory, not the model: the same losses step for step,
    and a run stopped without it resumes with it."""
    from transformers import PreTrainedModel

    enabled = []
    turn_on = PreTrainedModel.activation_checkpointing_enable

    def spy(model, *args, **kwargs):
        turn_on(model, *args, **kwargs)
        enabled.append(model.is_activation_checkpointing)

    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", spy)
    layers = discover_sources(world["cache"], "pivot")
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    train_run(train_config(world, plain), layers, plain, log=lambda *_: None)
    train_run(train_config(world, recomputed, save_every=2), layers, recomputed, log=lambda *_: None, stop_after=2)
    assert enabled == []
    train_run(train_config(world, recomputed, save_every=2, resume=True, activation_checkpointing=True), layers,
              recomputed, log=lambda *_: None)
    assert enabled == [True]  # on for the resumed steps 3-6
    assert len(run_losses(recomputed)) == 6
    assert np.allclose(run_losses(recomputed), run_losses(plain), rtol=1e-5, atol=1e-6)


def test_resume_survives_a_kill_between_the_checkpoint_renames(world, tmp_path):
    layers = discover_sources(world["cache"], "pivot")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_run(train_config(world, straight), layers, straight, log=lambda *_: None)
    train_run(train_config(world, broken, save_every=2), layers, broken, log=lambda *_: None, stop_after=4)
    (broken / "checkpoint").rename(broken / ".checkpoint.old")  # killed after moving the old one away
    train_run(train_config(world, broken, save_every=2, resume=True), layers, broken, log=lambda *_: None)
    assert np.allclose(run_losses(broken), run_losses(straight), rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_checkpoint_of_other_settings_and_a_stop_at_the_end_finishes(world, tmp_path):
    layers = discover_sources(world["cache"], "pivot")
    run = tmp_path / "run"
    train_run(train_config(world, run, save_every=2), layers, run, log=lambda *_: None, stop_after=2)
    with pytest.raises(ValueError, match="other settings.*'lam'"):
        train_run(train_config(world, run, save_every=2, resume=True, lam=0.9), layers, run, log=lambda *_: None)
    final = train_run(train_config(world, run, save_every=2, resume=True), layers, run, log=lambda *_: None,
                      stop_after=6)  # asked to stop at its last step: it finishes instead of losing the run
    assert final == run / "final" and (final / "model.safetensors").exists() and len(run_losses(run)) == 6


def test_a_run_saved_before_a_setting_existed_counts_as_trained_the_way_it_was(world, tmp_path):
    """A final model whose saved config predates --shuffle-window and --distill-only-splits was trained with
    shard-block order and no distill-only split: --resume finds it finished with those values, not with others."""
    import yaml

    from fuse_trainer.data import FusionData

    layers = discover_sources(world["cache"], "pivot")
    run = tmp_path / "run"
    train_run(train_config(world, run, max_steps=2, shuffle_window=1), layers, run, log=lambda *_: None)
    saved = run / "final" / "fusion_config.yaml"
    old = {k: v for k, v in yaml.safe_load(saved.read_text()).items() if k not in ("shuffle_window", "distill_only_splits")}
    saved.write_text(yaml.safe_dump(old))
    messages = []
    train_run(train_config(world, run, max_steps=2, shuffle_window=1, resume=True), layers, run, log=messages.append)
    assert "already trained" in messages[-1]
    assert any("saved before distill_only_splits, shuffle_window existed" in m for m in messages)  # the rule, logged
    with pytest.raises(ValueError, match="other settings.*'shuffle_window': \\(1, 8\\)"):
        train_run(train_config(world, run, max_steps=2, shuffle_window=8, resume=True), layers, run, log=messages.append)
    groups = len(FusionData(layers).index)
    whole = tmp_path / "whole"  # windows that each hold every shard group: the same batch order, no change
    train_run(train_config(world, whole, max_steps=2, shuffle_window=groups), layers, whole, log=lambda *_: None)
    train_run(train_config(world, whole, max_steps=2, shuffle_window=groups + 5, resume=True), layers, whole,
              log=messages.append)
    assert "already trained" in messages[-1]


def test_a_run_saved_with_the_old_setting_names_is_read_in_the_new_ones_and_says_so(world, tmp_path):
    """`temperature` meant ALM's binarization temperature for an ALM run and the softmax temperature otherwise;
    `top_k` was ULD's K. A final model saved with those names counts as trained with the new ones."""
    import yaml

    layers = discover_sources(world["cache"], "pivot")
    run = tmp_path / "run"
    train_run(train_config(world, run, max_steps=2, loss="alm", alm_temperature=0.5), layers, run, log=lambda *_: None)
    saved = run / "final" / "fusion_config.yaml"
    old = yaml.safe_load(saved.read_text())
    old["temperature"], old["top_k"] = old.pop("alm_temperature"), old.pop("uld_top_k")
    del old["fusion_temperature"], old["recipe"]
    saved.write_text(yaml.safe_dump(old))
    messages = []
    train_run(train_config(world, run, max_steps=2, loss="alm", alm_temperature=0.5, resume=True), layers, run,
              log=messages.append)
    assert "already trained" in messages[-1]
    assert any("saved with the old names {'top_k': 4, 'temperature': 0.5}, read as {'uld_top_k': 4, "
               "'alm_temperature': 0.5}" in m for m in messages), messages
    with pytest.raises(ValueError, match="other settings.*'alm_temperature': \\(0.5, 2.0\\)"):
        train_run(train_config(world, run, max_steps=2, loss="alm", alm_temperature=2.0, resume=True), layers, run,
                  log=messages.append)


def test_an_sft_run_resumes_whatever_its_fusion_settings_say_and_says_so(world, tmp_path):
    """recipes/sft.yaml keeps the recommended recipe's gate and loss, which an SFT run ignores: a run saved with the
    base values counts as the same model, and the rule is logged; a setting SFT uses (lr) still counts."""
    layers = discover_sources(world["cache"], "pivot")
    run = tmp_path / "sft"
    train_run(train_config(world, run, mode="sft", max_steps=2), layers, run, log=lambda *_: None)
    messages = []
    fused_settings = dict(gate="candidate+chunk", gate_margin=-2.0, weighting="mince", lambda_scope="distilled")
    train_run(train_config(world, run, mode="sft", max_steps=2, resume=True, **fused_settings), layers, run,
              log=messages.append)
    assert "already trained" in messages[-1]
    assert any("an SFT run; lambda_scope, weighting, gate, gate_margin differ" in m for m in messages), messages
    with pytest.raises(ValueError, match="other settings.*'lr'"):
        train_run(train_config(world, run, mode="sft", max_steps=2, resume=True, lr=1e-4), layers, run,
                  log=messages.append)
