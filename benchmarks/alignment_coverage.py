"""Coverage of exact-context position alignment and vocabulary-map figures on real tokenizers.

    python -m benchmarks.alignment_coverage

Pivot SmolLM2; sources Qwen2.5-Coder and Gemma-3 (run with its <bos>, as cache-build does). Domains:
news-like prose and worked math solutions (written for this benchmark) and Python code (the stdlib's own
sources of json, textwrap, inspect). Prints two tables, then one JSON line.
  coverage      share of pivot positions (t < T-1) with a partner position that has the same context
  tokens/chunk  mean pivot tokens between shared boundaries (ALM chunk length)
  src tokens    share of the source's tokens in the text whose id maps exactly / by the fallback / not at all
"""

from __future__ import annotations

import inspect
import json
import json.decoder
import textwrap
import time

import click
import numpy as np


from alignment import align_positions, build_vocab_map, token_byte_ends, token_surface
from benchmarks.report import json_line
from cache_builder.models import load_tokenizer

PROSE = [
    "The city council voted 7-2 on Tuesday to approve a $48 million plan to rebuild the harbour bridge, ending "
    "a two-year dispute over who should pay for the repairs. Engineers warned last spring that corrosion had "
    "weakened several of the bridge's steel supports, and traffic has been limited to one lane since March.\n\n"
    "\"This is the most important infrastructure decision we've made in a decade,\" said Mayor Elena Ortiz, "
    "who had campaigned on the issue. Opponents argued that the state, not local taxpayers, should cover most "
    "of the cost. Construction is expected to begin in early 2026 and last about 18 months.",
    "Shares of European carmakers fell sharply on Friday after regulators announced stricter emissions targets "
    "for 2030. Analysts at several banks cut their forecasts, citing higher costs for batteries and the slow "
    "roll-out of charging stations in rural areas. Meanwhile, consumer groups welcomed the rules, saying they "
    "would lower running costs for drivers over the long term.\n\nThe central bank left interest rates unchanged "
    "at 3.75%, but signalled that a cut could come as early as September if inflation keeps easing.",
]

MATH = [
    "Problem: Find all real x such that x^2 - 5x + 6 = 0.\nSolution: Factor the quadratic: x^2 - 5x + 6 = "
    "(x - 2)(x - 3). A product is zero exactly when one factor is zero, so x = 2 or x = 3. Check: 4 - 10 + 6 = 0 "
    "and 9 - 15 + 6 = 0. The answer is x \\in \\{2, 3\\}.",
    "Problem: What is the sum of the first 100 positive integers?\nSolution: Pair the terms: 1 + 100 = 2 + 99 = "
    "... = 50 + 51 = 101. There are 50 pairs, so the sum is 50 \\cdot 101 = 5050. Equivalently, "
    "\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2} with n = 100 gives 100 \\cdot 101 / 2 = 5050.",
    "Problem: A bag has 3 red and 5 blue balls. Two are drawn without replacement. What is the probability "
    "that both are red?\nSolution: P(first red) = 3/8 and P(second red | first red) = 2/7, so "
    "P = (3/8)(2/7) = 6/56 = 3/28 \\approx 0.107.",
]

CODE = [inspect.getsource(json.decoder), inspect.getsource(textwrap), inspect.getsource(inspect)[:40000]]
DOMAINS = {"prose": PROSE, "code": CODE, "math": MATH}
SOURCES = {"qwen": False, "gemma3": True}  # source -> runs with <bos>


def encode(tok, text: str, bos: bool) -> np.ndarray:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return np.asarray(([tok.bos_token_id] if bos else []) + ids, dtype=np.int64)  # (T,)


@click.command(help=__doc__)
def main() -> None:
    t0 = time.time()
    toks = {name: load_tokenizer(name) for name in ("smollm2", *SOURCES)}
    surf = {name: token_surface(tok) for name, tok in toks.items()}
    piv = "smollm2"
    results = []
    for src, src_bos in SOURCES.items():
        maps = {s: build_vocab_map(surf[src], surf[piv], s, pivot_tokenizer=toks[piv]) for s in ("exact", "exact+first-token", "exact+mined")}
        row = {"pair": f"{src}->{piv}", "src_vocab": len(surf[src]), "piv_vocab": len(surf[piv])}
        for s, m in maps.items():
            row[f"vocab[{s}]"] = {"exact": m.n_exact, "fallback": m.n_fallback, "unmapped": m.n_unmapped}
        for domain, texts in DOMAINS.items():
            aligned = positions = chunks = 0
            src_ids = []
            for text in texts:
                p_ids, s_ids = encode(toks[piv], text, False), encode(toks[src], text, src_bos)
                p_end = token_byte_ends(p_ids, surf[piv], text)
                s_end = token_byte_ends(s_ids, surf[src], text)
                p_pos, _ = align_positions(p_end, s_end)
                aligned += len(p_pos)
                positions += len(p_ids) - 1
                chunks += len(p_pos)
                src_ids.append(s_ids[~surf[src].is_special[s_ids]])
            ids = np.concatenate(src_ids)
            exact_hit = maps["exact"].src_to_piv[ids] >= 0
            ft_hit = maps["exact+first-token"].src_to_piv[ids] >= 0
            row[domain] = {
                "coverage": round(aligned / positions, 4),
                "pivot_positions": positions,
                "tokens_per_chunk": round(positions / max(chunks, 1), 3),
                "src_tokens_exact": round(float(exact_hit.mean()), 4),
                "src_tokens_first_token_fallback": round(float((ft_hit & ~exact_hit).mean()), 4),
                "src_tokens_unmapped_first_token": round(float((~ft_hit).mean()), 4),
            }
        results.append(row)
    print(f"{'pair':<16}{'domain':<8}{'coverage':>9}{'tok/chunk':>10}{'src exact':>10}{'+1st-tok':>9}{'unmapped':>9}")
    for row in results:
        for domain in DOMAINS:
            d = row[domain]
            print(f"{row['pair']:<16}{domain:<8}{d['coverage']:>9.1%}{d['tokens_per_chunk']:>10.3f}"
                  f"{d['src_tokens_exact']:>10.1%}{d['src_tokens_first_token_fallback']:>9.1%}{d['src_tokens_unmapped_first_token']:>9.1%}")
    print()
    print(f"{'pair':<16}{'strategy':<20}{'exact':>9}{'fallback':>10}{'unmapped':>10}  (source vocabulary entries)")
    for row in results:
        for s in ("exact", "exact+first-token", "exact+mined"):
            c = row[f"vocab[{s}]"]
            print(f"{row['pair']:<16}{s:<20}{c['exact']:>9}{c['fallback']:>10}{c['unmapped']:>10}")
    print(json_line("alignment_coverage", seconds=round(time.time() - t0, 1), results=results))


if __name__ == "__main__":
    main()
