"""cache-export / cache-import: DistillKit, axolotl and FuseLLM columns, both ways, on the tiny `world` caches.

Peer fixtures are built here from the peers' documented schemas (DistillKit: input_ids + token_ids/top_values
or its compressed columns and compression_config.yaml; axolotl: input_ids, labels, target_* with one target
per token; FuseLLM: a save_to_disk dataset with per_step_logits padded past the tokens), with the tiny source
model's own forward pass as the teacher, so every position convention is checked against the model itself.
"""

import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment import token_byte_ends, token_surface
from cache_builder.align import align_cache
from cache_builder.cli import export, import_cache
from cache_builder.info import cache_summary
from cache_builder.interop import InteropError, export_layer, import_folder
from cache_builder.interop import writer
from cache_builder.interop.bitpack import index_bits, pack_bits, unpack_bits
from cache_builder.interop.logprob_codec import (
    CodecError,
    CompressionConfig,
    ResidualBin,
    decode_logprobs,
    encode_logprobs,
    round_to,
)
from cache_builder.interop.source_layer import Tokenizer, rebuild_text, response_spans
from cache_builder.manifest import CacheError, load_manifest
from cache_builder.reader import read_rows
from cache_builder.verify import verify_cache
from fuse_trainer.data import check_statistics, discover_sources
from fuse_trainer.losses import soft_ce_loss, topk_kl_loss
from fuse_trainer.train import fuse_train
from tests.runs import train_config

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.", "x = [n ** 2 for n in range(9)]"]


def model_and_tokenizer(world, name):
    folder = world["models"][name]
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def log_softmax_of(model, ids) -> torch.Tensor:
    """(T, V) the model's next-token log-probs at every position of one sequence."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([list(ids)])).logits[0].float(), dim=-1)


def renormalized_kl(logprobs_student: torch.Tensor, ids: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """(P,) forward KL of the targets renormalised over their k candidates against the student's log-probs."""
    target = torch.log_softmax(target_logprobs.float(), dim=-1)  # (P, K)
    return (target.exp() * (target - logprobs_student.gather(-1, ids))).sum(-1)


# ----------------------------------------------------------------------------------------------
# DistillKit's bit packing and compressed log-probs
# ----------------------------------------------------------------------------------------------


