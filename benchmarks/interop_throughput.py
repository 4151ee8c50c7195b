"""cache-export / cache-import speed against a plain Parquet scan of the same layer, and bytes per token of
each exported format against our layer at the same k.

    cache-build --model smollm2 --corpus data/corpus.jsonl --top-k 10 --out /tmp/interop-bench
    python benchmarks/interop_throughput.py /tmp/interop-bench/smollm2 --model smollm2

For every format (distillkit raw, distillkit --compress with its default recipe, axolotl, fusellm) the layer is
exported to a temporary folder and imported back with the model's tokenizer. Each timing is the best of
--repeats runs; the ratio is tokens/s of the operation over tokens/s of reading every column of every shard
with pyarrow (the floor any reader of the layer pays). Bytes per token count every file the export writes.
Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import click
import pyarrow.parquet as pq

from cache_builder.interop import export_layer, import_folder
from cache_builder.manifest import load_manifest

VARIANTS = {  # name -> (format, export options)
    "distillkit": ("distillkit", {}),
    "distillkit --compress": ("distillkit", {"compress": True}),
    "axolotl": ("axolotl", {}),
    "fusellm": ("fusellm", {}),
}


def best_seconds(action, repeats: int) -> float:
    """The fastest of `repeats` runs of action()."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@click.command()
@click.argument("layer", type=click.Path(exists=True, file_okay=False))
@click.option("--model", required=True, help="The layer's source model (its tokenizer rebuilds the text on import).")
@click.option("--repeats", default=3, type=click.IntRange(1), help="Runs per timing; the best is kept.")
def main(layer, model, repeats):
    """Export/import tokens/s vs a Parquet scan, and bytes per token of every format."""
    layer = Path(layer)
    manifest = load_manifest(layer)
    tokens = manifest["totals"]["tokens"]
    shards = [layer / s["path"] for s in manifest["shards"]]
    scan = best_seconds(lambda: [pq.read_table(p) for p in shards], repeats)
    results = {"layer": str(layer), "k": manifest["top_k"], "tokens": tokens, "scan_tokens_per_s": tokens / scan,
               "ours_bytes_per_token": manifest["totals"]["bytes"] / tokens, "formats": {}}
    work = Path(tempfile.mkdtemp(prefix="interop-bench-"))
    try:
        for name, (fmt, options) in VARIANTS.items():
            out, cache = work / f"{fmt}-out", work / f"{fmt}-cache"
            export_s = best_seconds(lambda: export_layer(layer, fmt, out, overwrite=True, **options), repeats)
            size = folder_bytes(out)
            import_s = best_seconds(lambda: import_folder(out, fmt, model, cache, overwrite=True), repeats)
            results["formats"][name] = {
                "export_tokens_per_s": tokens / export_s, "export_vs_scan": scan / export_s,
                "import_tokens_per_s": tokens / import_s, "import_vs_scan": scan / import_s,
                "bytes_per_token": size / tokens,
            }
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    click.echo(f"layer {layer}: k={results['k']}, {tokens} tokens; Parquet scan {results['scan_tokens_per_s']:,.0f} "
               f"tokens/s; ours {results['ours_bytes_per_token']:.1f} B/token")
    click.echo(f"{'format':<24}{'export tok/s':>14}{'vs scan':>9}{'import tok/s':>14}{'vs scan':>9}{'B/token':>9}")
    for name, r in results["formats"].items():
        click.echo(f"{name:<24}{r['export_tokens_per_s']:>14,.0f}{r['export_vs_scan']:>9.2f}"
                   f"{r['import_tokens_per_s']:>14,.0f}{r['import_vs_scan']:>9.2f}{r['bytes_per_token']:>9.1f}")
    click.echo(json.dumps(results))


if __name__ == "__main__":
    main()
