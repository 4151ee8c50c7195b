"""A run's folders on disk: the final model, the resumable checkpoint, and when a saved run matches the settings.

    out/
      config.yaml          the resolved settings of the run
      metrics.jsonl        one line per optimizer step
      checkpoint/          the last resumable checkpoint (HF model + trainer_state.pt, or with --fsdp the
                           ranks' shards in dcp/ + trainer_state.pt), gone once final/ exists
      final/               the trained model (HF format) with fusion_config.yaml and fusion_provenance.json
      best/                with --keep-best, the evaluated step best on validation so far (+ best.json); final/ at the end

Every folder is written under a temporary name and renamed into place (`write_folder`), so a run killed at any
instant leaves a complete folder or none. `--resume` continues a run only with the settings it was trained
with (`refuse_other_settings`); settings that do not change the trained model, and settings added after a run
was saved, are the two compatibility rules, and each is logged when it applies.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import yaml

from cache_builder.format import write_text_atomic
from cache_builder.remote import redact
from cache_builder.store import VerifiedLayer
from fuse_trainer.config import TrainConfig, dump_yaml

STATE_FILE = "trainer_state.pt"
FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
# Settings that do not change the trained model: a run may resume, or count as finished, with other values.
RUN_ONLY_SETTINGS = ("resume", "threads", "device", "save_every", "out", "extra", "activation_checkpointing", "recipe",
                     "cache_dir", "max_local_gb", "allow_insecure", "fsdp")
# Settings of the fusion term and the pairwise merge: an SFT run (mode sft) is the same model whatever they say.
FUSION_ONLY_SETTINGS = ("loss", "lam", "lambda_start", "lambda_scope", "fusion_temperature", "alm_temperature",
                        "uld_top_k", "standardize", "normalize", "alm_distance", "weighting", "weighting_temperature",
                        "gate", "gate_margin", "source_gates", "distill_only_splits", "source_domains", "merge",
                        "merge_weights", "ties_density", "graph_weight")
# Settings added after runs were saved, with the value that matches how those runs were trained (a temperature of
# a loss the run did not use changes nothing).
SETTINGS_BEFORE_THEY_EXISTED = {"distill_only_splits": [], "source_domains": {}, "shuffle_window": 1,
                                "fusion_temperature": 1.0, "alm_temperature": 1.0, "eval_split": "validation",
                                "eval_every": 0, "keep_best": None, "join": "exact", "graph_weight": 0.0,
                                "lambda_start": None, "domain_epochs": {}, "source_gates": {}}


def write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Write `folder` by calling write(tmp) on a temporary sibling, then rename it into place.

    At every instant a complete folder exists as `folder` or, between the two renames, as `.<name>.old`
    (which `recover_folder` puts back)."""
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)  # left by a save killed before its last line
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(folder: Path, complete: str) -> Path:
    """`folder`, put back from `.<name>.old` if a `write_folder` was killed between its two renames.

    complete: a file that only a complete folder holds."""
    old = folder.with_name(f".{folder.name}.old")
    if not (folder / complete).exists() and (old / complete).exists():
        shutil.rmtree(folder, ignore_errors=True)
        old.rename(folder)
    return folder


def save_settings(folder: Path, cfg: TrainConfig, provenance: dict) -> None:
    """The run's settings and the caches it was trained on, beside a saved model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fusion_config.yaml").write_text(dump_yaml(cfg))
    (folder / "fusion_provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def save_hf(folder: Path, model, tokenizer, cfg: TrainConfig, provenance: dict, state_dict: dict | None = None) -> None:
    """A checkpoint loadable with AutoModelForCausalLM.from_pretrained, with its config and provenance.

    state_dict: the weights to write instead of the model's own (the gathered weights of a sharded model)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    save_settings(folder, cfg, provenance)


def save_final(out: Path, model, tokenizer, cfg: TrainConfig, provenance: dict, state_dict: dict | None = None) -> Path:
    """The trained model as `out/final/`; returns that folder. state_dict: as for `save_hf`."""
    final = out / FINAL_DIR
    write_folder(final, lambda tmp: save_hf(tmp, model, tokenizer, cfg, provenance, state_dict))
    return final


def save_checkpoint(out: Path, model, tokenizer, optimizer, scheduler, step: int, cfg: TrainConfig, provenance: dict) -> None:
    """Model (HF format) + optimizer, scheduler, step and RNG as `out/checkpoint/`, written whole or not at all."""
    def write(tmp: Path) -> None:
        save_hf(tmp, model, tokenizer, cfg, provenance)
        torch.save({"optimizer": optimizer.state_dict(), **schedule_state(scheduler, step)}, tmp / STATE_FILE)

    write_folder(out / CHECKPOINT_DIR, write)


def schedule_state(scheduler, step: int) -> dict:
    """What a checkpoint holds beside the model and the optimizer: the scheduler, the step and the RNG."""
    return {"scheduler": scheduler.state_dict(), "step": step, "torch_rng": torch.get_rng_state()}


