"""One position chunk of cache-build's scoring: the output GEMM alone against the GEMM and everything after it.

    python benchmarks/score_chunk.py [--vocab 262144] [--hidden 640] [--chunk 256] [--repeats 5]

Random float32 weights and hidden states of a real model's shape (default Gemma-3: 262,144 x 640), one chunk of
cache-build's default size; the two ways alternate `--repeats` times. Prints the minimum and median milliseconds
of each, the work after the GEMM (full minus GEMM, by minimum) and GEMM / full: the ratio against a GEMM-only
floor. Run it with PYTHONPATH pointing at another checkout to compare two versions of `score_positions`.
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from cache_builder.scoring import output_head, score_positions


class Head(torch.nn.Module):
    """A bare output layer in a module with the one method `output_head` reads, plus a config."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.lm_head.weight.data = weight
        self.config = type("Config", (), {"model_type": "llama", "get_text_config": lambda self: self})()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


@click.command()
@click.option("--vocab", default=262144)
@click.option("--hidden", default=640)
@click.option("--chunk", default=256)
@click.option("--top-k", default=10)
@click.option("--repeats", default=5)
def main(vocab, hidden, chunk, top_k, repeats):
    generator = torch.Generator().manual_seed(0)
    head = output_head(Head(torch.randn(vocab, hidden, generator=generator) * 0.05), verify=False)
    states = torch.randn(chunk, hidden, generator=generator)  # (C, D)
    targets = torch.randint(0, vocab, (chunk,), generator=generator)  # (C,)
    buffers = torch.zeros((2, chunk, vocab))  # (2, C, V), touched once so that no way pays the page faults
    ways = {"gemm": lambda: head.logits(states, out=buffers[0]),
            "full": lambda: score_positions(head, states, targets, top_k, buffers)}
    seconds = {name: [] for name in ways}
    with torch.inference_mode():
        for run in ways.values():
            run()
        for _ in range(repeats):
            for name, run in ways.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in seconds.items()}
    for name, values in seconds.items():
        print(f"{name}: min {best[name] * 1e3:7.0f} ms  median {statistics.median(values) * 1e3:7.0f} ms")
    print(f"after the GEMM: {(best['full'] - best['gemm']) * 1e3:.0f} ms; gemm / full = {best['gemm'] / best['full']:.2f}")


if __name__ == "__main__":
    main()
