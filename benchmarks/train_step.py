"""Time of a fuse-train step with the fusion loss divided by the SFT-only step, same pivot, batch, tokens.

    python -m benchmarks.train_step --cache out/demo/cache [--loss topk-kl] [--repeats 5] [--batch-tokens 1536]

Both steps (forward, loss, backward; no optimizer update, so the weights stay the same) run on the same
micro-batches, interleaved, `--repeats` times; the medians and their ratio are printed (target <= 1.15),
with a human table and one JSON line.

--online adds online distillation for comparison: the same fusion step plus what a trainer without a cache
must do for each micro-batch, namely run every source model over the same records (their own tokens, bf16
trunk) and take top-k and statistics (`score_batch`, as cache-build does). Cross-tokenizer alignment is left
out, so the online figure is a lower bound.
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from benchmarks.report import json_line
from cache_builder.build import DTYPES
from cache_builder.models import load_model, resolve_model
from cache_builder.reader import read_rows
from cache_builder.scoring import score_batch
from fuse_trainer.config import TrainConfig
from fuse_trainer.data import FusionData, collate, discover_sources
from fuse_trainer.stream import MicroBatchStream
from fuse_trainer.train import micro_batch_terms


def timed_step(model, batch, cfg: TrainConfig) -> float:
    start = time.perf_counter()
    terms = micro_batch_terms(model, batch, cfg)
    loss = ((1 - cfg.lam) * terms["sft_sum"] + cfg.lam * terms["fusion_sum"]) / terms["n_tokens"].clamp_min(1)
    loss.backward()
    model.zero_grad(set_to_none=True)
    if batch.input_ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def source_sequences(layers: dict, data: FusionData, micro_batches: list) -> dict[str, list[list]]:
    """source -> per micro-batch, the source-native token ids of its records (read from the source's own cache)."""
    out = {}
    for name, aligned in layers.items():
        native = read_rows(aligned.parent.parent, ["record_id", "token_ids"])  # cache/<source>/aligned/<pivot>
        row_of = {rid: r for r, rid in enumerate(native["record_id"])}
        out[name] = [[native["token_ids"].row(row_of[rid]) for rid in (data.shard(s).record_ids[r] for r in rows)]
                     for s, rows in micro_batches]
    return out


def timed_sources(models: dict, sequences: dict, i: int, device: str) -> float:
    """Seconds to score micro-batch i with every source (what online distillation adds to each step)."""
    start = time.perf_counter()
    for name, model in models.items():
        score_batch(model, sequences[name][i], top_k=10)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@click.command()
@click.option("--cache", required=True)
@click.option("--pivot", default="smollm2")
@click.option("--loss", default="topk-kl")
@click.option("--repeats", default=5)
@click.option("--batch-tokens", default=1536)
@click.option("--dtype", default="bf16")
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--online", is_flag=True, help="Also time online distillation (the source models in the loop).")
@click.option("--sources", "source_names", default=None,
              help="With --online: comma-separated model names per source, e.g. qwen=/path,gemma3=/path "
                   "(default: each source's short name).")
def main(cache, pivot, loss, repeats, batch_tokens, dtype, device, online, source_names):
    layers = discover_sources(cache, resolve_model(pivot).name)
    data = FusionData(layers)
    stream = MicroBatchStream(data, batch_tokens, seed=0)
    micro_batches = [stream[i] for i in range(3)]
    batches = [collate(data.shard(s), rows).to(torch.device(device)) for s, rows in micro_batches]
    if online:
        names = dict(spec.split("=", 1) for spec in source_names.split(",")) if source_names else {}
        sources = {name: load_model(names.get(name, name), DTYPES["bf16"], device) for name in layers}
        sequences = source_sequences(layers, data, micro_batches)
    model = load_model(pivot, device=device).train()
    sft = TrainConfig(mode="sft", dtype=dtype).validate()
    fused = TrainConfig(mode="unified", loss=loss, lam=0.5, gate="token", dtype=dtype, uld_top_k=10).validate()
    times = {"sft": [], "fusion": []} | ({"online": []} if online else {})
    timed_step(model, batches[0], sft)  # warm-up
    for _ in range(repeats):
        for i, batch in enumerate(batches):
            times["sft"].append(timed_step(model, batch, sft))
            times["fusion"].append(timed_step(model, batch, fused))
            if online:
                times["online"].append(timed_sources(sources, sequences, i, device) + timed_step(model, batch, fused))
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["fusion"] / medians["sft"]
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"sources: {', '.join(layers)}; loss {loss}; {len(batches)} micro-batches x {repeats} repeats; {where}")
    print(f"{'step':8} {'median s':>9}")
    for k, v in medians.items():
        print(f"{k:8} {v:>9.3f}")
    print(f"ratio fusion / SFT: {ratio:.3f} (target <= 1.15)")
    if online:
        print(f"ratio online distillation / cached fusion: {medians['online'] / medians['fusion']:.2f}")
    print(json_line("train_step", loss=loss, sources=list(layers), median_s=medians, ratio=ratio, repeats=repeats,
                    batch_tokens=batch_tokens, dtype=dtype, device=where,
                    online_over_fusion=medians["online"] / medians["fusion"] if online else None))


if __name__ == "__main__":
    main()
