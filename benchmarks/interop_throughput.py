"""cache-export / cache-import speed against a plain Parquet scan of the same layer, and bytes per token of
each exported format against our layer at the same k.

    python -m benchmarks.interop_throughput --layer cache/smollm2 --model smollm2
    python -m benchmarks.interop_throughput --model smollm2 --corpus data/corpus.jsonl --top-k 10 --copies 32

The second form needs no cached layer: it builds one with cache-build from a small random-weight model (2 layers,
hidden 64) over MODEL's tokenizer, so token ids, offsets and the id width are real and the build takes seconds; the
logit values are a random model's (zstd sizes of raw values are indicative only; DistillKit's compressed columns
have a fixed size per position). For every format (distillkit raw, distillkit --compress with its default recipe,
axolotl, fusellm) the layer is exported to a temporary folder and imported back with the model's tokenizer.

Every timing is repeated --repeats times, interleaved (scan, copy, then each format's export, import and import
fixed cost, then again), and the median is kept, so a machine that gets busier for a while slows every column
alike. A ratio is the scan's time over the operation's: the scan reads every column of every shard with pyarrow
(the floor any reader of the layer pays); the Parquet copy (read every shard, write it again with our format's
Parquet settings, cache_builder.format.PARQUET_OPTIONS: zstd level 3) is the floor of an import, which must read
a peer's files of about the same size and write our layer. An import pays a fixed cost per call whatever the layer's
size, measured on its own: loading the tokenizer and its per-vocabulary tables, before any row is read. Its
steady-state ratio leaves that cost out (scan / (import - fixed)), the speed a large import approaches. Bytes
per token count every file an export writes. Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click
import pyarrow.parquet as pq

from cache_builder.format import PARQUET_OPTIONS
from cache_builder.interop import export_layer, import_folder
from cache_builder.interop.source_layer import Tokenizer
from cache_builder.manifest import load_manifest

VARIANTS = {  # name -> (format, export options)
    "distillkit": ("distillkit", {}),
    "distillkit --compress": ("distillkit", {"compress": True}),
    "axolotl": ("axolotl", {}),
    "fusellm": ("fusellm", {}),
}


def seconds(action) -> float:
    """Wall-clock seconds of one run of action()."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def import_fixed_cost(model: str) -> None:
    """What every import pays first, whatever its size: loading the tokenizer and its per-vocabulary tables."""
    Tokenizer.load(model)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def copied_corpus(corpus: str, copies: int, root: Path) -> Path:
    """A JSONL corpus of `copies` copies of every record, each copy's text made distinct by a last line."""
    from cache_builder.corpus import load_corpus

    records = load_corpus(corpus).records
    path = root / "corpus.jsonl"
    with path.open("w") as f:
        for i in range(copies):
            for r in records:
                f.write(json.dumps({"text": f"{r.text}\n# copy {i}", "domain": r.domain, "split": r.split}) + "\n")
    return path


