"""How much of each evaluation split is already in the train split, per domain: the share of non-trivial lines
(at least --min-chars characters once stripped) that occur verbatim in a train record of the same domain.

    python -m experiments.split_overlap out/repro/corpus.jsonl [--min-chars 20]

A split that shares many lines with train rewards memorising the train records (SFT) over what a source model
knows beyond them; docs/experiments.md uses this to read the validation search. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


from cache_builder.corpus import render


def record_text(record: dict) -> str:
    """The canonical text that cache-build scores (prompt and response records get their role headers)."""
    return render(record)[0]


def significant_lines(text: str, min_chars: int) -> list[str]:
    return [line.strip() for line in text.splitlines() if len(line.strip()) >= min_chars]


def overlap(records: list[dict], min_chars: int) -> dict[str, dict[str, dict[str, int]]]:
    """domain -> split -> {"lines": n, "in_train": m} for every split but train."""
    train_lines: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r["split"] == "train":
            train_lines[r["domain"]].update(significant_lines(record_text(r), min_chars))
    counts: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"lines": 0, "in_train": 0}))
    for r in records:
        if r["split"] == "train":
            continue
        for line in significant_lines(record_text(r), min_chars):
            c = counts[r["domain"]][r["split"]]
            c["lines"] += 1
            c["in_train"] += line in train_lines[r["domain"]]
    return {d: dict(s) for d, s in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", help="corpus JSONL with domain and split per record")
    ap.add_argument("--min-chars", type=int, default=20)
    a = ap.parse_args()
    with open(a.corpus, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    result = overlap(records, a.min_chars)
    print(f"{'domain':10s} {'split':11s} {'lines':>6s} {'in train':>9s} {'share':>6s}")
    for domain in sorted(result):
        for split, c in sorted(result[domain].items()):
            print(f"{domain:10s} {split:11s} {c['lines']:6d} {c['in_train']:9d} {c['in_train'] / max(c['lines'], 1):6.2f}")
    print(json.dumps({"benchmark": "split_overlap", "corpus": a.corpus, "min_chars": a.min_chars, "overlap": result}))


if __name__ == "__main__":
    main()
