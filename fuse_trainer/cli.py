"""Thin click commands over fuse_trainer: fuse-train, fuse-merge, fuse-eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fuse_trainer.config import GATES, TrainConfig

DEFAULTS = TrainConfig()


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(2)


def _passed(ctx: click.Context) -> dict:
    """Only the options the user typed, so a --config file is not overridden by click's defaults."""
    return {k: v for k, v in ctx.params.items()
            if k != "config" and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}


@click.command(context_settings={"show_default": True})
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="YAML file with any of these settings (unknown keys are errors); flags override it.")
@click.option("--shards", default=DEFAULTS.shards, help="Cache root holding <source>/aligned/<pivot>/ folders.")
@click.option("--mode", default=DEFAULTS.mode, type=click.Choice(["unified", "pairwise", "sft"]), help="unified: one run with all sources; pairwise: one run per source then a merge; sft: the SFT-only baseline.")
@click.option("--pivot", default=DEFAULTS.pivot, help="Pivot model (short name, HF folder or .gguf).")
@click.option("--sources", default=None, help="Comma-separated source names (default: all aligned to the pivot).")
@click.option("--train-splits", default=",".join(DEFAULTS.train_splits), help="Comma-separated corpus splits trained on, e.g. train,generated to add corpus-generate's source-written records.")
@click.option("--distill-only-splits", default="", help="Comma-separated splits of --train-splits learned from the sources alone, with no SFT term: text the pivot wrote itself (corpus-generate --model <pivot>), which the sources score (on-policy distillation). Their fusion term has weight 1, not --lambda.")
@click.option("--loss", default=DEFAULTS.loss, type=click.Choice(["infifusion", "fusellm", "topk-kl", "alm"]), help="Fusion term.")
@click.option("--lambda", "lam", default=DEFAULTS.lam, type=float, help="Weight of the fusion term: (1-λ)·SFT + λ·fusion; 0 = SFT only.")
@click.option("--lambda-scope", default=DEFAULTS.lambda_scope, type=click.Choice(["all", "distilled"]), help="Where λ applies: at every response position, or only where a source is distilled (after --gate and --weighting); elsewhere the SFT term keeps weight 1.")
@click.option("--temperature", default=DEFAULTS.temperature, type=float, help="Softmax temperature of the fusion loss (ALM: binarization temperature).")
@click.option("--top-k", default=DEFAULTS.top_k, type=int, help="K of InfiFusion's ULD.")
@click.option("--standardize/--raw", default=DEFAULTS.standardize, help="InfiFusion: z-score the logits (paper) or use raw probabilities.")
@click.option("--normalize", default=DEFAULTS.normalize, type=click.Choice(["topk", "full"]), help="InfiFusion: normalise within the top-K or over the full vocabulary.")
@click.option("--weighting", default=DEFAULTS.weighting, type=click.Choice(["uniform", "mince", "avgce", "entropy"]), help="Unified mode: per-record source weights. uniform: equal; mince: all on the source with the lowest CE on the record's gold text, in nats per pivot token (the same unit for every tokenizer); avgce: softmax of -CE / T; entropy: softmax of -(mean top-k entropy) / T (T: the --config key weighting_temperature, default 1).")
@click.option("--gate", default=DEFAULTS.gate, help=f"Where a source teaches, one of {', '.join(GATES)}: only where it beats the pivot on the gold text (token: per next token; chunk: per shared-boundary chunk, the same event for both tokenizers; record: per record, its chunks together), or only where its mapped candidates include the pivot's gold next token (candidate). Join several with '+' to require all, e.g. candidate+token.")
@click.option("--gate-margin", default=DEFAULTS.gate_margin, type=float, help="Nats the source must beat the pivot by (token gate: per next token; chunk: per chunk; record: per pivot token of the record); negative: let it in unless it is worse by more than that.")
@click.option("--epochs", default=DEFAULTS.epochs, type=float, help="Passes over the training records (ignored with --max-steps).")
@click.option("--max-steps", default=None, type=int, help="Optimizer steps.")
@click.option("--lr", default=DEFAULTS.lr, type=float)
@click.option("--warmup-steps", default=DEFAULTS.warmup_steps, type=int)
@click.option("--batch-tokens", default=DEFAULTS.batch_tokens, type=int, help="Padded tokens per micro-batch.")
@click.option("--shuffle-window", default=DEFAULTS.shuffle_window, type=int, help="Shard groups whose micro-batches are shuffled together, and held in memory at once: a corpus stored in domain order is then not learned one domain after another. 1: shard group after shard group (runs recorded before this option).")
@click.option("--grad-accum", default=DEFAULTS.grad_accum, type=int, help="Micro-batches per optimizer step (split across the torchrun ranks).")
@click.option("--dtype", default=DEFAULTS.dtype, type=click.Choice(["fp32", "bf16"]))
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=DEFAULTS.activation_checkpointing, help="Recompute each layer's activations in the backward pass instead of keeping them: a lower memory peak for a somewhat slower step, and the same model (benchmarks/train_memory.py).")
@click.option("--fsdp/--no-fsdp", default=DEFAULTS.fsdp, help="Under torchrun: shard the pivot's weights, gradients and AdamW state across the ranks (PyTorch FSDP2) instead of a full copy on each, for a pivot that does not fit one device. Same model as data-parallel training; sharded checkpoints (torch.distributed.checkpoint) that resume on any number of ranks; the final model is one Hugging Face folder.")
@click.option("--seed", default=DEFAULTS.seed, type=int)
@click.option("--device", default=DEFAULTS.device, type=click.Choice(["auto", "cpu", "cuda"]), help="auto: cuda when available. Under torchrun each process takes the GPU of its LOCAL_RANK.")
@click.option("--threads", default=None, type=int, help="CPU threads for torch (default: all cores; use 1 when other jobs share the cores).")
@click.option("--merge", default=DEFAULTS.merge, type=click.Choice(["task-arithmetic", "ties"]), help="Pairwise mode: how the per-source pivots are merged.")
@click.option("--save-every", default=DEFAULTS.save_every, type=int, help="Steps between resumable checkpoints.")
@click.option("--out", default=DEFAULTS.out, help="Run folder (metrics.jsonl, config.yaml, checkpoints).")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
@click.pass_context
def train(ctx, config, **_):
    """Train the pivot from cached source signals (never loads a source model)."""
    from cache_builder.manifest import CacheError
    from fuse_trainer.config import load_yaml, resolve_config
    from fuse_trainer.train import fuse_train

    cli = _passed(ctx)
    if "sources" in cli:
        cli["sources"] = [s for s in cli["sources"].split(",") if s]
    for name in ("train_splits", "distill_only_splits"):
        if name in cli:
            cli[name] = [s for s in cli[name].split(",") if s]
    try:
        cfg = resolve_config(load_yaml(config) if config else {}, cli)
        final = fuse_train(cfg)
    except (CacheError, ValueError) as err:
        _fail(str(err))
    click.echo(f"done: {final}")