def reference_pack(values, bits) -> bytes:
    stream = "".join(format(int(v), f"0{bits}b") for v in values)
    stream += "0" * (-len(stream) % 8)
    return bytes(int(stream[i : i + 8], 2) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("bits", [1, 3, 8, 13, 16, 17, 24, 33, 64])
def test_bit_packing_is_msb_first_and_inverts(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2 ** min(bits, 63), size=(4, 11), dtype=np.uint64) << np.uint64(max(bits - 63, 0))
    packed = pack_bits(values, bits)
    assert [bytes(row) for row in packed] == [reference_pack(row, bits) for row in values]
    assert np.array_equal(unpack_bits(packed, bits, 11), values.astype(np.int64))
    assert index_bits(49152) == 16 and index_bits(65536) == 16 and index_bits(65537) == 17
    with pytest.raises(ValueError):
        unpack_bits(packed[:, :1], bits, 11)


def sorted_logprobs(n, k, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = -np.sort(-rng.gamma(2.0, 2.0, size=(n, k)), axis=1)
    return (x - np.log(np.exp(x).sum(1, keepdims=True) * 1.5)).astype(np.float32)


def test_compressed_logprobs_decode_within_the_precision_the_config_promises():
    x = sorted_logprobs(500, 24)
    exact = CompressionConfig(d=300, k=24, exact_k=24, residual_bins=(), exact_dtype="bfloat16", delta_encoding=False)
    decoded = decode_logprobs(encode_logprobs(x, exact), exact)
    assert np.all(np.abs(decoded - x) <= np.abs(x) * 2.0**-8)  # bfloat16: half a unit in the last place
    assert np.array_equal(decoded, round_to(x, "bfloat16").astype(np.float32))

    binned = CompressionConfig(d=300, k=24, exact_k=4, residual_bins=(ResidualBin("float32", 8, 20),),
                               exact_dtype="float32", polynomial_terms=(0, 1, 2, "sqrt"), delta_encoding=False)
    decoded = decode_logprobs(encode_logprobs(x, binned), binned)
    ranks = np.arange(20.0)
    design = np.stack([np.ones(20), ranks, ranks**2, np.sqrt(ranks)], axis=1)
    fit = np.linalg.lstsq(design, x[:, 4:].T.astype(np.float64), rcond=None)[0].T @ design.T  # reference least squares
    step = np.abs(x[:, 4:] - fit).max(axis=1, keepdims=True) / 2**7  # one quantisation step of 8 bits
    assert np.array_equal(decoded[:, :4], x[:, :4])
    assert np.all(np.abs(decoded[:, 4:] - x[:, 4:]) <= step * 1.01 + 1e-5)

    delta = CompressionConfig(d=300, k=24, exact_k=24, residual_bins=(), exact_dtype="float16", delta_encoding=True)
    decoded = decode_logprobs(encode_logprobs(x, delta), delta)
    deltas = np.abs(np.concatenate([x[:, :1], np.diff(x, axis=1)], axis=1))
    assert np.all(np.abs(decoded - x) <= np.cumsum(deltas * 2.0**-11 + 1e-7, axis=1))  # errors add up along the rank
    with pytest.raises(CodecError, match=f"{binned.logprob_bytes} bytes"):
        decode_logprobs(np.zeros((2, 5), np.uint8), binned)


def test_unknown_compression_settings_are_refused():
    base = {"d": 100, "k": 8, "exact_k": 8, "residual_bins": []}
    assert CompressionConfig.from_dict(base).logprob_bytes == 32
    for bad, message in [({"quantum": 1}, "unknown compression setting 'quantum'"),
                         ({"exact_dtype": "float8"}, "unknown dtype 'float8'"),
                         ({"exact_k": 4}, "needs polynomial_terms or residual_bins"),
                         ({"exact_k": 4, "polynomial_terms": [0, "cube"]}, "unknown polynomial term 'cube'")]:
        with pytest.raises(CodecError, match=message):
            CompressionConfig.from_dict({**base, **bad})


# ----------------------------------------------------------------------------------------------
# Round trips: our layer -> peer format -> our layer
# ----------------------------------------------------------------------------------------------


def flat_rows(folder):
    rows = read_rows(folder)
    return rows, rows["topk_ids"].values, rows["topk_logits"].values.astype(np.float32), rows["logsumexp"].values


@pytest.mark.parametrize("fmt,compress", [("distillkit", False), ("distillkit", True), ("axolotl", False), ("fusellm", False)])
@pytest.mark.parametrize("source", ["srcq", "srcg"])
def test_export_then_import_gives_the_same_targets_and_loss(world, tmp_path, fmt, compress, source):
    layer = world["cache"] / source
    export_layer(layer, fmt, tmp_path / "peer", compress=compress)
    folder, bad = import_folder(tmp_path / "peer", fmt, str(world["models"][source]), tmp_path / "cache")
    assert bad == [] and verify_cache(folder) == []
    original, ids, logits, lse = flat_rows(layer)
    imported, ids_back, values_back, _ = flat_rows(folder)
    assert list(imported["text"]) == list(original["text"])  # rebuilt from the ids alone
    assert list(imported["record_id"]) == list(original["record_id"])
    assert np.array_equal(ids_back, ids)
    manifest = load_manifest(folder)
    raw = logits - lse[:, None]
    rng = np.random.default_rng(0)
    student = torch.from_numpy(rng.normal(size=(len(ids), manifest["source"]["vocab_size"])).astype(np.float32) * 3)
    as_torch = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    if fmt == "distillkit":
        assert manifest["topk_values"] == "logprobs"
        tolerance = np.abs(raw) * 2.0**-8 if compress else 1e-6  # bfloat16 head / float32 values
        assert np.all(np.abs(values_back - raw) <= tolerance)
        expected = topk_kl_loss(student, torch.tensor(ids).long(), as_torch(logits), as_torch(lse))
        got = topk_kl_loss(student, torch.tensor(ids_back).long(), as_torch(values_back), torch.zeros(len(ids)))
        assert torch.allclose(got, expected, atol=2e-2 if compress else 1e-5)
        known = ~np.isnan(imported["gold_logprob"].values)  # the gold log-prob where gold is among the top-k
        assert known.any() and not known.all()
        np.testing.assert_allclose(imported["gold_logprob"].values[known], original["gold_logprob"].values[known],
                                   rtol=2.0**-8 if compress else 0, atol=2e-3)  # the cache's float16 logits
    else:
        renorm = lambda v: v - np.logaddexp.reduce(v, axis=1, keepdims=True)  # noqa: E731
        assert np.allclose(renorm(values_back), renorm(raw), atol=1e-3)
        if fmt == "fusellm":  # float16 logits, as stored by both
            assert np.array_equal(values_back, logits)
            assert np.allclose(imported["mean_nll"], original["mean_nll"])
        expected = soft_ce_loss(student, torch.tensor(ids).long(), as_torch(logits))
        got = soft_ce_loss(student, torch.tensor(ids_back).long(), as_torch(values_back))
        assert torch.allclose(got, expected, atol=1e-4)
    assert np.isnan(imported["logsumexp"].values).all()  # never invented
    assert {"logsumexp", "logit_mean", "logit_std", "z_logsumexp", "gold_logprob"} <= set(manifest["missing_statistics"])


@pytest.mark.parametrize("fmt", ["distillkit", "axolotl", "fusellm"])
def test_exported_targets_are_the_next_token_distribution_the_student_sees_at_t(world, tmp_path, fmt):
    """A model as its own student: top-k forward KL of its exported targets = -log(kept top-k mass) at every
    position, and far larger with the targets shifted by one."""
    model, _ = model_and_tokenizer(world, "srcq")
    export_layer(world["cache"] / "srcq", fmt, tmp_path / fmt)
    if fmt == "fusellm":
        from datasets import load_from_disk

        table = load_from_disk(str(tmp_path / fmt)).data.table
        ids_col, values_col = "per_step_indices", "per_step_logits"
    else:
        table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / fmt).glob("*.parquet"))])
        ids_col, values_col = ("token_ids", "top_values") if fmt == "distillkit" else ("target_token_ids", "target_logprobs")
    kl, kl_shifted, expected = [], [], []
    for row in table.to_pylist()[:10]:
        logp = log_softmax_of(model, row["input_ids"])  # (T, V)
        ids, values = torch.tensor(row[ids_col]), torch.tensor(row[values_col])  # (T-1, K)
        assert len(ids) == len(row["input_ids"]) - 1
        kl.append(renormalized_kl(logp[: len(ids)], ids, values))
        kl_shifted.append(renormalized_kl(logp[1 : len(ids) + 1], ids, values))
        expected.append(-torch.logsumexp(logp[: len(ids)].gather(-1, ids), dim=-1))
    kl, kl_shifted, expected = torch.cat(kl), torch.cat(kl_shifted), torch.cat(expected)
    assert torch.allclose(kl, expected, atol=2e-2)  # float16 logits in the cache
    assert kl_shifted.mean() > expected.mean() + 1.0


