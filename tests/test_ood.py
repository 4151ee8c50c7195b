"""The out-of-distribution set (data-ood/, `scripts/make_corpus.py --ood`) and fuse-eval's table per split."""

import importlib.util
import json
from pathlib import Path

from click.testing import CliRunner

from cache_builder.corpus import load_corpus
from fuse_trainer.cli import evaluate

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "scripts" / "make_corpus.py")
make_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_corpus)


def test_the_shipped_ood_set_shares_no_source_and_no_text_with_the_corpus():
    ood = load_corpus(ROOT / "data-ood").records
    corpus = load_corpus(ROOT / "data").records
    assert {r.split for r in ood} == {"ood"} and {r.domain for r in ood} == {"prose", "code", "math"}
    assert "ood" not in {r.split for r in corpus}  # data/ (what the demo caches) does not pick the file up
    raw = [json.loads(line) for line in (ROOT / "data-ood" / "ood.jsonl").read_text().splitlines()]
    corpus_raw = [json.loads(line) for line in (ROOT / "data" / "corpus.jsonl").read_text().splitlines()]
    packages = {r["source"].split()[0] for r in raw}
    assert packages == {"brotli", "click", "mathgenerator"}
    assert not packages & {r["source"].split()[0] for r in corpus_raw}
    corpus_lines = {line.strip() for r in corpus for line in r.text.splitlines() if len(line.strip()) > 40}
    assert not [line for r in ood for line in r.text.splitlines() if line.strip() in corpus_lines]


def test_ood_selection_fills_the_budget_in_hash_order_and_keeps_source_order():
    pool = [{"text": f"passage {i}\n" + "x" * (400 + 37 * i), "source": f"s{i}"} for i in range(30)]
    records = make_corpus.select_ood("prose", pool)
    chars = sum(len(r["text"]) for r in records)
    assert make_corpus.OOD_BUDGET - make_corpus.MIN_CHARS < chars <= make_corpus.OOD_BUDGET
    assert all(r["split"] == "ood" and r["domain"] == "prose" for r in records)
    order = [int(r["source"][1:]) for r in records]
    assert order == sorted(order) and order != list(range(len(order)))  # hash-chosen, written in source order


def test_fuse_eval_prints_one_table_per_split(world, tmp_path):
    ood = tmp_path / "ood.jsonl"
    ood.write_text(json.dumps({"text": "Alice was beginning to get very tired of sitting by her sister.",
                               "domain": "prose", "split": "ood"}) + "\n")
    pivot = str(world["models"]["pivot"])
    args = ["--model", f"pivot={pivot}", "--data", str(world["corpus"]), "--data", str(ood), "--device", "cpu"]
    result = CliRunner().invoke(evaluate, args + ["--split", "heldout,ood", "--json-out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "on the heldout split" in result.output and "on the ood split" in result.output
    rows = json.loads((tmp_path / "r.json").read_text())
    assert {(r["split"], r["domain"]) for r in rows} == {("heldout", "code"), ("heldout", "prose"), ("heldout", "all"),
                                                         ("ood", "prose"), ("ood", "all")}
    missing = CliRunner().invoke(evaluate, args + ["--split", "heldout,validation"])
    assert missing.exit_code == 2 and "no records of split 'validation'" in missing.output
