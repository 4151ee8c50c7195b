"""Thin click commands over fuse_trainer: fuse-train, fuse-merge, fuse-eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fuse_trainer.config import DEVICES, DTYPES, GATES, LAMBDA_SCOPES, MODES, recipe_names, resolve_config
from fuse_trainer.losses import FUSION_LOSSES
from fuse_trainer.merge import MERGE_METHODS
from fuse_trainer.weighting import SOURCE_WEIGHTINGS

DEFAULTS = resolve_config({})  # the recommended recipe: what fuse-train trains when no recipe or flag says otherwise
# Knobs a recipe sets; still accepted as flags, and listed apart in --help.
RESEARCH = ("loss", "lam", "lambda_start", "lambda_scope", "fusion_temperature", "alm_temperature", "uld_top_k",
            "standardize", "normalize", "weighting", "gate", "gate_margin", "source_gates", "distill_only_splits",
            "source_domains", "domain_epochs", "shuffle_window", "warmup_steps", "merge", "graph_weight")


def parse_per_source(text: str, flag: str, example: str) -> dict[str, list[str]]:
    """"qwen=code+math,gemma3=prose" -> {"qwen": ["code", "math"], "gemma3": ["prose"]}; ValueError naming the
    flag and the part that is not SOURCE=NAME[+NAME...]."""
    parsed: dict[str, list[str]] = {}
    for part in filter(None, text.split(",")):
        source, _, names = part.partition("=")
        if not source or not names or any(not n for n in names.split("+")) or source in parsed:
            raise ValueError(f"{flag}: {part!r} is not SOURCE=NAME[+NAME...] (e.g. {example}), or names its source twice")
        parsed[source] = names.split("+")
    return parsed


def parse_domain_epochs(text: str) -> dict[str, int]:
    """"prose=1,math=2" -> {"prose": 1, "math": 2}; ValueError naming the part that is not DOMAIN=EPOCHS."""
    parsed: dict[str, int] = {}
    for part in filter(None, text.split(",")):
        domain, _, epochs = part.partition("=")
        if not domain or not epochs.isdigit() or int(epochs) < 1 or domain in parsed:
            raise ValueError(f"--domain-epochs: {part!r} is not DOMAIN=EPOCHS with EPOCHS at least 1 (e.g. prose=1), or "
                             "names its domain twice")
        parsed[domain] = int(epochs)
    return parsed


class ResearchHelp(click.Command):
    """A command whose --help lists the options named in `research` apart, under a heading of their own."""

    def __init__(self, *args, research: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.research = set(research)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[bool, list] = {False: [], True: []}
        for param in self.get_params(ctx):
            if (record := param.get_help_record(ctx)) is not None:
                rows[param.name in self.research].append(record)
        for research, heading in ((False, "Options"), (True, "Research options (set by a recipe; a flag overrides it)")):
            if rows[research]:
                with formatter.section(heading):
                    formatter.write_dl(rows[research])


def _renamed(old: str, new: str):
    """A hidden option that refuses a flag renamed because its name had more than one meaning."""
    def refuse(ctx: click.Context, param: click.Parameter, value) -> None:
        if value is not None:
            raise click.UsageError(f"{old} is now {new}")
    return click.option(old, expose_value=False, hidden=True, default=None, callback=refuse)


def _fail(message: str) -> None:
    """One line on stderr (control characters escaped: no terminal sequence from a cache reaches the screen)."""
    from cache_builder.remote import redact
    from cache_builder.untrusted import shown

    click.secho(f"error: {shown(redact(message), 4000)}", fg="red", err=True)
    sys.exit(2)


def _passed(ctx: click.Context) -> dict:
    """Only the options the user typed, so a recipe is not overridden by click's defaults."""
    return {k: v for k, v in ctx.params.items()
            if k != "recipe" and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}