# ----------------------------------------------------------------------------------------------
# Hand-made peer fixtures, from the peers' documented schemas
# ----------------------------------------------------------------------------------------------


def teacher_rows(world, k=4):
    """[(input_ids (T,), top-k ids (T-1, K), raw log-probs (T-1, K), raw logits (T-1, K))] from the srcq model."""
    model, tokenizer = model_and_tokenizer(world, "srcq")
    rows = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()  # (T, V)
        top = torch.topk(logits[:-1], k, dim=-1)
        logprobs = top.values - torch.logsumexp(logits[:-1], dim=-1, keepdim=True)
        rows.append((np.array(ids), top.indices.numpy(), logprobs.numpy(), top.values.numpy()))
    return rows


def assert_imported_like_the_model(folder, rows, compare_values):
    imported = read_rows(folder)
    for r, (ids, top_ids, logprobs, logits) in enumerate(rows):
        assert np.array_equal(imported["token_ids"].row(r), ids)
        assert np.array_equal(imported["topk_ids"].row(r), top_ids)  # position t holds token t+1's distribution
        assert not np.array_equal(imported["topk_ids"].row(r)[1:], top_ids[:-1])
        compare_values(imported["topk_logits"].row(r), logprobs, logits)


def test_a_hand_made_distillkit_raw_dataset_imports(world, tmp_path):
    rows = teacher_rows(world)
    folder = tmp_path / "dk"
    folder.mkdir()
    table = pa.table({"input_ids": pa.array([r[0].tolist() for r in rows], pa.list_(pa.uint64())),
                      "token_ids": [r[1].tolist() for r in rows], "top_values": [r[2].tolist() for r in rows]})
    pq.write_table(table, folder / "data_0.parquet")
    layer, bad = import_folder(folder, "distillkit", str(world["models"]["srcq"]), tmp_path / "cache")
    assert bad == [] and verify_cache(layer) == []
    assert_imported_like_the_model(layer, rows, lambda got, lp, _: np.testing.assert_allclose(got, lp, atol=1e-6))


def test_a_hand_made_compressed_distillkit_dataset_imports(world, tmp_path):
    """Bytes written by hand from the published layout: float32 head little-endian, ids at ceil(log2 d) bits."""
    rows = teacher_rows(world)
    d = 307
    config = {"d": d, "k": 4, "exact_k": 4, "exact_dtype": "float32", "polynomial_terms": None, "term_dtype": "float32",
              "residual_bins": [], "delta_encoding": False, "error_diffusion": False, "normalize_t": False}
    folder = tmp_path / "dkc"
    folder.mkdir()
    (folder / "compression_config.yaml").write_text(yaml.safe_dump(config))
    logprob_bytes = [[list(struct.pack("<4f", *position)) for position in r[2]] for r in rows]
    index_bytes = [[list(reference_pack(position, 9)) for position in r[1]] for r in rows]
    table = pa.table({"input_ids": pa.array([r[0].tolist() for r in rows], pa.list_(pa.uint64())),
                      "compressed_logprobs": pa.array(logprob_bytes, pa.list_(pa.list_(pa.uint8()))),
                      "bytepacked_indices": pa.array(index_bytes, pa.list_(pa.list_(pa.uint8())))})
    pq.write_table(table, folder / "data_0.parquet")
    layer, bad = import_folder(folder, "distillkit", str(world["models"]["srcq"]), tmp_path / "cache")
    assert bad == []
    assert_imported_like_the_model(layer, rows, lambda got, lp, _: np.testing.assert_allclose(got, lp, atol=1e-6))

    (folder / "compression_config.yaml").write_text(yaml.safe_dump({**config, "quantum_bits": 3}))
    with pytest.raises(InteropError, match="unknown compression setting 'quantum_bits'"):
        import_folder(folder, "distillkit", str(world["models"]["srcq"]), tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "srcq").exists()


