"""Corpus ingestion: each file format, each record shape, each kind of bad record, stable ids."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cache_builder.corpus import RecordError, load_corpus, render, split_windows, window_bounds

RECORDS = [
    {"text": "Once upon a time.", "domain": "prose"},
    {"prompt": "Add 2 and 2.", "response": "4", "domain": "math", "split": "heldout"},
    {"instruction": "Say hi", "output": "hi ✓"},
    {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A!"}]},
]


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def test_each_file_format_reads_the_same_records(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl(RECORDS))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(RECORDS)))
    table = pa.table({"text": [None, "parquet text"], "prompt": ["p", None], "response": ["r", None]})
    pq.write_table(table, tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("a whole text file\nwith lines\n")
    corpus = load_corpus(tmp_path)
    assert corpus.bad == []
    # .jsonl and .jsonl.zst hold identical records: the second copy is de-duplicated, not lost silently
    assert corpus.duplicates == len(RECORDS)
    assert len(corpus.records) == len(RECORDS) + 2 + 1
    texts = [r.text for r in corpus.records]
    assert "parquet text" in texts and "a whole text file\nwith lines\n" in texts


def test_render_shapes_and_response_spans():
    text, spans = render({"prompt": "Add 2 and 2.", "response": "four"})
    assert text == "### User:\nAdd 2 and 2.\n\n### Assistant:\nfour"
    assert [text[s:e] for s, e in spans] == ["four"]
    text, spans = render({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]})
    assert [text[s:e] for s, e in spans] == ["A1", "A2"]
    text, spans = render({"text": "plain"})
    assert spans == [(0, 5)]
    text, spans = render({"context": "def f():\n", "text": "    return 1\n"})
    assert text == "def f():\n    return 1\n" and [text[s:e] for s, e in spans] == ["    return 1\n"]


def test_response_spans_are_utf8_byte_offsets(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl([{"prompt": "日本語?", "response": "はい ✓"}]))
    (record,) = load_corpus(tmp_path).records
    data = record.text.encode()
    assert [data[s:e].decode() for s, e in record.response_spans] == ["はい ✓"]


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"{not json", "invalid JSON"),
        (b'"a string"', "wrong type"),
        (b'{"text": 5}', "wrong type"),
        (b'{"prompt": "only a prompt"}', "missing field"),
        (b'{"text": "   "}', "empty"),
        (b'{"text": "nul \\u0000 inside"}', "NUL byte"),
        (b'{"text": "bad \xff\xfe utf8"}', "invalid UTF-8"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "unknown role"),
        (b'{"text": "ok", "domain": 3}', "wrong type"),
        (b'{"context": "A", "text": "\\u030a ring"}', "not NFC"),  # a combining mark composes across fields
    ],
)
def test_bad_records_are_skipped_with_file_and_line(tmp_path, line, reason):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "good one"}\n' + line + b'\n{"text": "good two"}\n')
    corpus = load_corpus(path)
    assert [r.text for r in corpus.records] == ["good one", "good two"]
    assert len(corpus.bad) == 1
    assert corpus.bad[0].origin == f"{path}:2"
    assert corpus.bad[0].reason.startswith(reason)
    assert corpus.summary()["bad_records"] == 1


def test_text_is_nfc_normalised_so_normalising_tokenizers_spell_its_bytes(tmp_path):
    decomposed, composed = "A\u030angstr\u00f6m", "\u00c5ngstr\u00f6m"  # A + combining ring, and Å
    for raw in ({"text": decomposed}, {"context": "x ", "text": decomposed},
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": decomposed}]}):
        text, spans = render(raw)
        assert text.endswith(composed) and text[spans[-1][0]:spans[-1][1]] == composed
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": decomposed}) + "\n" + json.dumps({"text": composed}) + "\n")
    corpus = load_corpus(path)
    assert [r.text for r in corpus.records] == [composed]  # one canonical record, the duplicate dropped


def test_corrupt_zstd_is_reported_not_raised(tmp_path):
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl(RECORDS))[:-7])
    corpus = load_corpus(path)
    assert corpus.bad and "zstd" in corpus.bad[-1].reason


def test_windows_cover_the_text_and_clip_spans():
    text = "line one\n" * 50
    bounds = window_bounds(text, 100)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(e - s <= 100 for s, e in bounds)
    windows = list(split_windows(text, [(95, 120)], 100))
    assert windows[0][2] and windows[1][2]  # the span is clipped into both windows


def test_record_ids_are_content_hashes_stable_across_runs(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl(RECORDS))
    first = load_corpus(tmp_path)
    second = load_corpus(tmp_path)
    assert [r.record_id for r in first.records] == [r.record_id for r in second.records]
    assert first.fingerprint == second.fingerprint
    # a fixed value: the id of a record must not depend on the machine, the run or the Python hash seed
    assert first.records[0].record_id == "d5b47e113d12a0b03abb0562808b243710b84d997969faaf1d26dccba1ce07f1"


def test_limit_and_missing_corpus(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl(RECORDS))
    assert len(load_corpus(tmp_path, limit=2).records) == 2
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no corpus files"):
        load_corpus(tmp_path / "empty")


def test_render_rejects_non_objects():
    with pytest.raises(RecordError):
        render([1, 2])
