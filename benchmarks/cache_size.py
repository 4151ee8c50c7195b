"""Bytes per token of a cache, against FuseLLM's layout and DistillKit's published budget.

    python -m benchmarks.cache_size out/demo/cache/qwen [more cache folders ...]

For each source-native cache: the shard bytes on disk per token (every field: text, offsets, ids, logits,
five statistics), the same without the text column, and the same cached top-k re-encoded as FuseLLM
stores it (per position K float16 logits + K int64 ids, uncompressed). DistillKit's figures are its
published budgets (about 121 B/token at k=50 and 330 B/token at k=128), quoted, not re-encoded.
Prints a human table and one JSON line.
"""

from __future__ import annotations

from pathlib import Path

import click
import pyarrow.parquet as pq

from benchmarks.report import json_line, table
from cache_builder.manifest import load_manifest

DISTILLKIT_PUBLISHED = {50: 121.0, 128: 330.0}


def measure(folder: Path) -> dict:
    manifest = load_manifest(folder)
    k, tokens = manifest["top_k"], manifest["totals"]["tokens"]
    positions = tokens - manifest["totals"]["rows"]  # one prediction per token but the last of each row
    text_bytes = 0
    for shard in manifest["shards"]:
        meta = pq.ParquetFile(folder / shard["path"]).metadata
        names = [meta.schema.column(i).path for i in range(meta.num_columns)]
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            text_bytes += sum(group.column(i).total_compressed_size for i, n in enumerate(names) if n == "text")
    total = manifest["totals"]["bytes"]
    return {
        "cache": str(folder),
        "source": manifest["source"]["name"],
        "k": k,
        "logit_dtype": manifest["logit_dtype"],
        "tokens": tokens,
        "bytes_per_token": total / tokens,
        "bytes_per_token_without_text": (total - text_bytes) / tokens,
        "fusellm_layout_bytes_per_token": positions * k * (2 + 8) / tokens,
        "distillkit_published_bytes_per_token": DISTILLKIT_PUBLISHED,
    }


@click.command(help=__doc__)
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def main(folders: tuple[str, ...]) -> None:
    rows = [measure(Path(f)) for f in folders]
    print(table(rows, [("source", "source", "<11"), ("k", "k", ">4"), ("logits", "logit_dtype", ">9"),
                       ("ours B/tok", "bytes_per_token", ">12.1f"), ("w/o text", "bytes_per_token_without_text", ">10.1f"),
                       ("FuseLLM B/tok", "fusellm_layout_bytes_per_token", ">15.1f")]))
    print("DistillKit (published): ~121 B/token at k=50, ~330 B/token at k=128")
    print(json_line("cache_size", results=rows))


if __name__ == "__main__":
    main()
