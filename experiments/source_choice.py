"""Which source does MinCE pick for each record, and does the unit of its CE decide it? Read from an aligned cache.

    python -m experiments.source_choice out/repro/cache [--pivot smollm2] [--split train]

For every row of the split, each source's CE on the gold text is computed in two units:
  per pivot token   its aligned chunks' log-likelihood over the pivot tokens they span (what the trainer's
                    MinCE / AvgCE use: `fuse_trainer.weighting.record_chunk_ce`)
  per own token     the mean of its cached gold log-probs, one per token of its OWN tokenizer at the aligned
                    positions (what they used until 2026-11-29)
and the source with the lowest CE is counted, per domain. A tokenizer with longer tokens spends more nats per own
token on the same text, so the second unit favours the source with the shorter tokens whatever it knows.
Prints one JSON line, then a table.
"""

from __future__ import annotations

import json
from collections import Counter

import click
import numpy as np
import torch


from cache_builder.reader import read_rows
from fuse_trainer.data import discover_sources
from fuse_trainer.losses import chunk_spans
from fuse_trainer.weighting import record_chunk_ce

COLUMNS = ["record_id", "domain", "split", "num_tokens", "loss_mask", "aligned_pos", "gold_logprob", "chunk_logprob"]
UNITS = ("per pivot token", "per own token")


def record_costs(num_tokens: int, loss_mask, aligned_pos, gold_logprob, chunk_logprob) -> tuple[float, float]:
    """One row of an aligned layer -> (CE per pivot token, CE per own token) over its aligned response positions.

    loss_mask (T-1,) of the pivot's positions; aligned_pos / gold_logprob / chunk_logprob (A,).
    """
    pos = torch.tensor(np.asarray(aligned_pos), dtype=torch.int64)  # (A,)
    keep = torch.tensor(np.asarray(loss_mask), dtype=torch.bool)[pos]  # (A,)
    row = torch.zeros_like(pos)
    start, end = chunk_spans(row, pos, torch.tensor([num_tokens - 1]), num_tokens - 1)
    per_pivot = record_chunk_ce(torch.tensor(np.asarray(chunk_logprob)), end - start, row, keep, 1)
    gold = np.asarray(gold_logprob, dtype=np.float64)[keep.numpy()]
    return float(per_pivot[0]), float(-gold.mean()) if gold.size else float("inf")


@click.command(help=__doc__)
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--pivot", default="smollm2", show_default=True, help="The pivot the sources are aligned to.")
@click.option("--split", default="train", show_default=True, help="Records of this split are counted.")
def main(cache: str, pivot: str, split: str) -> None:
    costs: dict[str, dict[str, tuple[float, float]]] = {}  # source -> record_id -> costs
    domain_of: dict[str, str] = {}
    for source, folder in discover_sources(cache, pivot).items():
        rows = read_rows(folder, COLUMNS)
        costs[source] = {}
        for i in np.flatnonzero(rows["split"] == split):
            rid = str(rows["record_id"][i])
            domain_of[rid] = str(rows["domain"][i])
            costs[source][rid] = record_costs(int(rows["num_tokens"][i]), rows["loss_mask"].row(i),
                                              rows["aligned_pos"].row(i), rows["gold_logprob"].row(i),
                                              rows["chunk_logprob"].row(i))
    sources = list(costs)
    picks = {unit: Counter() for unit in UNITS}
    for rid, domain in domain_of.items():
        for u, unit in enumerate(UNITS):
            best = min(sources, key=lambda s: costs[s].get(rid, (float("inf"),) * 2)[u])  # ties: first source
            picks[unit][(domain, best)] += 1
    domains = sorted(set(domain_of.values()))
    result = {unit: {d: {s: picks[unit][(d, s)] for s in sources} for d in domains} for unit in UNITS}
    print(json.dumps({"split": split, "pivot": pivot, "records picked": result}))
    print(f"records of the {split} split that MinCE gives to each source")
    print(f"{'CE unit':16s} {'domain':10s}" + "".join(f"{s:>10s}" for s in sources))
    for unit in UNITS:
        for d in domains:
            print(f"{unit:16s} {d:10s}" + "".join(f"{result[unit][d][s]:10d}" for s in sources))


if __name__ == "__main__":
    main()