def recover_checkpoint(out: Path) -> Path:
    """The resumable checkpoint of `out`, putting back the previous one if a save was killed between renames."""
    return recover_folder(out / CHECKPOINT_DIR, STATE_FILE)


def clear_run(out: Path) -> None:
    """Remove what an earlier run left in `out` (models, checkpoints, metrics): a fresh run starts clean."""
    for name in (FINAL_DIR, CHECKPOINT_DIR, BEST_DIR):
        for folder in (name, f".{name}.old", f".{name}.tmp", f".{name}.shards"):
            shutil.rmtree(out / folder, ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


def provenance_of(layers: dict[str, VerifiedLayer]) -> dict:
    """The caches a run was trained on: where they were, source identities and fingerprints, from their manifests."""
    out = {}
    for name, layer in layers.items():
        m = layer.manifest
        out[name] = {"origin": redact(layer.origin),"source": m["source"].get("identity"), "source_tokenizer": m["source"].get("tokenizer_fingerprint"),
                     "pivot_tokenizer": m["pivot"]["tokenizer_fingerprint"], "corpus": m["corpus"]["fingerprint"],
                     "rows": m["totals"]["rows"], "tokens": m["totals"]["tokens"]}
    return out


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint a run resumes from (a killed run logs past it)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in lines))


def renamed_settings(saved: dict, checkpoint: Path, log=print) -> dict:
    """`saved` in today's names: top_k is uld_top_k; temperature is alm_temperature for an ALM run, else
    fusion_temperature (one name had both meanings). Logged when it applies."""
    old = {k: saved[k] for k in ("top_k", "temperature") if k in saved}
    if not old:
        return saved
    new = {}
    if "top_k" in old:
        new["uld_top_k"] = old["top_k"]
    if "temperature" in old:
        new["alm_temperature" if saved.get("loss") == "alm" else "fusion_temperature"] = old["temperature"]
    log(f"{checkpoint}: saved with the old names {old}, read as {new}")
    return {**{k: v for k, v in saved.items() if k not in old}, **new}


def changed_settings(checkpoint: Path, cfg: TrainConfig, shard_groups: int, log=print) -> dict:
    """{setting: (saved, now)} where the model in `checkpoint` was trained otherwise than `cfg` says.

    The compatibility rules, each logged when it applies: settings renamed since (`renamed_settings`) are read
    in today's names; settings the saved run predates (SETTINGS_BEFORE_THEY_EXISTED) are read as the value that
    run was trained with; settings that do not change the model (RUN_ONLY_SETTINGS, and FUSION_ONLY_SETTINGS
    for an SFT run) may differ. Two shuffle windows that each hold all `shard_groups` of the cache
    give the same batch order, so they are no change either."""
    saved = renamed_settings(yaml.safe_load((checkpoint / "fusion_config.yaml").read_text()), checkpoint, log)
    now = asdict(cfg)
    predates = {k: v for k, v in SETTINGS_BEFORE_THEY_EXISTED.items() if k not in saved}
    if predates:
        log(f"{checkpoint}: saved before {', '.join(predates)} existed, read as {predates}")
    saved = {**predates, **saved}
    run_only = [k for k in RUN_ONLY_SETTINGS if k != "resume" and k in saved and saved[k] != now[k]]
    if run_only:
        log(f"{checkpoint}: {', '.join(run_only)} differ from the saved run but do not change the model")
    changed = {k: (saved.get(k), now[k]) for k in now if k not in RUN_ONLY_SETTINGS and saved.get(k) != now[k]}
    ignored = [k for k in FUSION_ONLY_SETTINGS if k in changed] if saved.get("mode") == now["mode"] == "sft" else []
    if ignored:
        log(f"{checkpoint}: an SFT run; {', '.join(ignored)} differ from the saved run but do not change the model")
        changed = {k: v for k, v in changed.items() if k not in ignored}
    if "shuffle_window" in changed and min(changed["shuffle_window"]) >= shard_groups:
        log(f"{checkpoint}: shuffle windows {changed['shuffle_window']} both hold all {shard_groups} shard groups: "
            "the same batch order")
        del changed["shuffle_window"]
    return changed


def refuse_other_settings(out: Path, cfg: TrainConfig, layers: dict[str, VerifiedLayer], log=print) -> None:
    """--resume continues (or finds finished) only a run with the same settings."""
    shard_groups = len(next(iter(layers.values())).shard_paths)  # shard groups are the first source's shards
    for folder in (out / FINAL_DIR, out / CHECKPOINT_DIR):
        if (folder / "fusion_config.yaml").exists() and (changed := changed_settings(folder, cfg, shard_groups, log)):
            raise ValueError(f"{folder} was trained with other settings {changed} (saved, now): rerun with the same "
                             "settings to resume it, or leave out --resume to start again (deleting it), or use another --out")
