"""cache-build's scoring against two floors and against the naive way, same model, same batches.

    python benchmarks/build_throughput.py --model smollm2 [--dtype bf16] [--repeats 5] [--records 24]
    python benchmarks/build_throughput.py --model qwen --device cuda --dtype bf16 --copies 20 --ways floor,logits,ours

Four ways over the same length-bucketed batches of the shipped corpus, `--repeats` times, interleaved batch by
batch (each batch runs every way, in an order that rotates), so that other processes' load falls on all of them:
  floor    the bare trunk forward (hidden states only): no output layer at all
  logits   the logit forward: the trunk, then the output layer in the cache's precision (float32 logits, as
           `OutputHead.logits`) over the same real positions and position chunks, into one buffer reused by
           every batch, and nothing else: the logits are discarded. No logit cache can be faster than this.
  ours     `score_batch`: the logit forward + top-k and statistics on device, with the scratch buffers reused by
           every batch, as cache-build does
  fused    `score_batch(..., fused=True)`: cache-build --fused-epilogue (both normalisers in one compiled read)
  naive    padding every record to the longest, full [batch, seq, vocab] logits, softmax over the vocab,
           top-k and statistics on CPU in numpy, one row at a time (the same batches, padded to the longest record)
Prints tokens/s (median), the ratios ours/logits (target >= 0.85), ours/floor and ours/naive, and a JSON line.
On a machine other jobs load unevenly, the paired figure is the steadier one: for each batch of each repeat, the
two ways' times taken back to back, their ratio, and the median of those ratios.
On cuda it also prints each way's peak GPU memory above the model's own (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import json
import statistics
import time

import click
import numpy as np
import torch

from alignment import token_surface
from cache_builder.build import DTYPES, BuildSettings, tokenize
from cache_builder.corpus import load_corpus
from cache_builder.models import load_model, load_tokenizer, resolve_model
from cache_builder.scoring import (cached_output_head, length_buckets, pad_right, score_batch, scoring_buffers,
                                   trunk_hidden)


def padded(sequences: list[np.ndarray], device: torch.device, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    length = length or max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.from_numpy(s.astype(np.int64))
        mask[b, : len(s)] = 1
    return ids.to(device), mask.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device (a way that never copies a result back would otherwise not wait for its work)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def floor(model, batch) -> None:
    ids, mask = padded(batch, model.device)
    model.get_decoder()(input_ids=ids, attention_mask=mask)
    synchronize(model.device)


@torch.inference_mode()
def logit_forward(model, batch, position_chunk: int, buffer: torch.Tensor) -> None:
    """buffer: (position_chunk, V) float32, the logits' destination, reused by every batch."""
    head = cached_output_head(model)
    ids, mask = pad_right(batch, model.device)  # (B, T)
    hidden = trunk_hidden(model, ids, mask)[:, :-1][mask[:, 1:].bool()]  # (N, D) the real positions
    for start in range(0, len(hidden), position_chunk):
        chunk = hidden[start:start + position_chunk]  # (C, D)
        head.logits(chunk, out=buffer[: len(chunk)])
    synchronize(model.device)


@torch.inference_mode()
def naive(model, batch, top_k: int, longest: int) -> list:
    rows = []
    ids, mask = padded(batch, model.device, longest)
    logits = model(input_ids=ids, attention_mask=mask).logits.float().cpu().numpy()  # (B, T, V)
    for b, s in enumerate(batch):
        z = logits[b, : len(s) - 1]
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        rows.append((np.argsort(-p, axis=-1)[:, :top_k], np.log(p.max(-1)), z.mean(-1), z.std(-1)))
    return rows


@click.command()
@click.option("--model", "name", default="smollm2")
@click.option("--dtype", default="fp32", type=click.Choice(["fp32", "bf16"]))
@click.option("--repeats", default=5)
@click.option("--records", default=24, help="Records of data/ to score.")
@click.option("--batch-tokens", default=2048)
@click.option("--top-k", default=10)
@click.option("--corpus", default="data")
@click.option("--copies", default=1, help="Score every record this many times (enough work for a GPU).")
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--ways", default="floor,logits,ours", help="Comma-separated subset of floor,logits,ours,fused,naive.")
@click.option("--position-chunk", default=BuildSettings.position_chunk,
              help="Positions projected onto the vocabulary at once (logits, ours); cache-build's default.")