@click.command(cls=ResearchHelp, research=RESEARCH, context_settings={"show_default": True})
@click.option("--shards", default=DEFAULTS.shards, help="Cache root holding <source>/aligned/<pivot>/ folders, or its URL (s3://, gs://, hf://datasets/ORG/NAME); several joined by ','. A source with no layer aligned to the pivot is aligned first (no source model is loaded).")
@click.option("--join", default=DEFAULTS.join, type=click.Choice(["exact", "intersect"]), help="exact: the sources must hold the same records; intersect: train on the records every source holds (caches of different corpora).")
@click.option("--cache-dir", default=DEFAULTS.cache_dir, help="Local store of remote caches: shard files named by sha256, verified before first use (default: ~/.cache/logit-cache-fusion).")
@click.option("--max-local-gb", default=DEFAULTS.max_local_gb, type=float, help="Bound of the store's shard files; the least recently used are evicted and fetched again when needed (default: no bound).")
@click.option("--allow-insecure", is_flag=True, default=DEFAULTS.allow_insecure, help="Allow plain http:// locations and S3 endpoints.")
@click.option("--mode", default=DEFAULTS.mode, type=click.Choice(MODES), help="unified: one run with all sources; pairwise: one run per source then a merge; sft: the SFT-only baseline.")
@click.option("--recipe", default=None, help=f"A recipe: one of {', '.join(recipe_names())} (recipes/), or a YAML file of settings such as a run's config.yaml (unknown keys are errors). Default: recommended. Flags override it.")
@click.option("--pivot", default=DEFAULTS.pivot, help="Pivot model (short name, HF folder or .gguf).")
@click.option("--sources", default=None, help="Comma-separated source names (default: all aligned to the pivot).")
@click.option("--train-splits", default=",".join(DEFAULTS.train_splits), help="Comma-separated corpus splits trained on, e.g. train,generated to add corpus-generate's source-written records.")
@click.option("--out", default=DEFAULTS.out, help="Run folder (metrics.jsonl, config.yaml, checkpoints).")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
@click.option("--epochs", default=DEFAULTS.epochs, type=float, help="Passes over the training records (ignored with --max-steps).")
@click.option("--max-steps", default=None, type=int, help="Optimizer steps.")
@click.option("--lr", default=DEFAULTS.lr, type=float)
@click.option("--batch-tokens", default=DEFAULTS.batch_tokens, type=int, help="Padded tokens per micro-batch.")
@click.option("--grad-accum", default=DEFAULTS.grad_accum, type=int, help="Micro-batches per optimizer step (split across DDP ranks).")
@click.option("--dtype", default=DEFAULTS.dtype, type=click.Choice(DTYPES), help="bf16: autocast matmuls to bfloat16; weights and optimizer state stay float32.")
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=DEFAULTS.activation_checkpointing, help="Recompute each layer's activations in the backward pass instead of keeping them: a lower memory peak for a somewhat slower step, and the same model (benchmarks/train_memory.py).")
@click.option("--fsdp/--no-fsdp", default=DEFAULTS.fsdp, help="Under torchrun: shard the pivot's weights, gradients and AdamW state across the ranks (PyTorch FSDP2) instead of a full copy on each, for a pivot that does not fit one device. Same model as data-parallel training; sharded checkpoints (torch.distributed.checkpoint) that resume on any number of ranks; the final model is one Hugging Face folder.")
@click.option("--seed", default=DEFAULTS.seed, type=int)
@click.option("--device", default=DEFAULTS.device, type=click.Choice(DEVICES), help="auto: cuda when available. Under torchrun each process takes the GPU of its LOCAL_RANK.")
@click.option("--threads", default=None, type=int, help="CPU threads for torch (default: all cores; use 1 when other jobs share the cores).")
@click.option("--save-every", default=DEFAULTS.save_every, type=int, help="Steps between resumable checkpoints.")
@click.option("--loss", default=DEFAULTS.loss, type=click.Choice(sorted(FUSION_LOSSES)), help="Fusion term.")
@click.option("--lambda", "lam", default=DEFAULTS.lam, type=float, help="Weight of the fusion term: (1-λ)·SFT + λ·fusion; 0 = SFT only.")
@click.option("--lambda-start", default=None, type=float, help="A λ schedule: λ moves linearly from this value at the first step to --lambda at the last (e.g. --lambda-start 0: the pivot learns the gold text first and the sources more and more). Default: --lambda throughout.")
@click.option("--lambda-scope", default=DEFAULTS.lambda_scope, type=click.Choice(LAMBDA_SCOPES), help="Where λ applies: at every response position, or only where a source is distilled (after --gate and --weighting); elsewhere the SFT term keeps weight 1.")
@click.option("--weighting", default=DEFAULTS.weighting, type=click.Choice(sorted(SOURCE_WEIGHTINGS)), help="Unified mode: per-record source weights. uniform: equal; mince: all on the source with the lowest CE on the record's gold text, in nats per pivot token (the same unit for every tokenizer); avgce: softmax of -CE / T; entropy: softmax of -(mean top-k entropy) / T (T: the recipe key weighting_temperature, default 1).")
@click.option("--gate", default=DEFAULTS.gate, help=f"Where a source teaches, one of {', '.join(GATES)}: only where it beats the pivot on the gold text (token: per next token; chunk: per shared-boundary chunk, the same event for both tokenizers; record: per record, its chunks together), or only where its mapped candidates include the pivot's gold next token (candidate). Join several with '+' to require all, e.g. candidate+chunk.")
@click.option("--source-gates", default="", help="A gate of its own for a named source, as --gate takes it: SOURCE=GATE[+GATE], several joined by ',', e.g. sft=none (a teacher trusted on its --source-domains, ungated there). A source not named takes --gate.")
@click.option("--gate-margin", default=DEFAULTS.gate_margin, type=float, help="Nats the source must beat the pivot by (token gate: per next token; chunk: per chunk; record: per pivot token of the record); negative: let it in unless it is worse by more than that.")
@click.option("--fusion-temperature", default=DEFAULTS.fusion_temperature, type=float, help="Softmax temperature of ULD (infifusion) and of FuseLLM's soft CE.")
@click.option("--alm-temperature", default=DEFAULTS.alm_temperature, type=float, help="ALM: binarization temperature of the chunk likelihoods.")
@click.option("--uld-top-k", default=DEFAULTS.uld_top_k, type=int, help="K of InfiFusion's ULD (the cache's K is cache-build --top-k).")
@click.option("--standardize/--raw", default=DEFAULTS.standardize, help="InfiFusion: z-score the logits (paper) or use raw probabilities.")
@click.option("--normalize", default=DEFAULTS.normalize, type=click.Choice(["topk", "full"]), help="InfiFusion: normalise within the top-K or over the full vocabulary.")
@click.option("--graph-weight", default=DEFAULTS.graph_weight, type=float, help="Weight of InfiGFusion's graph-on-logits term, added to the objective: per record, the co-activation graph of the source's top-k probabilities over the positions the gates let in, against the pivot's at the same ids, compared by their sorted node strengths (a lower bound of the Gromov-Wasserstein distance; fuse_trainer/graph_loss.py). 0: off.")
@click.option("--distill-only-splits", default="", help="Comma-separated splits of --train-splits learned from the sources alone, with no SFT term: text the pivot wrote itself (corpus-generate --model <pivot>), which the sources score (on-policy distillation). Their fusion term has weight 1, not --lambda.")
@click.option("--source-domains", default="", help="Where each named source teaches, by corpus domain: SOURCE=DOMAIN[+DOMAIN...], several joined by ',', e.g. qwen=code (Qwen distilled on code records only; the SFT term everywhere). A source not named teaches every domain.")
@click.option("--domain-epochs", default="", help="Domains trained in the first N epochs only: DOMAIN=N, several joined by ',', e.g. prose=1 with --epochs 2 (prose seen once, the rest twice). A domain not named is in every epoch.")
@click.option("--shuffle-window", default=DEFAULTS.shuffle_window, type=int, help="Shard groups whose micro-batches are shuffled together, and held in memory at once: a corpus stored in domain order is then not learned one domain after another. 1: shard group after shard group (runs recorded before 2026-11-28).")
@click.option("--warmup-steps", default=DEFAULTS.warmup_steps, type=int)
@click.option("--merge", default=DEFAULTS.merge, type=click.Choice(sorted(MERGE_METHODS)), help="Pairwise mode: how the per-source pivots are merged.")
@_renamed("--top-k", "--uld-top-k (ULD's K; the cache's K is cache-build --top-k)")
@_renamed("--temperature", "--fusion-temperature (ULD, FuseLLM) or --alm-temperature (ALM)")
@_renamed("--config", "--recipe FILE (flags still override it)")
@click.option("--eval-split", default=DEFAULTS.eval_split, help="Corpus split scored during training (bits per byte per domain, as fuse-eval scores it), from the records the cache holds; never one of --train-splits.")
@click.option("--eval-every", default=DEFAULTS.eval_every, type=int, help="Steps between scorings of --eval-split (0: none); the last step is always scored. Logged to metrics.jsonl (val_bpb), the progress bar and the curves plot; pairwise mode also scores the merged model (merged/validation.json).")
@click.option("--keep-best", is_flag=False, flag_value="all", default=None, help="final/ holds the scored step with the lowest --eval-split bits per byte, pooled (--keep-best) or on one domain (--keep-best code), instead of the last step; needs --eval-every. Pairwise mode: per source, before the merge.")
@click.pass_context
def train(ctx, recipe, **_):
    """Train the pivot from cached source signals (never loads a source model).

    With no --recipe and no research option it trains the recommended recipe (recipes/recommended.yaml)."""
    from cache_builder.manifest import CacheError
    from fuse_trainer.train import fuse_train

    cli = _passed(ctx)
    if "sources" in cli:
        cli["sources"] = [s for s in cli["sources"].split(",") if s]
    for name in ("train_splits", "distill_only_splits"):
        if name in cli:
            cli[name] = [s for s in cli[name].split(",") if s]
    try:
        if "source_domains" in cli:
            cli["source_domains"] = parse_per_source(cli["source_domains"], "--source-domains", "qwen=code")
        if "source_gates" in cli:
            gates = parse_per_source(cli["source_gates"], "--source-gates", "sft=none")
            cli["source_gates"] = {source: "+".join(names) for source, names in gates.items()}
        if "domain_epochs" in cli:
            cli["domain_epochs"] = parse_domain_epochs(cli["domain_epochs"])
        cfg = resolve_config(cli, recipe)
        final = fuse_train(cfg)
    except (CacheError, ValueError) as err:
        _fail(str(err))
    click.echo(f"done: {final}")


