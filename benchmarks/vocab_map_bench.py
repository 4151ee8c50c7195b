"""Build time of the vocabulary map for each real source -> pivot pair and each strategy.

    .venv/bin/python benchmarks/vocab_map_bench.py [--repeat N]

Pivot SmolLM2 (49,152); sources Qwen2.5-Coder (151,936) and Gemma-3 (262,144). Times the map only
(surfaces are built once per tokenizer and timed separately). Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time


from alignment import VOCAB_STRATEGIES, build_vocab_map, token_surface
from cache_builder.models import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1, help="builds per (pair, strategy); the minimum is reported")
    args = parser.parse_args()
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
            for _ in range(args.repeat):
                t = time.perf_counter()
                m = build_vocab_map(surfaces[src], surfaces["smollm2"], strategy, pivot_tokenizer=toks["smollm2"])
                times.append(time.perf_counter() - t)
            rows.append({"pair": f"{src}->smollm2", "src_vocab": len(surfaces[src]), "strategy": strategy,
                         "seconds": round(min(times), 2), "exact": m.n_exact, "fallback": m.n_fallback,
                         "unmapped": m.n_unmapped})
    print(json.dumps({"benchmark": "vocab_map", "cpus": os.cpu_count(), "surface_seconds": surface_s, "results": rows}))
    print()
    print(f"{'pair':<18}{'strategy':<20}{'seconds':>8}{'exact':>9}{'fallback':>10}{'unmapped':>10}")
    for r in rows:
        print(f"{r['pair']:<18}{r['strategy']:<20}{r['seconds']:>8.2f}{r['exact']:>9}{r['fallback']:>10}{r['unmapped']:>10}")


if __name__ == "__main__":
    main()
