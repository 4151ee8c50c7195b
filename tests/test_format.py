"""Cache format v1: bit-exact round trip, readable without our code, verify catches every corruption."""

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from cache_builder.format import MANIFEST
from cache_builder.manifest import CacheError, load_manifest
from cache_builder.reader import iter_batches, read_rows
from cache_builder.verify import verify_cache
from tests.fake_cache import fake_rows, resign, write_fake_cache


@pytest.fixture
def cache(tmp_path):
    folder = tmp_path / "fake"
    write_fake_cache(folder)
    return folder


@pytest.mark.parametrize("logit_dtype", ["float32", "float16"])
def test_round_trip_is_bit_exact(tmp_path, logit_dtype):
    write_fake_cache(tmp_path, n_rows=9, logit_dtype=logit_dtype)
    rows = fake_rows(9)
    data = read_rows(tmp_path)
    assert list(data["record_id"]) == [r.record.record_id for r in rows]
    for i, row in enumerate(rows):
        assert np.array_equal(data["token_ids"].row(i), row.token_ids)
        assert np.array_equal(data["token_end"].row(i), row.token_end)
        assert np.array_equal(data["topk_ids"].row(i), row.scored.topk_ids)
        expected = row.scored.topk_logits.astype(logit_dtype)
        assert data["topk_logits"].row(i).tobytes() == expected.tobytes()
        assert data["gold_logprob"].row(i).tobytes() == row.scored.gold_logprob.tobytes()
        assert [tuple(s) for s in data["response_spans"].row(i)] == list(row.record.response_spans)


def test_streaming_batches_equal_the_whole(cache):
    whole = read_rows(cache)
    streamed = np.concatenate([b["logsumexp"].values for b in iter_batches(cache, ["logsumexp"], batch_rows=3)])
    assert np.array_equal(streamed, whole["logsumexp"].values)


def test_readable_with_plain_pyarrow_and_polars(cache):
    manifest = json.loads((cache / MANIFEST).read_text())
    paths = [str(cache / s["path"]) for s in manifest["shards"]]
    table = pq.read_table(paths[0])
    assert table.num_rows == manifest["shards"][0]["rows"]
    frame = pl.scan_parquet(paths).select("record_id", "num_tokens", "topk_logits").collect()
    assert frame.height == manifest["totals"]["rows"]
    assert frame["num_tokens"].sum() == manifest["totals"]["tokens"]


def test_good_cache_verifies(cache):
    assert verify_cache(cache) == []


def test_truncated_shard_is_caught(cache):
    shard = sorted((cache / "shards").glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    problems = verify_cache(cache)
    assert len(problems) == 1 and shard.name in problems[0] and "truncated" in problems[0]


def test_bit_flip_is_caught(cache):
    shard = sorted((cache / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify_cache(cache)
    assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]


def test_missing_manifest_is_not_a_cache(cache):
    (cache / MANIFEST).unlink()
    problems = verify_cache(cache)
    assert problems and "no manifest.json" in problems[0]


def _edit_manifest(cache, edit):
    manifest = json.loads((cache / MANIFEST).read_text())
    edit(manifest)
    (cache / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["shards"][0].update(path="../evil.parquet"), "outside"),
        (lambda m: m["shards"][0].update(path="/etc/passwd"), "absolute"),
        (lambda m: m.update(format_version=99), "newer"),
        (lambda m: m.update(format="pickle"), "format"),
    ],
)
def test_unsafe_manifests_are_refused(cache, edit, message):
    _edit_manifest(cache, edit)
    with pytest.raises(CacheError, match=message):
        load_manifest(cache)
    assert any(message in p for p in verify_cache(cache))


def test_symlinked_shard_is_refused(cache, tmp_path):
    shard = sorted((cache / "shards").glob("*.parquet"))[0]
    outside = tmp_path / "elsewhere.parquet"
    shard.rename(outside)
    shard.symlink_to(outside)
    assert any("symlink" in p for p in verify_cache(cache))


