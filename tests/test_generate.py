"""corpus-generate: source-written continuations as corpus records, resumable and reproducible, and
fuse-train --train-splits that trains on them next to the gold records."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from cache_builder.corpus import Record, load_corpus
from cache_builder.generate import GenerateError, GenerateSettings, cut_prompt, generate_corpus, make_prompts
from cache_builder.manifest import CacheError
from fuse_trainer.config import TrainConfig
from fuse_trainer.data import FusionData, discover_sources


def _record(text: str, domain: str = "code", split: str = "train", rid: str = "r") -> Record:
    return Record(rid, rid, 0, domain, split, text, ((0, len(text.encode())),), "test:1")


def test_cut_prompt_ends_after_a_line_in_the_second_half():
    text = "aaaa\nbbbb\ncccc\ndddd\n"
    assert cut_prompt(text, 12) == "aaaa\nbbbb\n"  # the newline at index 9 lies in [6, 12)
    assert cut_prompt(text, 100) == text
    assert cut_prompt("x" * 30, 10) == "x" * 10  # no line end: a hard cut


def test_make_prompts_selects_split_and_domain_and_repeats_samples():
    records = [
        _record("def f():\n    return 1\n" * 3, rid="a"),
        _record("def g():\n    return 2\n" * 3, split="heldout", rid="b"),
        _record("Once upon a time,\nthere was a king.\n" * 3, domain="prose", rid="c"),
        _record("x = 1\n", rid="d"),  # shorter than the prompt: nothing to continue from
        _record("y" * 30, rid="e"),  # exactly as long as the prompt: the prompt would be the whole record
    ]
    settings = GenerateSettings(model="m", domains=("code",), samples=3, prompt_chars=30)
    prompts = make_prompts(records, settings)
    assert [(p.record_id, p.sample) for p in prompts] == [("a", 0), ("a", 1), ("a", 2)]
    assert all(p.text == "def f():\n    return 1\n" and p.domain == "code" for p in prompts)
    every_domain = make_prompts(records, replace(settings, domains=(), samples=1))
    assert [p.record_id for p in every_domain] == ["a", "c"]


@pytest.fixture(scope="module")
def generated(world, tmp_path_factory):
    """A finished generation job with the tiny qwen2-style source over the shared test corpus."""
    out = tmp_path_factory.mktemp("generate") / "gen.jsonl"
    settings = GenerateSettings(model=str(world["models"]["srcq"]), samples=2, prompt_chars=12,
                                max_new_tokens=6, batch_size=3, dtype="fp32")
    records = load_corpus(world["corpus"]).records
    summary = generate_corpus(records, settings, out, torch.device("cpu"))
    return {"out": out, "settings": settings, "records": records, "summary": summary}


def test_generated_records_are_a_corpus_of_continued_train_prompts(generated):
    by_id = {r.record_id: r for r in generated["records"]}
    rows = [json.loads(line) for line in generated["out"].read_text().splitlines()]
    prompts = make_prompts(generated["records"], generated["settings"])
    assert len(rows) == len(prompts) == generated["summary"]["records"] > 0
    for row, prompt in zip(rows, prompts):
        source = by_id[row["generator"]["prompt_record"]]
        assert source.split == "train" and row["split"] == "generated" and row["domain"] == source.domain
        assert row["context"] == prompt.text and row["text"]
        assert "eos_token_id" in row["generator"]["model_generation_config"]  # the model's own stop tokens
    samples = {}
    for row in rows:  # two samples of one prompt are two draws, not one text twice
        samples.setdefault(row["generator"]["prompt_record"], set()).add(row["text"])
    assert sum(len(texts) for texts in samples.values()) > len(samples)
    reread = load_corpus(generated["out"])
    assert not reread.bad and {r.split for r in reread.records} == {"generated"}
    for record, row in zip(reread.records, rows):  # the prompt conditions, only the continuation is trained on
        assert record.text == row["context"] + row["text"]
        assert record.response_spans == ((len(row["context"].encode()), len(record.text.encode())),)


def test_interrupted_job_resumes_to_the_same_records_and_other_settings_are_refused(generated, tmp_path):
    out = tmp_path / "gen.jsonl"
    lines = generated["out"].read_text().splitlines(keepends=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text("".join(lines[:4]) + lines[4][:10])  # one whole batch of 3, one half, a torn line
    summary = generate_corpus(generated["records"], generated["settings"], out, torch.device("cpu"))
    assert summary["generated"] == len(lines) - 3
    assert out.read_text() == generated["out"].read_text() and not partial.exists()
    assert generate_corpus(generated["records"], generated["settings"], out, torch.device("cpu"))["already_done"]
    with pytest.raises(GenerateError, match="other settings"):  # a finished file is not "done" for other settings
        generate_corpus(generated["records"], replace(generated["settings"], samples=1), out, torch.device("cpu"))

    partial.write_text("".join(lines[:3]))
    out.unlink()
    with pytest.raises(GenerateError, match="other prompts"):
        generate_corpus(generated["records"][1:], generated["settings"], out, torch.device("cpu"))
    with pytest.raises(GenerateError, match="other settings"):
        generate_corpus(generated["records"], replace(generated["settings"], temperature=0.5), out,
                        torch.device("cpu"))


def test_job_killed_after_its_last_batch_or_inside_a_character_resumes(generated, tmp_path):
    out, settings = tmp_path / "gen.jsonl", generated["settings"]
    lines = generated["out"].read_bytes().splitlines(keepends=True)
    assert len(lines) % settings.batch_size  # the last batch is short: the case a resume must not redo
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(b"".join(lines))  # every record written, killed before the rename
    assert generate_corpus(generated["records"], settings, out, torch.device("cpu"))["generated"] == 0
    assert out.read_bytes() == generated["out"].read_bytes()

    out.unlink()
    partial.write_bytes(b"".join(lines[:3]) + '{"context": "日本'.encode()[:-1])  # torn inside a character
    assert generate_corpus(generated["records"], settings, out, torch.device("cpu"))["generated"] == len(lines) - 3
    assert out.read_bytes() == generated["out"].read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--out-split", "train"], "--out-split must differ"),
    (["--out-split", "heldout"], "--out-split must differ"),
    (["--split", "validation"], "would leak it into training"),
])
def test_cli_keeps_generated_text_apart_from_gold_and_evaluation_splits(world, tmp_path, flags, message):
    result = subprocess.run(
        [sys.executable, "-c", "from cache_builder.cli import generate; generate()", "--model", "x", "--corpus",
         str(world["corpus"]), "--out", str(tmp_path / "g.jsonl"), *flags],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and message in result.stderr


def test_train_splits_select_the_union_of_their_records(world):
    layers = discover_sources(world["cache"], "pivot")
    train, heldout = FusionData(layers, ("train",)), FusionData(layers, ("heldout",))
    both = FusionData(layers, ("train", "heldout"))
    assert len(train) > 0 and len(heldout) > 0 and len(both) == len(train) + len(heldout)
    with pytest.raises(CacheError, match="no records of split 'generated'"):
        FusionData(layers, ("generated",))
    with pytest.raises(CacheError, match="no records of split 'generatd'"):  # a typo is not silently dropped
        FusionData(layers, ("train", "generatd"))


@pytest.mark.parametrize("splits, message", [
    (["train", "heldout"], "must not name validation or heldout"),
    ("train,generated", "list of one or more split names"),  # a YAML string, not a list
    ([], "list of one or more split names"),
])
def test_config_refuses_evaluation_and_malformed_train_splits(splits, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(train_splits=splits).validate()


def test_distill_only_records_get_the_fusion_term_alone_at_full_weight(world):
    """A record of a distill-only split (text the pivot wrote) has no SFT term and its fusion term weighs 1,
    while a gold record keeps (1-λ)·SFT + λ·fusion: the batch objective equals the sum over one-record batches."""
    from transformers import AutoModelForCausalLM

    from fuse_trainer.data import collate
    from fuse_trainer.train import micro_batch_terms

    data = FusionData(discover_sources(world["cache"], "pivot"), ("train", "heldout"),
                      distill_only=("heldout",))  # heldout stands in for corpus-generate's split here
    shard, rows = max(data.plan(0, 4096, seed=0), key=lambda plan: len(plan[1]))
    dataset = data.shard(shard)
    batch = collate(dataset, rows)
    assert 0 < int(batch.gold_text.sum()) < len(rows)  # both kinds of record in the batch
    model = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"]).eval()
    cfg = TrainConfig(mode="unified", loss="topk-kl", lam=0.3, weighting="mince").validate()
    with torch.no_grad():
        terms = micro_batch_terms(model, batch, cfg)
        alone = [micro_batch_terms(model, collate(dataset, rows[[i]]), cfg) for i in range(len(rows))]
    gold = batch.gold_text.tolist()
    expected = sum((1 - cfg.lam) * t["sft_sum"] + cfg.lam * t["fusion_sum"] if g else t["fusion_sum"]
                   for t, g in zip(alone, gold))
    assert torch.allclose(terms["objective_sum"], expected, rtol=1e-5)
    assert torch.allclose(terms["sft_sum"], sum(t["sft_sum"] for t, g in zip(alone, gold) if g), rtol=1e-5)
    assert terms["n_tokens"] == sum(t["n_tokens"] for t in alone)  # every response position counts


@pytest.mark.parametrize("settings, message", [
    (dict(train_splits=["train"], distill_only_splits=["onpolicy"]), "splits that train_splits also names"),
    (dict(mode="sft", train_splits=["train", "onpolicy"], distill_only_splits=["onpolicy"]),
     "mode sft learns the gold text only"),
])
def test_config_refuses_distill_only_splits_it_cannot_train(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings).validate()
