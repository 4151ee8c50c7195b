"""scripts/make_corpus.py's selection rules: hash-fixed splits, whole modules per split, and a train-only scale
that leaves the evaluated splits exactly as they were (the reproductions compare numbers across corpora)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_corpus.py"
_spec = importlib.util.spec_from_file_location("make_corpus", SCRIPT)
make_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_corpus)


def _candidates(n_modules: int = 60, per_module: int = 12) -> list[dict]:
    """Synthetic code candidates, each 400-799 characters, grouped by module like --code-split module."""
    out = []
    for m in range(n_modules):
        for f in range(per_module):
            body = f"def f_{m}_{f}():\n" + "    x = 1\n" * (40 + (m * 7 + f * 3) % 40)
            out.append({"text": body, "source": f"mod{m}:{f}", "split_key": f"Lib/mod{m}.py"})
    return out


def _by_split(records: list[dict]) -> dict[str, list[dict]]:
    return {s: [r for r in records if r["split"] == s] for s in make_corpus.SPLITS}


def test_train_scale_grows_train_only_and_keeps_every_earlier_train_record():
    pool = _candidates()
    base = _by_split(make_corpus.select("code", pool, scale=1.0))
    more = _by_split(make_corpus.select("code", pool, scale=1.0, train_scale=3.0))
    assert more["validation"] == base["validation"] and more["heldout"] == base["heldout"]
    base_train = {r["source"] for r in base["train"]}
    more_train = {r["source"] for r in more["train"]}
    assert base_train < more_train
    chars = sum(len(r["text"]) for r in more["train"])
    assert 2 * make_corpus.BUDGET["train"] < chars <= 3 * make_corpus.BUDGET["train"]


def test_module_split_keeps_each_module_in_one_split():
    records = make_corpus.select("code", _candidates(), scale=1.0, train_scale=3.0)
    split_of_module: dict[str, set[str]] = {}
    for r in records:
        split_of_module.setdefault(r["split_key"], set()).add(r["split"])
    assert split_of_module and all(len(s) == 1 for s in split_of_module.values())
    assert {s for splits in split_of_module.values() for s in splits} == set(make_corpus.SPLITS)
