"""How good are the cached distillation targets for the pivot's own next token? Read from an aligned cache only.

    python -m experiments.target_agreement out/repro/cache [--pivot smollm2] [--split train]

For every source aligned to the pivot, at the aligned response positions of the split, per domain and per kind
of position:
  single   both tokenizers' next tokens end at the same byte: the same event for source and pivot
  multi    they do not (the chunk up to the next shared boundary holds more than one token on a side)
it prints
  top1=gold   the source's top candidate, mapped into the pivot vocabulary, is the pivot's gold next token
  p(gold)     source probability mass on the pivot's gold token (0 where it is not a candidate)
  gold absent the pivot's gold token is not among the K mapped candidates (top-k KL pushes it into the tail)
  absent+sure ... and the source gives its own next token more than 0.5: a confident target for another event
  kept mass   source probability kept by the vocabulary map
Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np


from cache_builder.reader import read_rows
from fuse_trainer.data import discover_sources

PER_RECORD = ["token_ids", "loss_mask", "aligned_pos", "src_pos", "topk_ids", "topk_logits", "logsumexp",
              "gold_logprob", "kept_mass"]  # the arguments of record_figures, by name
FIGURES = ("top1=gold", "p(gold)", "gold absent", "absent+sure", "kept mass")


def same_event(aligned_pos: np.ndarray, src_pos: np.ndarray) -> np.ndarray:
    """(A,) bool: the next tokens of pivot and source at each aligned position end at the same byte, i.e. the
    next aligned position follows on both sides (the last one counts as not: its chunk runs to the end)."""
    single = np.zeros(len(aligned_pos), dtype=bool)
    single[:-1] = (aligned_pos[1:] == aligned_pos[:-1] + 1) & (src_pos[1:] == src_pos[:-1] + 1)
    return single


def record_figures(token_ids, loss_mask, aligned_pos, src_pos, topk_ids, topk_logits, logsumexp, gold_logprob,
                   kept_mass):
    """One record of an aligned layer -> {kind: (n, sums of FIGURES)} over its aligned response positions.

    token_ids (T,), loss_mask (T-1,), aligned_pos / src_pos (A,), topk_ids / topk_logits (A, K),
    logsumexp / gold_logprob (the source's own next token) / kept_mass (A,).
    """
    gold = token_ids[aligned_pos + 1]  # (A,) the pivot's next token
    is_gold = topk_ids == gold[:, None]  # (A, K)
    p_gold = (np.exp(topk_logits.astype(np.float64) - logsumexp[:, None]) * is_gold).sum(1)  # (A,)
    absent = ~is_gold.any(axis=1)
    single = same_event(aligned_pos, src_pos)
    values = np.stack([topk_ids[:, 0] == gold, p_gold, absent, absent & (gold_logprob > np.log(0.5)), kept_mass],
                      axis=1)  # (A, 5)
    response = loss_mask[aligned_pos]
    return {kind: (int(sel.sum()), values[sel].sum(0)) for kind, sel in
            (("single", single & response), ("multi", ~single & response))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", help="cache root with <source>/aligned/<pivot>/")
    ap.add_argument("--pivot", default="smollm2")
    ap.add_argument("--split", default="train")
    a = ap.parse_args()
    result = {}
    for source, folder in discover_sources(a.cache, a.pivot).items():
        rows = read_rows(folder, ["domain", "split", *PER_RECORD])
        totals: dict[tuple[str, str], list] = defaultdict(lambda: [0, np.zeros(len(FIGURES))])
        for i in np.flatnonzero(rows["split"] == a.split):
            for kind, (n, sums) in record_figures(**{c: rows[c].row(i) for c in PER_RECORD}).items():
                total = totals[(str(rows["domain"][i]), kind)]
                total[0] += n
                total[1] += sums
        result[source] = {f"{dom}/{kind}": {"positions": n, **dict(zip(FIGURES, np.round(s / max(n, 1), 3).tolist()))}
                          for (dom, kind), (n, s) in sorted(totals.items())}
    print(json.dumps({"split": a.split, "pivot": a.pivot, "sources": result}))
    print(f"{'source':8s} {'domain/kind':16s} {'positions':>9s}" + "".join(f"{f:>12s}" for f in FIGURES))
    for source, table in result.items():
        for key, row in table.items():
            print(f"{source:8s} {key:16s} {row['positions']:9d}" + "".join(f"{row[f]:12.3f}" for f in FIGURES))


if __name__ == "__main__":
    main()