@click.command(context_settings={"show_default": True})
@click.option("--base", required=True, help="The pivot before training (name or HF folder).")
@click.option("--model", "models", multiple=True, required=True, type=click.Path(exists=True, file_okay=False), help="A fine-tuned pivot (repeat).")
@click.option("--merge-weights", "weights", default=None, help="Comma-separated weights, one per --model (default: equal, summing to 1).")
@click.option("--merge", "method", default=DEFAULTS.merge, type=click.Choice(sorted(MERGE_METHODS)), help="How the pivots are merged (fuse-train --merge).")
@click.option("--ties-density", "density", default=DEFAULTS.ties_density, type=float, help="TIES: share of each task vector kept.")
@click.option("--out", required=True, type=click.Path(), help="Folder for the merged checkpoint.")
@_renamed("--method", "--merge (the name fuse-train and recipes use)")
@_renamed("--density", "--ties-density (the name recipes use)")
@_renamed("--weights", "--merge-weights (the name recipes use)")
def merge(base, models, weights, method, density, out):
    """Merge fine-tuned pivots in weight space (task arithmetic or TIES) into one checkpoint."""
    from fuse_trainer.merge import merge_checkpoints
    from fuse_trainer.train import load_model_dir

    try:
        base_dir = Path(base) if Path(base).is_dir() else load_model_dir(base)
    except (ValueError, OSError) as err:
        _fail(f"--base {base}: {err}")
    w = [float(x) for x in weights.split(",")] if weights else [1.0 / len(models)] * len(models)
    if len(w) != len(models):
        _fail(f"{len(w)} weights for {len(models)} models")
    options = {"density": density} if method == "ties" else {}
    click.echo(f"merged -> {merge_checkpoints(base_dir, list(models), w, method, out, **options)}")


