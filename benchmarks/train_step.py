"""Time of a fuse-train step with the fusion loss divided by the SFT-only step, same pivot, batch, tokens.

    python benchmarks/train_step.py --cache out/demo/cache [--loss topk-kl] [--repeats 5] [--batch-tokens 1536]

Both steps (forward, loss, backward; no optimizer update, so the weights stay the same) run on the same
micro-batches, interleaved, `--repeats` times; the medians and their ratio are printed (target <= 1.15),
with a human table and one JSON line.
"""

from __future__ import annotations

import json
import statistics
import time

import click
import torch

from cache_builder.models import load_model, resolve_model
from fuse_trainer.config import TrainConfig
from fuse_trainer.data import FusionData, collate, discover_sources
from fuse_trainer.train import MicroBatchStream, micro_batch_terms


def timed_step(model, batch, cfg: TrainConfig) -> float:
    start = time.perf_counter()
    terms = micro_batch_terms(model, batch, cfg)
    loss = ((1 - cfg.lam) * terms["sft_sum"] + cfg.lam * terms["fusion_sum"]) / terms["n_tokens"].clamp_min(1)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@click.command()
@click.option("--cache", required=True)
@click.option("--pivot", default="smollm2")
@click.option("--loss", default="topk-kl")
@click.option("--repeats", default=5)
@click.option("--batch-tokens", default=1536)
@click.option("--dtype", default="bf16")
def main(cache, pivot, loss, repeats, batch_tokens, dtype):
    layers = discover_sources(cache, resolve_model(pivot).name)
    data = FusionData(layers)
    stream = MicroBatchStream(data, batch_tokens, seed=0)
    batches = [collate(data.shard(s), rows) for s, rows in (stream[i] for i in range(3))]
    model = load_model(pivot).train()
    sft = TrainConfig(mode="sft", dtype=dtype).validate()
    fused = TrainConfig(mode="unified", loss=loss, lam=0.5, gate="token", dtype=dtype, top_k=10).validate()
    times = {"sft": [], "fusion": []}
    timed_step(model, batches[0], sft)  # warm-up
    for _ in range(repeats):
        for batch in batches:
            times["sft"].append(timed_step(model, batch, sft))
            times["fusion"].append(timed_step(model, batch, fused))
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["fusion"] / medians["sft"]
    print(f"sources: {', '.join(layers)}; loss {loss}; {len(batches)} micro-batches x {repeats} repeats; {torch.get_num_threads()} threads")
    print(f"{'step':8} {'median s':>9}")
    for k, v in medians.items():
        print(f"{k:8} {v:>9.3f}")
    print(f"ratio fusion / SFT: {ratio:.3f} (target <= 1.15)")
    print(json.dumps({"benchmark": "train_step", "loss": loss, "sources": list(layers), "median_s": medians,
                      "ratio": ratio, "repeats": repeats, "batch_tokens": batch_tokens, "dtype": dtype}))


if __name__ == "__main__":
    main()
