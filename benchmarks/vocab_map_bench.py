"""Build time of the vocabulary map for each real source -> pivot pair and each strategy.

    python -m benchmarks.vocab_map_bench [--repeat N]

Pivot SmolLM2 (49,152); sources Qwen2.5-Coder (151,936) and Gemma-3 (262,144). Times the map only
(surfaces are built once per tokenizer and timed separately). Prints a table and one JSON line.
"""

from __future__ import annotations

import os
import time

import click

from alignment import VOCAB_STRATEGIES, build_vocab_map, token_surface
from cache_builder.models import load_tokenizer
from benchmarks.report import json_line, table


@click.command(help=__doc__)
@click.option("--repeat", default=1, show_default=True, help="Builds per (pair, strategy); the minimum is reported.")
def main(repeat: int) -> None:
    toks = {name: load_tokenizer(name) for name in ("smollm2", "qwen", "gemma3")}
    surface_s = {}
    surfaces = {}
    for name, tok in toks.items():
        t = time.perf_counter()
        surfaces[name] = token_surface(tok)
        surface_s[name] = round(time.perf_counter() - t, 2)
    rows = []
    for src in ("qwen", "gemma3"):
        for strategy in VOCAB_STRATEGIES:
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                m = build_vocab_map(surfaces[src], surfaces["smollm2"], strategy, pivot_tokenizer=toks["smollm2"])
                times.append(time.perf_counter() - t)
            rows.append({"pair": f"{src}->smollm2", "src_vocab": len(surfaces[src]), "strategy": strategy,
                         "seconds": round(min(times), 2), "exact": m.n_exact, "fallback": m.n_fallback,
                         "unmapped": m.n_unmapped})
    print(table(rows, [("pair", "pair", "<18"), ("strategy", "strategy", "<20"), ("seconds", "seconds", ">8.2f"),
                       ("exact", "exact", ">9"), ("fallback", "fallback", ">10"), ("unmapped", "unmapped", ">10")]))
    print(json_line("vocab_map", cpus=os.cpu_count(), surface_seconds=surface_s, results=rows))


if __name__ == "__main__":
    main()