def _rewrite_first_shard(cache, mutate):
    """Rewrite shard 0 with mutated rows and a manifest that matches it (a 'well-signed' bad cache)."""
    from cache_builder.format import shard_info, source_table, write_shard

    rows = fake_rows(10)[:4]
    mutate(rows)
    manifest = json.loads((cache / MANIFEST).read_text())
    info = write_shard(source_table(rows, 4, "float32"), cache, manifest["shards"][0]["path"])
    resign(cache, manifest)
    assert shard_info(cache, info.path) == info


def test_nan_values_are_refused(cache):
    _rewrite_first_shard(cache, lambda rows: rows[1].scored.logsumexp.__setitem__(0, np.nan))
    assert any("NaN" in p and "logsumexp" in p for p in verify_cache(cache))


def test_ids_outside_the_vocabulary_are_refused(cache):
    _rewrite_first_shard(cache, lambda rows: rows[0].scored.topk_ids.__setitem__((0, 0), 10_000))
    assert any("outside the vocabulary" in p for p in verify_cache(cache))


def test_duplicate_record_ids_are_refused(cache):
    def duplicate(rows):
        rows[1] = rows[0]
    _rewrite_first_shard(cache, duplicate)
    assert any("duplicate record ids" in p for p in verify_cache(cache))


def test_sources_with_different_records_are_refused(tmp_path):
    write_fake_cache(tmp_path / "a", n_rows=10)
    write_fake_cache(tmp_path / "b", n_rows=10, seed=1)
    assert any("record ids differ" in p for p in verify_cache(tmp_path))
    _edit_manifest(tmp_path / "b", lambda m: m["corpus"].update(fingerprint="d" * 64))
    assert any("corpus fingerprint differs" in p for p in verify_cache(tmp_path))


def test_untrusted_text_is_escaped_and_cut():
    from cache_builder.untrusted import shown

    assert shown("ok \x1b[32mOK\x1b[0m\r\n\x00") == "ok \\x1b[32mOK\\x1b[0m\\r\\n\\x00"
    assert shown("é日本") == "é日本"  # printable text stays as it is
    assert shown("a" * 300, limit=10) == "aaaaaaaaaa...(300 characters)"


def test_json_is_read_strictly(tmp_path):
    from cache_builder.untrusted import load_json

    path = tmp_path / "x.json"
    for text, reason in [('{"a": 1, "a": 2}', "appears twice"), ('{"a": Infinity}', "Infinity is not JSON"),
                         ("[" * 40 + "]" * 40, "nested too deeply"), ('{"a": "' + "x" * 200 + '"}', "more than the 100")]:
        path.write_text(text)
        with pytest.raises(CacheError, match=reason):
            load_json(path, max_bytes=100)
    path.write_text('{"a": [1, 2.5, null, "b"]}')
    assert load_json(path, max_bytes=100) == {"a": [1, 2.5, None, "b"]}


def test_the_footer_is_checked_before_decoding(cache, monkeypatch):
    import cache_builder.reader as reader

    shard = sorted((cache / "shards").glob("*.parquet"))[0]
    with reader.open_shard(shard) as parquet:
        assert parquet.metadata.num_rows == 4
    monkeypatch.setattr(reader, "MAX_ROW_GROUP_BYTES", 1000)
    with pytest.raises(CacheError, match="a decompression bomb"):
        reader.read_shard(cache, shard.relative_to(cache).as_posix())
    assert any("a decompression bomb" in p for p in verify_cache(cache))


def test_totals_must_add_up_and_shards_appear_once(cache):
    _edit_manifest(cache, lambda m: m["totals"].update(rows=m["totals"]["rows"] + 1))
    with pytest.raises(CacheError, match="totals.rows: 11 but the shards add up to 10"):
        load_manifest(cache)
    def duplicate(m):
        m["shards"].append(dict(m["shards"][0]))
        m["totals"] = {key: sum(s[key] for s in m["shards"]) for key in ("rows", "tokens", "bytes")}
    _edit_manifest(cache, duplicate)
    with pytest.raises(CacheError, match="listed more than once"):
        load_manifest(cache)