def test_a_hand_made_axolotl_dataset_imports_with_its_response_mask(world, tmp_path):
    """axolotl's preprocessing keeps one target per token (the last has no next token) and renormalises."""
    rows = teacher_rows(world)
    records = []
    for ids, top_ids, logprobs, _ in rows:
        renormalised = logprobs - np.logaddexp.reduce(logprobs, axis=1, keepdims=True)
        labels = [-100] * 3 + ids[3:].tolist()
        records.append({
            "input_ids": ids.tolist(), "labels": labels, "attention_mask": [1] * len(ids),
            "target_token_ids": top_ids.tolist() + [list(range(4))],
            "target_logprobs": renormalised.tolist() + [[-1e9] * 4],
            "target_mask": [[int(l != -100)] * 4 for l in labels[1:]] + [[0] * 4],
        })
    folder = tmp_path / "ax"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(records), folder / "train.parquet")
    layer, bad = import_folder(folder, "axolotl", str(world["models"]["srcq"]), tmp_path / "cache")
    assert bad == [] and verify_cache(layer) == []
    renorm = lambda v: v - np.logaddexp.reduce(v, axis=1, keepdims=True)  # noqa: E731
    assert_imported_like_the_model(layer, rows, lambda got, lp, _: np.testing.assert_allclose(got, renorm(lp), atol=1e-5))
    imported = read_rows(layer)
    tokenizer = AutoTokenizer.from_pretrained(world["models"]["srcq"])
    for r, (ids, *_rest) in enumerate(rows):
        start = len(tokenizer.decode(ids[:3]).encode())  # the response starts at token 3
        assert [tuple(s) for s in imported["response_spans"].row(r)] == [(start, len(imported["text"][r].encode()))]


def test_a_hand_made_fusellm_dataset_imports_with_positions_padded_past_the_tokens(world, tmp_path):
    """forward_for_logits.py pads every row to max_length and keeps per_step_* of all positions."""
    from datasets import Dataset

    rows = teacher_rows(world)
    pad = 5
    records = [{"text": text, "input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": ids.tolist(),
                "per_step_logits": logits.astype(np.float16).tolist() + [[0.0] * 4] * (pad + 1),
                "per_step_indices": top_ids.tolist() + [[0, 1, 2, 3]] * (pad + 1), "metric_ce": 2.5 + i}
               for i, (text, (ids, top_ids, _, logits)) in enumerate(zip(TEXTS, rows))]
    Dataset.from_list(records).save_to_disk(str(tmp_path / "fl"))
    layer, bad = import_folder(tmp_path / "fl", "fusellm", str(world["models"]["srcq"]), tmp_path / "cache")
    assert bad == [] and verify_cache(layer) == []
    assert_imported_like_the_model(
        layer, rows, lambda got, _, logits: np.testing.assert_allclose(got, logits.astype(np.float16), atol=1e-6))
    imported = read_rows(layer)
    assert list(imported["text"]) == TEXTS
    assert np.allclose(imported["mean_nll"], [2.5, 3.5, 4.5])
    assert "mean_nll" not in load_manifest(layer)["missing_statistics"]


# ----------------------------------------------------------------------------------------------
# Text from token ids: the per-vocabulary tables against the simple way and the tokenizer itself
# ----------------------------------------------------------------------------------------------

SPELLING_TEXTS = TEXTS + [" leading space", "Zwölf Boxkämpfer, crème brûlée, €7, 日本語, 🙂\n\n\ttab", "\n"]


def reference_spelling(ids, surface) -> tuple[bytes, np.ndarray]:
    """Token after token: join every piece, sum every width, drop a dummy-prefix space."""
    spelled = b"".join(surface.pieces[i] for i in ids)
    ends = np.cumsum([len(surface.pieces[i]) for i in ids], dtype=np.int64)
    if surface.dummy_prefix and spelled.startswith(b" "):
        spelled, ends = spelled[1:], np.maximum(ends - 1, 0)
    return spelled, ends


