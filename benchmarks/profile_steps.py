"""torch.profiler tables of the two hot loops: cache-build's scoring of one batch, and one fuse-train micro-batch.

    python -m benchmarks.profile_steps build --model qwen [--dtype bf16] [--device cpu] [--batch-tokens 2048]
    python -m benchmarks.profile_steps train --cache out/demo/cache [--loss infifusion] [--device cpu]

build: the first length bucket of data/ (the same batches cache-build makes), scored once to warm up, then profiled.
train: three micro-batches of the cache (forward, fusion + SFT loss, backward), after one warm-up.
Prints the operators by self time (top 15) and writes a Chrome trace next to --trace if given.
"""

from __future__ import annotations

import click
import torch
from torch.profiler import ProfilerActivity, profile

from alignment import token_surface
from cache_builder.build import DTYPES, tokenize
from cache_builder.corpus import load_corpus
from cache_builder.models import load_model, load_tokenizer, resolve_model
from cache_builder.scoring import length_buckets, score_batch
from fuse_trainer.config import TrainConfig
from fuse_trainer.data import FusionData, collate, discover_sources
from fuse_trainer.stream import MicroBatchStream
from fuse_trainer.train import micro_batch_terms


def report(prof, device: str, trace: str | None) -> None:
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=48))
    if trace:
        prof.export_chrome_trace(trace)


def activities(device: str) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])


@click.group()
def main():
    """Profile cache-build or fuse-train."""


@main.command()
@click.option("--model", "name", default="qwen")
@click.option("--dtype", default="bf16", type=click.Choice(["fp32", "bf16"]))
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--batch-tokens", default=2048)
@click.option("--top-k", default=10)
@click.option("--trace", default=None, help="Write a Chrome trace here.")
def build(name, dtype, device, batch_tokens, top_k, trace):
    source = resolve_model(name)
    tokenizer = load_tokenizer(source)
    surface = token_surface(tokenizer)
    model = load_model(source, DTYPES[dtype], device)
    sequences = [tokenize(r.text, tokenizer, surface, source.add_bos, 2048)[0] for r in load_corpus("data").records]
    bucket = length_buckets([len(s) for s in sequences], batch_tokens)[0]
    batch = [sequences[i] for i in bucket]
    score_batch(model, batch, top_k)  # warm-up (and the head's one-time verification)
    with profile(activities=activities(device)) as prof:
        score_batch(model, batch, top_k)
    print(f"cache-build scoring: {name} {dtype} on {device}, {len(batch)} sequences, {sum(map(len, batch))} tokens")
    report(prof, device, trace)


@main.command()
@click.option("--cache", required=True)
@click.option("--pivot", default="smollm2")
@click.option("--loss", default="infifusion")
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--batch-tokens", default=1536)
@click.option("--trace", default=None, help="Write a Chrome trace here.")
def train(cache, pivot, loss, device, batch_tokens, trace):
    data = FusionData(discover_sources(cache, resolve_model(pivot).name))
    stream = MicroBatchStream(data, batch_tokens, seed=0)
    batches = [collate(data.shard(s), rows).to(torch.device(device)) for s, rows in (stream[i] for i in range(3))]
    model = load_model(pivot, device=device).train()
    cfg = TrainConfig(mode="unified", loss=loss, lam=0.5, gate="token", dtype="bf16", uld_top_k=10,
                      standardize=True).validate()

    def step(batch):
        terms = micro_batch_terms(model, batch, cfg)
        ((1 - cfg.lam) * terms["sft_sum"] + cfg.lam * terms["fusion_sum"]).backward()
        model.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    with profile(activities=activities(device)) as prof:
        for batch in batches:
            step(batch)
    print(f"fuse-train micro-batches: loss {loss}, {len(batches)} x {batch_tokens} tokens on {device}")
    report(prof, device, trace)


if __name__ == "__main__":
    main()