def small_model_layer(model: str, corpus: Path, top_k: int, root: Path) -> tuple[Path, Path]:
    """cache-build a layer of a 2-layer random model over `model`'s tokenizer; returns (the layer, the model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cache_builder.build import BuildSettings, build_cache
    from cache_builder.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    folder = root / f"random-{resolve_model(model).name}"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = BuildSettings(model=str(folder), top_k=top_k, rows_per_shard=64, dtype="fp32")
    return build_cache(corpus, settings, root / "cache", log=lambda *_: None).folder, folder


@click.command()
@click.option("--layer", type=click.Path(exists=True, file_okay=False), default=None, help="A source-native layer of MODEL (default: build one, see above).")
@click.option("--model", required=True, help="The layer's source model (its tokenizer rebuilds the text on import).")
@click.option("--corpus", default="data/corpus.jsonl", type=click.Path(exists=True), help="Corpus of the layer built without --layer.")
@click.option("--top-k", default=10, type=click.IntRange(1), help="k of the layer built without --layer.")
@click.option("--copies", default=1, type=click.IntRange(1), help="Copies of the corpus in the layer built without --layer (import pays a fixed cost per call, loading the tokenizer, that a larger layer amortises).")
@click.option("--repeats", default=5, type=click.IntRange(1), help="Interleaved runs per timing; the median is kept.")
def main(layer, model, corpus, top_k, copies, repeats):
    """Export/import tokens/s vs a Parquet scan, and bytes per token of every format."""
    work = Path(tempfile.mkdtemp(prefix="interop-bench-"))
    try:
        if layer is None:
            layer, model = small_model_layer(model, copied_corpus(corpus, copies, work), top_k, work)
        run(Path(layer), str(model), work, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(layer: Path, model: str, work: Path, repeats: int) -> None:
    manifest = load_manifest(layer)
    tokens = manifest["totals"]["tokens"]
    shards = [layer / s["path"] for s in manifest["shards"]]
    actions = {
        "scan": lambda: [pq.read_table(p) for p in shards],
        "copy": lambda: [pq.write_table(pq.read_table(p), work / "copy.parquet", **PARQUET_OPTIONS) for p in shards],
    }
    for name, (fmt, options) in VARIANTS.items():
        out, cache = work / f"{name.replace(' ', '')}-out", work / f"{name.replace(' ', '')}-cache"
        actions[f"{name} export"] = lambda fmt=fmt, out=out, options=options: export_layer(
            layer, fmt, out, overwrite=True, **options)
        actions[f"{name} import"] = lambda fmt=fmt, out=out, cache=cache: import_folder(
            out, fmt, model, cache, overwrite=True)
    actions["import fixed"] = lambda: import_fixed_cost(model)
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):  # interleaved: every action once per round
        for name, action in actions.items():
            times[name].append(seconds(action))
    median = {name: statistics.median(t) for name, t in times.items()}
    scan, fixed = median["scan"], median["import fixed"]
    results = {"layer": str(layer.name), "k": manifest["top_k"], "tokens": tokens, "repeats": repeats,
               "scan_tokens_per_s": tokens / scan, "copy_tokens_per_s": tokens / median["copy"],
               "copy_vs_scan": scan / median["copy"], "import_fixed_s": fixed,
               "ours_bytes_per_token": manifest["totals"]["bytes"] / tokens, "formats": {}}
    for name, (fmt, _) in VARIANTS.items():
        export_s, import_s = median[f"{name} export"], median[f"{name} import"]
        results["formats"][name] = {
            "export_tokens_per_s": tokens / export_s, "export_vs_scan": scan / export_s,
            "import_tokens_per_s": tokens / import_s, "import_vs_scan": scan / import_s,
            "import_steady_vs_scan": scan / max(import_s - fixed, 1e-9),
            "bytes_per_token": folder_bytes(work / f"{name.replace(' ', '')}-out") / tokens,
        }
    click.echo(f"layer {layer.name}: k={results['k']}, {tokens} tokens, median of {repeats} interleaved runs; Parquet "
               f"scan {results['scan_tokens_per_s']:,.0f} tokens/s, Parquet copy (read + write as ours) "
               f"{results['copy_tokens_per_s']:,.0f} tokens/s ({results['copy_vs_scan']:.2f} of the scan); import "
               f"fixed cost {fixed:.2f} s; ours {results['ours_bytes_per_token']:.1f} B/token")
    click.echo(f"{'format':<24}{'export tok/s':>14}{'vs scan':>9}{'import tok/s':>14}{'vs scan':>9}"
               f"{'steady':>8}{'B/token':>9}")
    for name, r in results["formats"].items():
        click.echo(f"{name:<24}{r['export_tokens_per_s']:>14,.0f}{r['export_vs_scan']:>9.2f}"
                   f"{r['import_tokens_per_s']:>14,.0f}{r['import_vs_scan']:>9.2f}{r['import_steady_vs_scan']:>8.2f}"
                   f"{r['bytes_per_token']:>9.1f}")
    click.echo(json.dumps(results))


if __name__ == "__main__":
    main()
