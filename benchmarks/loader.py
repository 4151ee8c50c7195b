"""Loader throughput: aligned shards of all sources -> ready training tensors, tokens/s in one process.

    python -m benchmarks.loader --cache out/demo/cache [--pivot smollm2] [--epochs 5] [--batch-tokens 1536]

Runs the trainer's own data path (shard index, epoch plan, shard reads, join across sources, collate) for
several epochs without a model, and compares the rate with the trainer's consumption rate given by
`--train-tokens-per-s` (measured by fuse-train's progress bar; target: loader >= 20x that). Prints a line
and a JSON line.
"""

from __future__ import annotations

import time

import click

from benchmarks.report import json_line
from cache_builder.models import resolve_model
from fuse_trainer.data import FusionData, collate, discover_sources


@click.command()
@click.option("--cache", required=True)
@click.option("--pivot", default="smollm2")
@click.option("--epochs", default=5)
@click.option("--batch-tokens", default=1536)
@click.option("--train-tokens-per-s", default=200.0, help="The trainer's consumption rate to compare with.")
def main(cache, pivot, epochs, batch_tokens, train_tokens_per_s):
    layers = discover_sources(cache, resolve_model(pivot).name)
    start = time.perf_counter()
    data = FusionData(layers)
    index_seconds = time.perf_counter() - start
    tokens = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        for shard, rows in data.plan(epoch, batch_tokens, seed=0):
            batch = collate(data.shard(shard), rows)
            tokens += int(batch.attention_mask.sum())
    seconds = time.perf_counter() - start
    rate = tokens / seconds
    print(f"{len(layers)} sources, {epochs} epochs, {tokens} tokens: {rate:.0f} tokens/s "
          f"({rate / train_tokens_per_s:.0f}x the trainer's {train_tokens_per_s:.0f} tokens/s); index {index_seconds:.2f} s")
    print(json_line("loader", sources=list(layers), tokens=tokens, tokens_per_s=rate,
                    ratio_to_trainer=rate / train_tokens_per_s, index_seconds=index_seconds))


if __name__ == "__main__":
    main()