def main(name, dtype, repeats, records, batch_tokens, top_k, corpus, copies, device, ways, position_chunk):
    source = resolve_model(name)
    tokenizer = load_tokenizer(source)
    surface = token_surface(tokenizer)
    model = load_model(source, DTYPES[dtype], device)
    texts = [r.text for r in load_corpus(corpus).records[:records]] * copies
    sequences = [tokenize(t, tokenizer, surface, source.add_bos, 2048)[0] for t in texts]
    batches = [[sequences[i] for i in bucket] for bucket in length_buckets([len(s) for s in sequences], batch_tokens)]
    tokens = sum(len(s) for s in sequences)
    longest = max(len(s) for s in sequences)
    buffers = scoring_buffers(model, position_chunk)  # (2, C, V): one job's scratch, as in cache-build
    everything = {"floor": lambda batch: floor(model, batch),
                  "logits": lambda batch: logit_forward(model, batch, position_chunk, buffers[0]),
                  "ours": lambda batch: score_batch(model, batch, top_k, position_chunk, buffers=buffers),
                  "fused": lambda batch: score_batch(model, batch, top_k, position_chunk, buffers=buffers, fused=True),
                  "naive": lambda batch: naive(model, batch, top_k, longest)}
    ways = {k: everything[k] for k in ways.split(",")}
    cuda = model.device.type == "cuda"
    weights_bytes = torch.cuda.memory_allocated() if cuda else 0
    for run in ways.values():  # warm-up (the head's one-time verification and moments, fused's compilation)
        run(batches[0])
    # Interleaved batch by batch, the order of the ways rotating: load from other processes falls on every way.
    seconds = {k: [0.0] * repeats for k in ways}
    per_batch = {k: [] for k in ways}  # (repeats x batches,) seconds, in the same order for every way
    peak = {k: 0.0 for k in ways}
    names = list(ways)
    for repeat in range(repeats):
        for b, batch in enumerate(batches):
            shift = (repeat + b) % len(names)
            for k in names[shift:] + names[:shift]:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                ways[k](batch)
                elapsed = time.perf_counter() - start
                seconds[k][repeat] += elapsed
                per_batch[k].append(elapsed)
                if cuda:
                    peak[k] = max(peak[k], (torch.cuda.max_memory_allocated() - weights_bytes) / 2**20)
    peak = peak if cuda else {}
    rate = {k: tokens / statistics.median(v) for k, v in seconds.items()}

    def ratio(a: str, b: str) -> float | None:
        return rate[a] / rate[b] if a in rate and b in rate else None

    def paired(a: str, b: str) -> float | None:
        """Median over batch runs of b's time / a's time (a's throughput over b's on the same batch)."""
        if a not in per_batch or b not in per_batch:
            return None
        return statistics.median(tb / ta for ta, tb in zip(per_batch[a], per_batch[b]))

    result = {"benchmark": "build_throughput", "model": name, "dtype": dtype, "device": str(model.device),
              "position_chunk": position_chunk, "batch_tokens": batch_tokens,
              "gpu": torch.cuda.get_device_name() if cuda else None, "tokens": tokens, "repeats": repeats,
              "tokens_per_s": rate, "ours_over_logits": ratio("ours", "logits"),
              "ours_over_floor": ratio("ours", "floor"), "logits_over_floor": ratio("logits", "floor"),
              "ours_over_naive": ratio("ours", "naive"), "fused_over_logits": ratio("fused", "logits"),
              "paired_ours_over_logits": paired("ours", "logits"), "paired_fused_over_logits": paired("fused", "logits"),
              "paired_ours_over_floor": paired("ours", "floor"), "seconds": seconds,
              "peak_mib_above_weights": peak or None, "vocab": model.config.vocab_size, "threads": torch.get_num_threads()}
    print(f"{name} {dtype} on {result['gpu'] or 'cpu'}: {tokens} tokens, median of {repeats}")
    for k, v in rate.items():
        memory = f"  peak {peak[k]:8.0f} MiB above the weights" if k in peak else ""
        print(f"  {k:6} {v:9.0f} tokens/s{memory}")
    for a, b, target in [("ours", "logits", " (target >= 0.85)"), ("fused", "logits", ""), ("ours", "floor", ""),
                         ("logits", "floor", ""), ("ours", "naive", "")]:
        if ratio(a, b) is not None:
            print(f"  {a} / {b} = {ratio(a, b):.2f}{target}")
    for way in ("ours", "fused"):
        if paired(way, "logits") is not None:
            print(f"  paired, median over {len(per_batch[way])} batch runs: {way} / logits = {paired(way, 'logits'):.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