def assert_spelled_like_the_tokenizer(tok: Tokenizer, tokenizer):
    for text in SPELLING_TEXTS:
        ids = np.array(tokenizer(text)["input_ids"])
        rebuilt, ends = rebuild_text(ids, tok)
        # a dummy-prefix tokenizer spells " x" as it spells "x": the import keeps the text without the space
        assert rebuilt == (text[1:] if tok.surface.dummy_prefix and text.startswith(" ") else text)
        assert np.array_equal(ends, token_byte_ends(ids.tolist(), tok.surface, rebuilt))  # as cache-build finds them
    every_id = np.random.default_rng(0).permutation(tok.tokenizer_size)  # byte tokens, specials, added ones
    for ids in np.array_split(every_id, max(1, tok.tokenizer_size // 97)):
        spelled, ends = tok.spell(ids)
        want, want_ends = reference_spelling(ids, tok.surface)
        if tok.surface.dummy_prefix and spelled.startswith(b" "):
            spelled, ends = spelled[1:], np.maximum(ends - 1, 0)
        assert spelled == want and np.array_equal(ends, want_ends)


@pytest.mark.parametrize("name", ["pivot", "srcq", "srcg"])  # byte-level BPE twice, SentencePiece with byte fallback
def test_text_from_the_vocabulary_tables_equals_the_simple_way_and_the_tokenizer(world, name):
    folder = world["models"][name]
    assert_spelled_like_the_tokenizer(Tokenizer.load(str(folder)), AutoTokenizer.from_pretrained(folder))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "qwen", "gemma3"])
def test_text_from_the_vocabulary_tables_of_the_real_tokenizers(name):
    from cache_builder.models import load_tokenizer

    assert_spelled_like_the_tokenizer(Tokenizer.load(name), load_tokenizer(name))


def reference_spans(token_end, response_tokens) -> tuple:
    starts = np.concatenate([[0], token_end[:-1]])
    spans: list[list[int]] = []
    for t in np.flatnonzero(response_tokens):
        if starts[t] == token_end[t]:
            continue
        if spans and spans[-1][1] == starts[t]:
            spans[-1][1] = int(token_end[t])
        else:
            spans.append([int(starts[t]), int(token_end[t])])
    return tuple(tuple(s) for s in spans)


def test_response_spans_merge_byte_adjacent_tokens_like_a_token_by_token_walk():
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(1, 30))
        token_end = np.cumsum(rng.choice([0, 0, 1, 2, 3], size=n))  # zero-width (special) tokens included
        mask = rng.random(n) < rng.random()
        assert response_spans(token_end, mask, int(token_end[-1])) == reference_spans(token_end, mask)
    assert response_spans(np.array([2, 5]), None, 5) == ((0, 5),)


# ----------------------------------------------------------------------------------------------
# Writing: files of at least --rows-per-file rows, in order, on writer threads; a failed write leaves nothing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,pattern", [("distillkit", "data_{}.parquet"), ("axolotl", "data-{:05d}.parquet")])
def test_exported_files_hold_at_least_rows_per_file_rows_in_layer_order(world, tmp_path, fmt, pattern):
    layer = world["cache"] / "srcq"  # shards of 5 rows
    export_layer(layer, fmt, tmp_path / "peer", batch_rows=7)
    files = [tmp_path / "peer" / pattern.format(i) for i in range(len(list((tmp_path / "peer").glob("*.parquet"))))]
    tables = [pq.read_table(f) for f in files]
    assert all(t.num_rows >= 7 for t in tables[:-1]) and 0 < tables[-1].num_rows
    assert all(pq.ParquetFile(f).metadata.num_row_groups == 1 for f in files)
    written = [ids for t in tables for ids in t.column("input_ids").to_pylist()]
    tokens = read_rows(layer, ["token_ids"])["token_ids"]
    assert written == [tokens.row(r).tolist() for r in range(len(tokens.lengths))]


def test_a_failed_background_write_fails_the_export_and_leaves_nothing(world, tmp_path, monkeypatch):
    real = writer.write_parquet_atomic
    calls = []

    def second_fails(table, final, **options):
        calls.append(final)
        if len(calls) == 2:
            raise OSError("disk full")
        real(table, final, **options)

    monkeypatch.setattr(writer, "write_parquet_atomic", second_fails)
    with pytest.raises(OSError, match="disk full"):
        export_layer(world["cache"] / "srcq", "axolotl", tmp_path / "peer", batch_rows=2)
    assert len(calls) >= 2 and not (tmp_path / "peer").exists()


# ----------------------------------------------------------------------------------------------
# Bad input: reported per row, or refused; nothing half-written
# ----------------------------------------------------------------------------------------------