@click.command(context_settings={"show_default": True})
@click.option("--base", required=True, help="The pivot before training (name or HF folder).")
@click.option("--model", "models", multiple=True, required=True, type=click.Path(exists=True, file_okay=False), help="A fine-tuned pivot (repeat).")
@click.option("--weights", default=None, help="Comma-separated weights, one per --model (default: equal, summing to 1).")
@click.option("--method", default="task-arithmetic", type=click.Choice(["task-arithmetic", "ties"]))
@click.option("--density", default=0.2, type=float, help="TIES: share of each task vector kept.")
@click.option("--out", required=True, type=click.Path(), help="Folder for the merged checkpoint.")
def merge(base, models, weights, method, density, out):
    """Merge fine-tuned pivots in weight space (task arithmetic or TIES) into one checkpoint."""
    from fuse_trainer.merge import merge_checkpoints
    from fuse_trainer.train import load_model_dir

    base_dir = Path(base) if Path(base).is_dir() else load_model_dir(base)
    w = [float(x) for x in weights.split(",")] if weights else [1.0 / len(models)] * len(models)
    if len(w) != len(models):
        _fail(f"{len(w)} weights for {len(models)} models")
    options = {"density": density} if method == "ties" else {}
    click.echo(f"merged -> {merge_checkpoints(base_dir, list(models), w, method, out, **options)}")


@click.command(context_settings={"show_default": True})
@click.option("--model", "models", multiple=True, required=True, help="Model to evaluate (name, HF folder or .gguf), optionally LABEL=MODEL; repeat to compare.")
@click.option("--data", required=True, type=click.Path(exists=True), help="Corpus (same formats as cache-build).")
@click.option("--split", default="heldout", help="Records of this split are evaluated.")
@click.option("--limit", default=None, type=int, help="Evaluate only the first N records of the split.")
@click.option("--dtype", default="fp32", type=click.Choice(["fp32", "bf16"]))
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), help="auto: cuda when available.")
@click.option("--json-out", default=None, type=click.Path(), help="Also write the results as JSON.")
def evaluate(models, data, split, limit, dtype, device, json_out):
    """Held-out loss and bits per byte per domain, several models side by side."""
    import torch

    from cache_builder.corpus import load_corpus
    from cache_builder.models import pick_device
    from fuse_trainer.evaluate import evaluate_model, results_table

    try:
        device = pick_device(device)
    except ValueError as err:
        _fail(str(err))
    records = [r for r in load_corpus(data).records if r.split == split][:limit]
    if not records:
        _fail(f"no records of split {split!r} in {data}")
    results = []
    for spec in models:
        label, _, name = spec.rpartition("=")
        results += evaluate_model(name, records, label=label or name, device=device,
                                  dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    click.echo(results_table(results, split))
    if json_out:
        Path(json_out).write_text(json.dumps([dict(r.__dict__, bits_per_byte=r.bits_per_byte) for r in results], indent=2))