@click.command(context_settings={"show_default": True})
@click.option("--model", "models", multiple=True, required=True, help="Model to evaluate (name, HF folder or .gguf), optionally LABEL=MODEL; repeat to compare.")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True), help="Corpus (same formats as cache-build); repeat to add another, e.g. --data data/ --data data-ood/ood.jsonl.")
@click.option("--split", default="heldout", help="Records of this split are evaluated; comma-separated for one table per split, e.g. heldout,ood (the out-of-distribution set of data-ood/).")
@click.option("--limit", default=None, type=int, help="Evaluate only the first N records of each split.")
@click.option("--dtype", default="fp32", type=click.Choice(DTYPES))
@click.option("--device", default="auto", type=click.Choice(DEVICES), help="auto: cuda when available.")
@click.option("--json-out", default=None, type=click.Path(), help="Also write the results as JSON (one entry per model, split and domain).")
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
    corpus = [r for path in data for r in load_corpus(path).records]
    splits = [s for s in split.split(",") if s]
    by_split = {s: [r for r in corpus if r.split == s][:limit] for s in splits}
    empty = [s for s, records in by_split.items() if not records]
    if empty:
        _fail(f"no records of split {', '.join(map(repr, empty))} in {', '.join(data)}")
    tables, rows = [], []
    for name, records in by_split.items():
        results = []
        for spec in models:
            label, _, model = spec.rpartition("=")
            try:
                results += evaluate_model(model, records, label=label or model, device=device,
                                          dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
            except (ValueError, OSError) as err:  # an unknown model name, a folder that is not a model
                _fail(f"--model {spec}: {err}")
        tables.append(results_table(results, name))
        rows += [dict(r.__dict__, split=name, bits_per_byte=r.bits_per_byte) for r in results]
    click.echo("\n\n".join(tables))
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2))