def test_bad_rows_are_reported_with_their_reason_and_strict_refuses(world, tmp_path):
    rows = teacher_rows(world)
    surface = token_surface(AutoTokenizer.from_pretrained(world["models"]["srcq"]))
    lone_byte = next(i for i, p in enumerate(surface.pieces) if len(p) == 1 and p[0] >= 0xC0)  # half a character
    ids, top, lp, _ = rows[0]
    broken = [
        (np.append(ids, 5000), np.vstack([top, top[:1]]), np.vstack([lp, lp[:1]])),  # token id outside the tokenizer
        (ids, np.where(top == top[0, 0], 9999, top), lp),  # top-k id outside the vocabulary
        (np.append(ids, lone_byte), np.vstack([top, top[:1]]), np.vstack([lp, lp[:1]])),  # not UTF-8
        (ids, top[:-2], lp[:-2]),  # truncated: fewer positions than tokens - 1
    ]
    table = pa.table({
        "input_ids": pa.array([r[0].tolist() for r in rows] + [b[0].tolist() for b in broken], pa.list_(pa.uint64())),
        "token_ids": [r[1].tolist() for r in rows] + [b[1].tolist() for b in broken],
        "top_values": [r[2].tolist() for r in rows] + [b[2].tolist() for b in broken],
    })
    ragged = table.slice(0, 1).to_pylist()[0]
    ragged["token_ids"][1] = ragged["token_ids"][1][:3]
    ragged["top_values"][1] = ragged["top_values"][1][:3]
    folder = tmp_path / "dk"
    folder.mkdir()
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist([ragged], schema=table.schema)]), folder / "data_0.parquet")
    model = str(world["models"]["srcq"])
    layer, bad = import_folder(folder, "distillkit", model, tmp_path / "cache")
    reasons = {b.origin: b.reason for b in bad}
    assert "outside srcq's tokenizer" in reasons["data_0.parquet row 3"]
    assert "outside srcq's vocabulary" in reasons["data_0.parquet row 4"]
    assert "do not decode to UTF-8" in reasons["data_0.parquet row 5"]
    assert "truncated or ragged" in reasons["data_0.parquet row 6"]
    assert "ragged" in reasons["data_0.parquet row 7"]
    assert len(read_rows(layer)["record_id"]) == 3
    assert len(load_manifest(layer)["corpus"]["bad_records"]) == 5
    with pytest.raises(InteropError, match="row 3: token id 5000 is outside"):
        import_folder(folder, "distillkit", model, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists() or not any((tmp_path / "strict").iterdir())


def test_the_cli_exports_imports_and_fails_with_one_line(world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ax"
    result = runner.invoke(export, [str(world["cache"] / "srcq"), "--format", "axolotl", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(export, [str(world["cache"] / "srcq"), "--format", "axolotl", "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output and "Traceback" not in result.output
    result = runner.invoke(import_cache, [str(out), "--format", "axolotl", "--model", str(world["models"]["srcq"]),
                                          "--out", str(tmp_path / "cache")])
    assert result.exit_code == 0 and "0 bad rows" in result.output
    result = runner.invoke(import_cache, [str(out), "--format", "fusellm", "--model", str(world["models"]["srcq"]),
                                          "--out", str(tmp_path / "cache2")])
    assert result.exit_code == 2 and "save_to_disk" in result.output
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"d": 307, "k": 4, "exact_k": 4, "residual_bins": [], "rounding": "up"}))
    result = runner.invoke(export, [str(world["cache"] / "srcq"), "--format", "distillkit", "--out", str(tmp_path / "dk"),
                                    "--compression-config", str(config)])
    assert result.exit_code == 2 and "unknown compression setting 'rounding'" in result.output
    assert not (tmp_path / "dk").exists() and not list(tmp_path.glob(".dk.tmp-*"))


# ----------------------------------------------------------------------------------------------
# Imported layers downstream: cache-align, cache-info, fuse-train
# ----------------------------------------------------------------------------------------------


def test_axolotl_columns_of_a_pivot_aligned_layer_give_our_cache_s_loss_read_back_with_datasets(world, tmp_path):
    """axolotl's top-k forward KL (topk_logprob/forward_kl.py) on the exported dataset, the pivot as student,
    equals the same KL computed from our aligned cache at its aligned response positions."""
    from datasets import load_dataset

    layer = world["cache"] / "srcq" / "aligned" / "pivot"
    export_layer(layer, "axolotl", tmp_path / "ax")
    dataset = load_dataset("parquet", data_files=str(tmp_path / "ax" / "*.parquet"), split="train",
                           cache_dir=str(tmp_path / "hf"))
    pivot, _ = model_and_tokenizer(world, "pivot")
    axolotl_sum, axolotl_items = 0.0, 0
    for row in dataset:
        with torch.no_grad():
            student = pivot(torch.tensor([row["input_ids"]])).logits.float()  # (1, T, V)
        ids, logprobs = torch.tensor([row["target_token_ids"]]), torch.tensor([row["target_logprobs"]])
        mask = torch.tensor([row["target_mask"]]).bool()  # (1, T-1, K)
        student_logprobs = torch.log_softmax(student[:, : ids.shape[1]], dim=-1).gather(-1, ids)  # their formula
        axolotl_sum += float((logprobs[mask].exp() * (logprobs[mask] - student_logprobs[mask])).sum())
        axolotl_items += int(mask.any(-1).sum())
    cache = read_rows(layer)
    direct_sum, direct_items = 0.0, 0
    for r in range(len(cache["record_id"])):
        logp = log_softmax_of(pivot, cache["token_ids"].row(r))
        pos = cache["aligned_pos"].row(r)
        keep = cache["loss_mask"].row(r)[pos]
        ids, logits = cache["topk_ids"].row(r)[keep], cache["topk_logits"].row(r)[keep]
        for p, i, z in zip(pos[keep], ids, logits):
            kept = i >= 0
            direct_sum += float(renormalized_kl(logp[p : p + 1], torch.tensor(i[kept])[None], torch.tensor(z[kept])[None]))
            direct_items += 1
    assert axolotl_items == direct_items > 0
    assert axolotl_sum / axolotl_items == pytest.approx(direct_sum / direct_items, rel=1e-5)


def imported_root(world, tmp_path, fmt) -> Path:
    """Both world sources exported to `fmt`, imported back and aligned to the pivot: a cache root to train on."""
    root = tmp_path / f"imported-{fmt}"
    for source in ("srcq", "srcg"):
        export_layer(world["cache"] / source, fmt, tmp_path / f"{fmt}-{source}")
        layer, _ = import_folder(tmp_path / f"{fmt}-{source}", fmt, str(world["models"][source]), root)
        align_cache(layer, str(world["models"]["pivot"]), log=lambda *_: None)
    return root


def test_imported_caches_align_show_what_is_missing_and_train_only_what_they_can(world, tmp_path):
    root = imported_root(world, tmp_path, "axolotl")
    assert verify_cache(root) == []
    summary = {(row["layer"], row["source"]): row for row in cache_summary(root)}
    assert "logsumexp" in summary[("source", "srcq")]["missing"]
    assert "kept_mass" in summary[("aligned", "srcq")]["missing"]  # renormalised values: the kept mass is unknown
    aligned = read_rows(root / "srcq" / "aligned" / "pivot")
    assert np.isnan(aligned["kept_mass"].values).all() and np.isnan(aligned["logit_std"].values).all()
    layers = discover_sources(root, "pivot")
    with pytest.raises(CacheError, match="logsumexp is missing .* --loss topk-kl"):
        fuse_train(train_config(world, tmp_path / "kl", shards=str(root), loss="topk-kl", max_steps=1), log=lambda *_: None)
    with pytest.raises(CacheError, match="chunk_logprob is missing .* --gate chunk"):
        check_statistics(layers, train_config(world, tmp_path / "g", shards=str(root), loss="fusellm", gate="chunk").needed_statistics())
    final = fuse_train(train_config(world, tmp_path / "fusellm", shards=str(root), loss="fusellm", max_steps=2),
                       log=lambda *_: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "fusellm" / "metrics.jsonl").read_text().splitlines()]
    assert final.exists() and len(losses) == 2 and all(np.isfinite(losses))


def test_raw_log_prob_imports_train_top_k_kl_with_their_tail_mass(world, tmp_path):
    root = imported_root(world, tmp_path, "distillkit")
    aligned = read_rows(root / "srcq" / "aligned" / "pivot")
    original = read_rows(world["cache"] / "srcq" / "aligned" / "pivot")
    np.testing.assert_allclose(aligned["kept_mass"].values, original["kept_mass"].values, atol=1e-5)  # 1 - tail, known
    final = fuse_train(train_config(world, tmp_path / "kl", shards=str(root), loss="topk-kl", max_steps=2),
                       log=lambda *_: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert final.exists() and all(np.isfinite(losses))


@pytest.mark.parametrize("compress", [False, True])
def test_distillkit_columns_of_a_pivot_aligned_layer_hold_the_source_log_probs_and_gold_elsewhere(world, tmp_path, compress):
    layer = world["cache"] / "srcg" / "aligned" / "pivot"
    export_layer(layer, "distillkit", tmp_path / "dk", compress=compress)
    config = CompressionConfig.from_dict(yaml.safe_load((tmp_path / "dk" / "compression_config.yaml").read_text())) if compress else None
    table = pq.read_table(tmp_path / "dk" / "data_0.parquet").to_pylist()
    cache = read_rows(layer)
    for r, row in enumerate(table):
        if compress:
            values = decode_logprobs(np.array(row["compressed_logprobs"], np.uint8), config)
            ids = unpack_bits(np.array(row["bytepacked_indices"], np.uint8), config.index_bits, config.k)
        else:
            ids, values = np.array(row["token_ids"]), np.array(row["top_values"])
        assert np.isfinite(values).all() and len(ids) == len(row["input_ids"]) - 1
        pos, top = cache["aligned_pos"].row(r), cache["topk_ids"].row(r)
        usable = (top >= 0).any(axis=1)
        kept = top[usable] >= 0
        expected = cache["topk_logits"].row(r)[usable] - cache["logsumexp"].row(r)[usable, None]
        assert np.array_equal(ids[pos[usable]][kept], top[usable][kept])
        np.testing.assert_allclose(values[pos[usable]][kept], expected[kept], rtol=2.0**-8 if compress else 1e-6, atol=1e-6)
        gold = np.setdiff1d(np.arange(len(ids)), pos[usable])  # no partner: the gold pivot token at log-prob 0
        assert np.array_equal(ids[gold, 0], np.array(row["input_ids"])[gold + 1]) and np.all(values[gold, 0] == 0.0)


def test_a_manifest_that_declares_an_unknown_missing_statistic_or_value_kind_is_refused(world, tmp_path):
    export_layer(world["cache"] / "srcq", "fusellm", tmp_path / "fl")
    layer, _ = import_folder(tmp_path / "fl", "fusellm", str(world["models"]["srcq"]), tmp_path / "cache")
    manifest = json.loads((layer / "manifest.json").read_text())
    for key, value, message in [("missing_statistics", ["token_ids"], r"missing_statistics\[0\]: 'token_ids' is not one of"),
                                ("topk_values", "probabilities", "topk_values: 'probabilities' is not one of")]:
        (layer / "manifest.json").write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(CacheError, match=message):
            load_manifest(layer)
        assert verify_cache(layer)  # cache-verify reports it too


def test_a_fusellm_export_is_named_by_the_layer_it_holds(world, tmp_path):
    from datasets import load_from_disk

    names = {}
    for out, layer, index in [("a", "srcq", 0), ("b", "srcq", 0), ("c", "srcq", 1), ("d", "srcg", 0)]:
        export_layer(world["cache"] / layer, "fusellm", tmp_path / out, source_index=index)
        names[out] = load_from_disk(str(tmp_path / out))._fingerprint
    assert names["a"] == names["b"]  # the same export of the same layer: the same datasets fingerprint
    assert len({names["a"], names["c"], names["d"]}) == 3


def test_an_import_writes_shards_as_it_reads_and_one_schema_when_a_later_shard_lacks_a_statistic(world, tmp_path, monkeypatch):
    """A shard's table is made as soon as its rows are read (memory holds a few shards, not the input), and a
    statistic missing only in a later shard (the gold log-prob, outside the top-k there) makes the layer's
    column nullable in every shard: the earlier shard is written again, and cache-verify finds one schema."""
    from cache_builder.interop import source_layer
    from cache_builder.interop.source_layer import ImportedRow, write_imported_layer

    rows = teacher_rows(world)
    ids, top, lp, _ = rows[0]
    with_gold = top.copy()  # (T-1, K) the gold next token made a candidate wherever it was not
    outside = ~(top == ids[1:, None]).any(axis=1)
    with_gold[outside, -1] = ids[1:][outside]
    partial = [(r[0], r[1], r[2]) for r in rows[1:]]
    assert outside.any() and all(not (r[1] == r[0][1:, None]).any(axis=1).all() for r in partial)
    read, tables_made = [], []
    real_table = source_layer.source_table
    monkeypatch.setattr(source_layer, "source_table", lambda *a: (tables_made.append(len(read)), real_table(*a))[1])

    def imported():
        for i, (t, k_ids, values) in enumerate([(ids, with_gold, lp), *partial] * 2):  # then each text again
            read.append(i)
            yield ImportedRow(f"row {i}", t, k_ids, values.astype(np.float32))

    layer, bad = write_imported_layer(imported(), fmt="distillkit", input_dir=tmp_path, model=str(world["models"]["srcq"]),
                                      out=tmp_path / "cache", kind="logprobs", rows_per_shard=1)
    assert tables_made == [1, 2, 3] and len(read) == 6  # shard i made after row i, before the rest is read
    assert [b.reason for b in bad] == [f"the same text as row {i} (duplicate record)" for i in range(3)]
    manifest = load_manifest(layer)
    assert {"gold_logprob", "mean_nll"} <= set(manifest["missing_statistics"]) and len(manifest["shards"]) == 3
    assert verify_cache(layer) == []
    assert {pq.read_schema(layer / s["path"]).field("gold_logprob").nullable for s in manifest["shards"]} == {True}
    imported_rows = read_rows(layer)
    np.testing.assert_array_equal(imported_rows["gold_logprob"].row(0), lp[with_gold == ids[1:, None]])  # kept
    assert np.isnan(imported_rows["gold_logprob"].row(1)).any()
