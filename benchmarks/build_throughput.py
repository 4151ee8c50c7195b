"""cache-build's scoring against the floor and against the naive way, same model, same batches.

    python benchmarks/build_throughput.py --model smollm2 [--dtype bf16] [--repeats 3] [--records 24]

Three ways over the same length-bucketed batches of the shipped corpus, interleaved, `--repeats` times:
  floor    the bare trunk forward (hidden states only): no output layer at all
  ours     `score_batch`: trunk forward + chunked fp32 output layer, top-k and statistics on device
  naive    padding every record to the longest, full [batch, seq, vocab] logits, softmax over the vocab,
           top-k and statistics on CPU in numpy, one row at a time
Prints tokens/s (median), the ratios ours/floor (target >= 0.85) and ours/naive, a table and a JSON line.
"""

from __future__ import annotations

import json
import statistics
import time

import click
import numpy as np
import torch

from alignment import token_surface
from cache_builder.build import DTYPES, tokenize
from cache_builder.corpus import load_corpus
from cache_builder.models import load_model, load_tokenizer, resolve_model
from cache_builder.scoring import length_buckets, score_batch


def padded(sequences: list[np.ndarray], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    length = length or max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.from_numpy(s.astype(np.int64))
        mask[b, : len(s)] = 1
    return ids, mask


@torch.inference_mode()
def floor(model, batches) -> None:
    for batch in batches:
        ids, mask = padded(batch)
        model.get_decoder()(input_ids=ids, attention_mask=mask)


def ours(model, batches, top_k: int) -> None:
    for batch in batches:
        score_batch(model, batch, top_k)


@torch.inference_mode()
def naive(model, sequences, top_k: int, batch_size: int) -> list:
    rows = []
    longest = max(len(s) for s in sequences)
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        ids, mask = padded(chunk, longest)
        logits = model(input_ids=ids, attention_mask=mask).logits.float().numpy()  # (B, T, V)
        for b, s in enumerate(chunk):
            z = logits[b, : len(s) - 1]
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            rows.append((np.argsort(-p, axis=-1)[:, :top_k], np.log(p.max(-1)), z.mean(-1), z.std(-1)))
    return rows


@click.command()
@click.option("--model", "name", default="smollm2")
@click.option("--dtype", default="fp32", type=click.Choice(["fp32", "bf16"]))
@click.option("--repeats", default=3)
@click.option("--records", default=24, help="Records of data/ to score.")
@click.option("--batch-tokens", default=2048)
@click.option("--top-k", default=10)
def main(name, dtype, repeats, records, batch_tokens, top_k):
    source = resolve_model(name)
    tokenizer = load_tokenizer(source)
    surface = token_surface(tokenizer)
    model = load_model(source, DTYPES[dtype])
    texts = [r.text for r in load_corpus("data").records[:records]]
    sequences = [tokenize(t, tokenizer, surface, source.add_bos, 2048)[0] for t in texts]
    batches = [[sequences[i] for i in bucket] for bucket in length_buckets([len(s) for s in sequences], batch_tokens)]
    tokens = sum(len(s) for s in sequences)
    ways = {"floor": lambda: floor(model, batches), "ours": lambda: ours(model, batches, top_k),
            "naive": lambda: naive(model, sequences, top_k, max(len(b) for b in batches))}
    ways["ours"]()  # warm-up
    seconds = {k: [] for k in ways}
    for _ in range(repeats):
        for k, run in ways.items():
            start = time.perf_counter()
            run()
            seconds[k].append(time.perf_counter() - start)
    rate = {k: tokens / statistics.median(v) for k, v in seconds.items()}
    result = {"benchmark": "build_throughput", "model": name, "dtype": dtype, "tokens": tokens, "repeats": repeats,
              "tokens_per_s": rate, "ours_over_floor": rate["ours"] / rate["floor"],
              "ours_over_naive": rate["ours"] / rate["naive"], "threads": torch.get_num_threads()}
    print(f"{name} {dtype}: {tokens} tokens, median of {repeats}")
    for k, v in rate.items():
        print(f"  {k:6} {v:8.0f} tokens/s")
    print(f"  ours / floor = {result['ours_over_floor']:.2f} (target >= 0.85); ours / naive = {result['ours_over_naive']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
