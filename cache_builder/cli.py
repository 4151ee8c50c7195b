"""Thin click commands over the cache_builder library: cache-build, cache-align, cache-info, cache-verify,
corpus-generate, cache-push, cache-pull."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from cache_builder.corpus import DEFAULT_WINDOW_CHARS, EVALUATION_SPLITS


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr (untrusted text escaped, so no terminal sequence reaches the screen), then exit."""
    from cache_builder.remote import redact
    from cache_builder.untrusted import shown

    click.secho(f"error: {shown(redact(message), 4000)}", fg="red", err=True)
    sys.exit(code)


def one_line_errors(command):
    """Every failure of `command` ends as one line and exit code 2 (1 for an unforeseen error), never a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError, RuntimeError) as err:  # CacheError, BuildError, GenerateError among them
            _fail(str(err))
        except Exception as err:  # noqa: BLE001 - the edge of the program: a bug still ends in one line
            _fail(f"unexpected {type(err).__name__}: {err} (please report this with the command that caused it)", 1)

    return run


def _local(path: str, store: str | None, allow_insecure: bool, **selection) -> Path:
    """A local folder for PATH: itself, or a verified local copy of the cache at a URL."""
    from cache_builder.remote import is_url, open_location
    from cache_builder.share import local_copy

    if not is_url(path):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such folder")
        return Path(path)
    return local_copy(open_location(path, allow_insecure=allow_insecure), store, **selection)


@click.command(context_settings={"show_default": True})
@click.option("--model", required=True, help="Source model: smollm2 | gemma3 | qwen, a local HF folder, a .gguf file, or a cached hub id.")
@click.option("--corpus", "corpus_path", required=True, type=click.Path(exists=True), help="Corpus file or folder (.jsonl, .jsonl.zst, .parquet, .txt).")
@click.option("--out", default="cache", type=click.Path(), help="Cache root; shards go to OUT/<model-name>/.")
@click.option("--pivot", default=None, help="Also write pivot-aligned shards for this pivot model (only its tokenizer is loaded).")
@click.option("--top-k", default=10, type=click.IntRange(1, 1024), help="Candidates kept per position.")
@click.option("--max-tokens", default=2048, type=click.IntRange(2), help="Tokens per window at most (longer windows are truncated).")
@click.option("--window-chars", default=DEFAULT_WINDOW_CHARS, type=click.IntRange(16), help="Long records are cut into windows of at most this many characters.")
@click.option("--batch-tokens", default=4096, type=click.IntRange(1), help="Padded tokens per forward batch (length-bucketed).")
@click.option("--position-chunk", default=256, type=click.IntRange(1), help="Positions projected to the vocabulary at once: memory 2 x chunk x vocabulary x 4 bytes. On a GPU 2048 scores about 15% faster than 256 (benchmarks/README.md).")
@click.option("--dtype", default="fp32", type=click.Choice(["fp32", "bf16", "fp16"]), help="Trunk dtype; the output layer is always scored in fp32.")
@click.option("--logit-dtype", default="float16", type=click.Choice(["float16", "float32"]), help="Storage type of the top-k logits (statistics are always float32).")
@click.option("--rows-per-shard", default=256, type=click.IntRange(1), help="Record windows per Parquet shard.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), help="auto: cuda when available.")
@click.option("--device-map", default=None, type=click.Choice(["auto"]), help="For a source larger than one device: spread its decoder layers over this rank's GPUs (the GPUs visible to a node, split evenly between its ranks; with --device cpu: the CPU), then CPU memory, then disk. Same rows as a build on one device.")
@click.option("--max-memory", default=None, help="With --device-map: memory for the weights on each GPU and in RAM, e.g. gpu=70GiB,cpu=200GiB (default: 85% of each GPU's free memory less the scoring buffers, 80% of the free RAM shared by the node's ranks).")
@click.option("--limit", default=None, type=click.IntRange(1), help="Use only the first N records of the corpus.")
@click.option("--fused-epilogue", is_flag=True, help="Compute logsumexp and the standardized logsumexp of each position chunk in one read, with a kernel torch.compile builds at the start (needs a C++ compiler on CPU, Triton on CUDA). Same top-k; statistics within 1e-5 of the default path. Gemma-3 on CPU: see benchmarks/README.md.")
@click.option("--rank", default=None, type=click.IntRange(0), help="This process's rank (default: $RANK from torchrun, else 0).")
@click.option("--world-size", default=None, type=click.IntRange(1), help="Number of ranks (default: $WORLD_SIZE, else 1).")
@click.option("--overwrite", is_flag=True, help="Delete a cache built with other settings instead of refusing.")
@click.option("--strict", is_flag=True, help="Refuse to start when the corpus has bad records (default: skip and report them).")
@one_line_errors
def build(model, corpus_path, out, pivot, top_k, max_tokens, window_chars, batch_tokens, position_chunk, dtype,
          logit_dtype, rows_per_shard, device, device_map, max_memory, limit, fused_epilogue, rank, world_size, overwrite,
          strict):
    """Run ONE source model once over a corpus and write its sparse top-k signals to Parquet shards.

    Resumable: rerun the same command after a crash and finished shards are kept. Re-running a finished
    build does nothing. Several ranks (torchrun or --rank/--world-size) split the records between them;
    the manifest is written when every rank is done.
    """
    from cache_builder.build import BuildError, BuildSettings, build_cache, rank_from_env
    from cache_builder.device_map import parse_max_memory
    from cache_builder.models import pick_device

    if max_memory and not device_map:
        _fail("--max-memory budgets a device map: add --device-map auto")
    try:
        spread = parse_max_memory(max_memory or "") if device_map else None
        rank, world_size = rank_from_env(rank, world_size)
        device = pick_device(device)
        settings = BuildSettings(model=model, top_k=top_k, window_chars=window_chars, max_tokens=max_tokens,
                                 batch_tokens=batch_tokens, position_chunk=position_chunk, dtype=dtype,
                                 logit_dtype=logit_dtype, rows_per_shard=rows_per_shard, limit=limit,
                                 world_size=world_size, fused_epilogue=fused_epilogue)
        summary = build_cache(corpus_path, settings, out, rank=rank, device=device, overwrite=overwrite, strict=strict,
                              spread=spread)
    except (BuildError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    except OSError as err:  # disk full, permissions: finished shards are safe, the partial one was removed
        _fail(f"{err}; fix the cause (e.g. free disk space) and rerun the same command: finished shards are kept")
    click.echo(
        f"done: {summary.records} records, {summary.tokens} tokens, {summary.skipped_records} bad records skipped, "
        f"{summary.shards_written} shards written, {summary.shards_skipped} already there, {summary.seconds:.1f} s"
        + (f", {summary.bytes_per_token:.1f} bytes per token" if summary.bytes_per_token else "")
    )
    if not summary.complete:
        click.echo("this rank is done; the manifest is written when every rank has finished")
    elif pivot:
        from cache_builder.align import align_cache

        align_cache(summary.folder, pivot)


@click.command(context_settings={"show_default": True})
@click.option("--cache", "cache_dir", required=True, help="A source-native cache folder, e.g. cache/qwen, or its URL (s3://, gs://, hf://datasets/...): its source layer is pulled and verified first.")
@click.option("--pivot", required=True, help="Pivot model whose tokenizer the shards are aligned to.")
@click.option("--vocab-map", default="exact+first-token", help="Vocabulary map strategy (see alignment.vocab).")
@click.option("--cache-dir", "store", default=None, type=click.Path(file_okay=False), help="Where a remote cache is pulled to (default: the user cache folder, logit-cache-fusion/pulled).")
@click.option("--allow-insecure", is_flag=True, help="Allow plain http:// locations and S3 endpoints.")
@one_line_errors
def align(cache_dir, pivot, vocab_map, store, allow_insecure):
    """Build pivot-aligned shards from a source-native cache, without loading the source model."""
    from cache_builder.align import align_cache

    folder = _local(cache_dir, store, allow_insecure, layers=("source",))
    aligned = align_cache(folder, pivot, strategy=vocab_map)
    if folder != Path(cache_dir):
        click.echo(f"the aligned layer is {aligned}; publish it with `cache-push {folder} {cache_dir}`")


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--allow-insecure", is_flag=True, help="Allow plain http:// locations and S3 endpoints.")
@one_line_errors
def info(path, as_json, allow_insecure):
    """Summarise a cache (a source folder or a root with several, local or a URL): sources, tokenizers, k, rows,
    tokens, size, coverage. A remote cache is summarised from its manifests alone."""
    from cache_builder.info import cache_summary, format_summary, remote_summary
    from cache_builder.remote import is_url, open_location

    rows = remote_summary(open_location(path, allow_insecure=allow_insecure)) if is_url(path) else cache_summary(path)
    if not rows:
        _fail(f"no cache under {path} (a cache folder has a manifest.json)")
    click.echo(json.dumps(rows, indent=2, ensure_ascii=True) if as_json else format_summary(rows))


@click.command()
@click.argument("path")
@click.option("--rescore", default=0, type=click.IntRange(0), help="Also re-run the source model on N random rows and compare.")
@click.option("--model", default=None, help="Model to rescore with (default: the packaged model the source identity names, if its file sha256 matches; a path written in a cache is never loaded).")
@click.option("--deep", default=0, is_flag=False, flag_value=8, type=click.IntRange(0), help="Also align N random rows (8 when no N is given) of each aligned layer again from the source layer beside it and compare.")
@click.option("--pivot", default=None, help="Pivot model for --deep (default: the packaged model the pivot identity names, if its sha256 matches).")
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--cache-dir", "store", default=None, type=click.Path(file_okay=False), help="Where a remote cache is pulled to (default: the user cache folder, logit-cache-fusion/pulled).")
@click.option("--allow-insecure", is_flag=True, help="Allow plain http:// locations and S3 endpoints.")
@one_line_errors
def verify(path, rescore, model, deep, pivot, device, store, allow_insecure):
    """Check a cache before trusting it: tree, manifest, paths, checksums, footers, schema, values, agreement
    across sources; optionally rescore source rows with the model and re-derive aligned rows.

    PATH is a folder or a URL; a remote cache is pulled (every file checked against its manifest's sha256 as it
    arrives) into the local store, then checked like a local one.
    Exits 0 when everything checks out, 1 with one line per problem otherwise, 2 when it cannot check.
    """
    from cache_builder.manifest import CacheError, find_layers, load_manifest
    from cache_builder.models import model_from_identity, pick_device, resolve_model
    from cache_builder.remote import RemoteError
    from cache_builder.untrusted import shown
    from cache_builder.verify import verify_cache

    device = pick_device(device)
    try:
        folder = _local(path, store, allow_insecure)
    except RemoteError:  # the location cannot be read: one line, exit 2
        raise
    except CacheError as err:  # a file of the remote cache differs from its manifest
        click.secho(f"FAIL {shown(str(err), 4000)}", fg="red")
        sys.exit(1)
    problems = verify_cache(folder)
    layers = find_layers(folder) if not problems else []
    manifests = {layer: load_manifest(layer) for layer in layers}
    if rescore and not problems:
        from cache_builder.rescore import rescore_problems

        for layer, manifest in manifests.items():
            if manifest["layer"] == "source":
                problems += rescore_problems(layer, rescore, device=device, model_name=model)
    if deep and not problems:
        from cache_builder.rederive import rederive_problems

        for layer, manifest in manifests.items():
            if manifest["layer"] == "aligned":
                source = resolve_model(pivot) if pivot else model_from_identity(manifest["pivot"].get("identity"), layer)
                problems += rederive_problems(layer, deep, source)
    for problem in problems:
        click.secho(f"FAIL {shown(problem, 4000)}", fg="red")
    if problems:
        sys.exit(1)
    checked = (f", {rescore} rows rescored per source" if rescore else "") + (f", {deep} aligned rows re-derived per layer" if deep else "")
    click.secho(f"OK {len(layers)} cache layer(s) under {shown(path)} verified{checked}", fg="green")


@click.command(context_settings={"show_default": True})
@click.option("--model", required=True, help="Source model that writes the continuations (as for cache-build).")
@click.option("--corpus", "corpus_path", required=True, type=click.Path(exists=True), help="Corpus whose records give the prompts.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL file of generated records (a corpus file; OUT.partial while running).")
@click.option("--split", default="train", help="Prompts come from records of this split only (validation and heldout are refused: generated text conditioned on them would leak evaluation text into training).")
@click.option("--domain", "domains", multiple=True, help="Only records of this domain (repeat; default: every domain).")
@click.option("--samples", default=1, type=click.IntRange(1), help="Continuations per prompt.")
@click.option("--prompt-chars", default=400, type=click.IntRange(1), help="Prompt = the record's first N characters, cut after a line end; records no longer than N are skipped.")
@click.option("--max-new-tokens", default=256, type=click.IntRange(1), help="Source tokens written per continuation at most.")
@click.option("--temperature", default=0.8, type=click.FloatRange(min=0.0, min_open=True), help="Sampling temperature.")
@click.option("--top-p", default=0.95, type=click.FloatRange(0.0, 1.0, min_open=True), help="Nucleus sampling: the smallest set of tokens holding this much probability.")
@click.option("--seed", default=0, type=int, help="Each batch samples from its own seed derived from this one (resumable).")
@click.option("--batch-size", default=16, type=click.IntRange(1), help="Prompts sampled together.")
@click.option("--dtype", default="bf16", type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--out-split", default="generated", help="Split of the generated records; train on them with fuse-train --train-splits train,generated.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@one_line_errors
def generate(model, corpus_path, out, split, domains, samples, prompt_chars, max_new_tokens, temperature, top_p,
             seed, batch_size, dtype, out_split, device):
    """Let ONE source model write continuations of corpus records: sequence-level distillation data.

    Each record of --split (and --domain) gives a prompt, its first --prompt-chars characters; the source
    samples --samples continuations, written as new corpus records (split --out-split) with their generator
    settings. Append OUT to the corpus, cache-build every source over it, and train with
    `fuse-train --train-splits train,generated`. Resumable: rerun the same command after a crash.
    """
    from cache_builder.corpus import load_corpus
    from cache_builder.generate import GenerateError, GenerateSettings, generate_corpus
    from cache_builder.models import pick_device

    if split in EVALUATION_SPLITS:
        _fail(f"--split {split}: prompts cut from evaluation text would leak it into training; use --split train")
    if out_split == split or out_split in EVALUATION_SPLITS:
        _fail(f"--out-split must differ from --split ({split!r}) and from {'/'.join(EVALUATION_SPLITS)}: generated "
              "text must stay apart from the gold records")
    settings = GenerateSettings(model=model, split=split, domains=tuple(domains), samples=samples,
                                prompt_chars=prompt_chars, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, batch_size=batch_size, dtype=dtype, out_split=out_split)
    try:
        summary = generate_corpus(load_corpus(corpus_path).records, settings, out, pick_device(device))
    except (GenerateError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if summary["already_done"]:
        click.echo(f"{out} is already complete ({summary['records']} records); nothing to do")
    else:
        click.echo(f"done: {summary['records']} records ({summary['generated']} this run), "
                   f"{summary['new_tokens']} new tokens, {summary['seconds']:.0f} s -> {out}")


@click.command(context_settings={"show_default": True})
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.argument("url")
@click.option("--license", "licenses", multiple=True, help="Licence of the corpus as a Hub licence id (e.g. mit, cc-by-4.0); repeat for several. The source models' licences are added when known.")
@click.option("--workers", default=8, type=click.IntRange(1), help="Files uploaded at once.")
@click.option("--allow-insecure", is_flag=True, help="Allow plain http:// locations and S3 endpoints.")
@one_line_errors
def push(cache, url, licenses, workers, allow_insecure):
    """Publish a verified cache (a layer or a root with several sources) at URL: hf://datasets/ORG/NAME,
    s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a folder.

    Refuses a cache that fails cache-verify. Shards go first, manifests last; a file already there with the same
    sha256 is not sent again, so a rerun (after a change or a crash) uploads only what differs. The root
    README.md lists one `datasets` config per layer. Credentials come from the store's own settings.
    """
    from cache_builder.remote import open_location
    from cache_builder.share import push_cache

    push_cache(cache, open_location(url, allow_insecure=allow_insecure), licenses=licenses, workers=workers,
               log=click.echo)


@click.command(context_settings={"show_default": True})
@click.argument("url")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--sources", default="", help="Comma-separated source names to pull (default: every source).")
@click.option("--layers", "layer_kinds", multiple=True, help="Layers to pull: `source` or `aligned/PIVOT`; repeat (default: every layer).")
@click.option("--workers", default=8, type=click.IntRange(1), help="Files downloaded at once.")
@click.option("--allow-insecure", is_flag=True, help="Allow plain http:// locations and S3 endpoints.")
@one_line_errors
def pull(url, dest, sources, layer_kinds, workers, allow_insecure):
    """Download a cache from URL into DEST, every file checked against its manifest before it gets its name.

    A Hub cache is read at one commit (hf://datasets/ORG/NAME@REVISION, default: the current head, pinned).
    Resumable: rerun after a crash and verified files are kept. DEST/provenance.json records the origin and
    revision. Pull only what you need, e.g. `--layers source` to re-align to your own pivot.
    """
    from cache_builder.remote import open_location
    from cache_builder.share import pull_cache

    pull_cache(open_location(url, allow_insecure=allow_insecure), dest, workers=workers, log=click.echo,
               sources=tuple(s for s in sources.split(",") if s), layers=layer_kinds)


@click.command(context_settings={"show_default": True})
@click.argument("layer", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["distillkit", "axolotl", "fusellm"]), help="The peer format to write.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (written under a temporary name, renamed when complete).")
@click.option("--compress", is_flag=True, help="distillkit: compressed columns + compression_config.yaml (default recipe: the first min(k, 16) log-probs exact in bfloat16, a polynomial tail).")
@click.option("--compression-config", type=click.Path(exists=True, dir_okay=False), default=None, help="distillkit: a compression_config.yaml of DistillKit's to encode with instead (implies --compress).")
@click.option("--source-index", default=0, type=click.IntRange(0), help="fusellm, pivot-aligned layer: i in per_step_aligned_logits_{i}.")
@click.option("--rows-per-file", default=256, type=click.IntRange(1), help="Rows per output shard (distillkit, axolotl).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def export(layer, fmt, out, compress, compression_config, source_index, rows_per_file, overwrite):
    """Write a cache layer (a source folder, or its aligned/<pivot>) in a peer's format for its trainer.

    A source-native layer serves a student that shares the source's tokenizer; a pivot-aligned layer serves
    the pivot. Position t is the distribution of token t+1 in every format (docs/interop.md).
    """
    from pathlib import Path

    import yaml

    from cache_builder.interop import InteropError, export_layer
    from cache_builder.manifest import CacheError

    try:
        compression = yaml.safe_load(Path(compression_config).read_text()) if compression_config else None
        folder = export_layer(layer, fmt, out, compress=compress, compression=compression, source_index=source_index,
                              batch_rows=rows_per_file, overwrite=overwrite)
    except (InteropError, CacheError, yaml.YAMLError) as err:
        _fail(str(err))
    click.echo(f"exported {layer} as {fmt} -> {folder}")


@click.command(context_settings={"show_default": True})
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["distillkit", "axolotl", "fusellm"]), help="The peer format to read.")
@click.option("--model", required=True, help="The model whose tokenizer made the token ids (as for cache-build); text and offsets are rebuilt with it.")
@click.option("--out", default="cache", type=click.Path(file_okay=False), help="Cache root; the layer goes to OUT/<model-name>/.")
@click.option("--split", default="train", help="Split of the imported records (fusellm: also the split of a DatasetDict to read).")
@click.option("--rows-per-shard", default=256, type=click.IntRange(1), help="Rows per Parquet shard.")
@click.option("--strict", is_flag=True, help="Refuse the import at the first bad row (default: skip bad rows and list them with their reasons).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT/<model-name>/ layer.")
def import_cache(folder, fmt, model, out, split, rows_per_shard, strict, overwrite):
    """Read a peer's teacher-signal files into a format-v1 source-native cache layer.

    Statistics the format does not keep (logsumexp, mean, std, standardized logsumexp; the gold log-prob
    where the gold token is outside the top-k) are stored as nulls and listed in the manifest's
    missing_statistics: cache-info shows them, fuse-train losses that need them refuse.
    """
    from cache_builder.interop import InteropError, import_folder
    from cache_builder.manifest import CacheError

    try:
        layer, bad = import_folder(folder, fmt, model, out, split=split, rows_per_shard=rows_per_shard, strict=strict,
                                   overwrite=overwrite)
    except (InteropError, CacheError, ValueError, OSError) as err:
        _fail(str(err))
    for row in bad[:10]:
        click.echo(f"skipped {row.origin}: {row.reason}")
    if len(bad) > 10:
        click.echo(f"... and {len(bad) - 10} more (all are listed in the manifest's corpus.bad_records)")
    click.echo(f"imported {folder} ({fmt}) -> {layer}, {len(bad)} bad rows skipped")
