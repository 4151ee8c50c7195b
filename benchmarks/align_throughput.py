"""Position alignment throughput on the real tokenizers: pivot tokens per second per source.

    python -m benchmarks.align_throughput [--corpus data/] [--repeats 5]

Every record of the corpus is tokenized once by the pivot (SmolLM2) and by each source, as cache-build does
(`cache_builder.build.tokenize`, with <bos> where the model needs it), outside the timing. Timed, per record: the byte end of every token on both sides
(`token_byte_ends`, which also proves that the tokens spell the text) and the exact-context alignment
(`align_positions`), i.e. what cache-align does per record before it gathers the cached rows. Median of
`--repeats` passes over the corpus. Prints a table and one JSON line.
"""

from __future__ import annotations


import click
import numpy as np

from alignment import align_positions, token_byte_ends, token_surface
from cache_builder.build import tokenize
from cache_builder.corpus import load_corpus
from cache_builder.models import load_tokenizer, resolve_model
from benchmarks.report import json_line, median_seconds, table

PIVOT = "smollm2"
SOURCES = ("qwen", "gemma3")
NO_TRUNCATION = 1 << 30


def token_ids(name: str, texts: list[str]) -> tuple[list[np.ndarray], object]:
    """Each text's token ids (T,) as cache-build makes them for model `name`, and that model's token surface."""
    tokenizer, add_bos = load_tokenizer(name), resolve_model(name).add_bos
    surface = token_surface(tokenizer)
    return [tokenize(t, tokenizer, surface, add_bos, NO_TRUNCATION)[0] for t in texts], surface


def align_pass(pairs: list[tuple[str, np.ndarray, np.ndarray]], piv_surface, src_surface) -> int:
    """One pass over (text, pivot ids, source ids); returns the number of aligned positions."""
    aligned = 0
    for text, p_ids, s_ids in pairs:
        p_pos, _ = align_positions(token_byte_ends(p_ids, piv_surface, text), token_byte_ends(s_ids, src_surface, text))
        aligned += len(p_pos)
    return aligned


@click.command(help=__doc__)
@click.option("--corpus", default="data/", show_default=True)
@click.option("--repeats", default=5, show_default=True)
def main(corpus: str, repeats: int) -> None:
    texts = [r.text for r in load_corpus(corpus).records]
    piv_ids, piv_surface = token_ids(PIVOT, texts)
    pivot_tokens = sum(len(ids) for ids in piv_ids)
    rows = []
    for src in SOURCES:
        src_ids, src_surface = token_ids(src, texts)
        pairs = list(zip(texts, piv_ids, src_ids))
        seconds = median_seconds(lambda: align_pass(pairs, piv_surface, src_surface), repeats)
        rows.append({"pair": f"{src}->{PIVOT}", "records": len(texts), "pivot_tokens": pivot_tokens,
                     "aligned_positions": align_pass(pairs, piv_surface, src_surface), "median_s": round(seconds, 4),
                     "pivot_tokens_per_s": round(pivot_tokens / seconds)})
    print(table(rows, [("pair", "pair", "<18"), ("records", "records", ">8"), ("pivot tokens", "pivot_tokens", ">13"),
                       ("aligned", "aligned_positions", ">9"), ("median s", "median_s", ">10.3f"),
                       ("pivot tok/s", "pivot_tokens_per_s", ">13,")]))
    print(json_line("align_throughput", corpus=corpus, repeats=repeats, results=rows))


if __name__ == "__main__":
    main()
