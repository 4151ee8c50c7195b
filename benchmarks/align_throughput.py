"""Position alignment throughput on the real tokenizers: pivot tokens per second per source.

    python benchmarks/align_throughput.py [--corpus data/] [--repeats 5]

Every record of the corpus is tokenized once by the pivot (SmolLM2) and by each source, as cache-build does
(`cache_builder.build.tokenize`, with <bos> where the model needs it), outside the timing. Timed, per record: the byte end of every token on both sides
(`token_byte_ends`, which also proves that the tokens spell the text) and the exact-context alignment
(`align_positions`), i.e. what cache-align does per record before it gathers the cached rows. Median of
`--repeats` passes over the corpus. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


from alignment import align_positions, token_byte_ends, token_surface
from cache_builder.build import tokenize
from cache_builder.corpus import load_corpus
from cache_builder.models import load_tokenizer, resolve_model

PIVOT = "smollm2"
SOURCES = ("qwen", "gemma3")
NO_TRUNCATION = 1 << 30


def token_ids(name: str, texts: list[str]) -> tuple[list[np.ndarray], object]:
    """Each text's token ids (T,) as cache-build makes them for model `name`, and that model's token surface."""
    tokenizer, add_bos = load_tokenizer(name), resolve_model(name).add_bos
    surface = token_surface(tokenizer)
    return [tokenize(t, tokenizer, surface, add_bos, NO_TRUNCATION)[0] for t in texts], surface


def align_pass(pairs: list[tuple[str, np.ndarray, np.ndarray]], piv_surface, src_surface) -> tuple[float, int]:
    """Seconds for one pass over (text, pivot ids, source ids) and the number of aligned positions."""
    start, aligned = time.perf_counter(), 0
    for text, p_ids, s_ids in pairs:
        p_pos, _ = align_positions(token_byte_ends(p_ids, piv_surface, text), token_byte_ends(s_ids, src_surface, text))
        aligned += len(p_pos)
    return time.perf_counter() - start, aligned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    texts = [r.text for r in load_corpus(a.corpus).records]
    piv_ids, piv_surface = token_ids(PIVOT, texts)
    pivot_tokens = sum(len(ids) for ids in piv_ids)
    rows = []
    for src in SOURCES:
        src_ids, src_surface = token_ids(src, texts)
        pairs = list(zip(texts, piv_ids, src_ids))
        runs = [align_pass(pairs, piv_surface, src_surface) for _ in range(a.repeats)]
        seconds = statistics.median(s for s, _ in runs)
        rows.append({"pair": f"{src}->{PIVOT}", "records": len(texts), "pivot_tokens": pivot_tokens,
                     "aligned_positions": runs[0][1], "median_s": round(seconds, 4),
                     "pivot_tokens_per_s": round(pivot_tokens / seconds)})
    print(f"{'pair':<18}{'records':>8}{'pivot tokens':>13}{'aligned':>9}{'median s':>10}{'pivot tok/s':>13}")
    for r in rows:
        print(f"{r['pair']:<18}{r['records']:>8}{r['pivot_tokens']:>13}{r['aligned_positions']:>9}"
              f"{r['median_s']:>10.3f}{r['pivot_tokens_per_s']:>13,}")
    print(json.dumps({"benchmark": "align_throughput", "corpus": a.corpus, "repeats": a.repeats, "results": rows}))


if __name__ == "__main__":
    main()
