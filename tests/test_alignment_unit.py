"""alignment/ on small hand-made inputs: projection parity, position rules, vocab map I/O, purity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein

from alignment import (
    ByteAccountingError,
    TokenSurface,
    UnknownTokenizerConvention,
    VocabMap,
    VocabMapError,
    align_pieces,
    align_positions,
    align_positions_dtw,
    build_vocab_map,
    chunk_logprobs,
    coverage,
    project_topk,
    token_byte_ends,
    token_surface,
)
from alignment.vocab import _fallback_mined

REPO = Path(__file__).resolve().parents[1]


def reference_projection(ids, logits, lse, table):
    """Per-position Python reference: dict accumulation in probability space."""
    n, k = ids.shape
    out_ids = np.full((n, k), -1, np.int32)
    out_logits = np.zeros((n, k), np.float32)
    kept = np.zeros(n, np.float32)
    for r in range(n):
        acc: dict[int, float] = {}
        for s in range(k):
            p = int(table[ids[r, s]])
            if p < 0:
                continue
            acc[p] = acc.get(p, 0.0) + float(np.exp(logits[r, s] - lse[r]))
        kept[r] = sum(acc.values())
        merged = sorted(((np.log(m) + lse[r], p) for p, m in acc.items()), key=lambda x: -x[0])
        for s, (lg, p) in enumerate(merged):
            out_ids[r, s], out_logits[r, s] = p, lg
    return out_ids, out_logits, kept


def test_project_topk_matches_reference():
    rng = np.random.default_rng(0)
    v_src, v_piv, n, k = 300, 40, 200, 10  # a small pivot forces many duplicate targets
    table = rng.integers(-1, v_piv, size=v_src)
    ids = np.stack([rng.choice(v_src, size=k, replace=False) for _ in range(n)])
    logits = -np.sort(-rng.normal(0, 3, size=(n, k)), axis=1)
    lse = logits.max(axis=1) + rng.uniform(0.5, 4, size=n)
    got = project_topk(ids, logits.astype(np.float32), lse, table)
    want = reference_projection(ids, logits.astype(np.float32), lse, table)
    assert got[0].dtype == np.int32 and got[1].dtype == np.float32 and got[2].dtype == np.float32
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
    assert (got[1][got[0] < 0] == 0).all()


def test_identity_map_with_full_vocab_keeps_all_mass():
    rng = np.random.default_rng(1)
    v, n = 64, 5
    full = rng.normal(0, 2, size=(n, v))
    ids = np.argsort(-full, axis=1)  # (N, V) K = V
    logits = np.take_along_axis(full, ids, axis=1)
    lse = np.log(np.exp(full).sum(axis=1))
    piv_ids, piv_logits, kept = project_topk(ids, logits, lse, np.arange(v))
    np.testing.assert_allclose(kept, 1.0, rtol=1e-6)
    np.testing.assert_array_equal(piv_ids, ids)
    np.testing.assert_allclose(piv_logits, logits, rtol=1e-6)


def test_project_topk_rejects_ids_beyond_map():
    with pytest.raises(ValueError, match="pad src_to_piv"):
        project_topk(np.array([[5]]), np.array([[0.0]]), np.array([1.0]), np.arange(3))


def test_chunk_logprobs_sums_between_boundaries():
    gold = np.array([-1.0, -2.0, -0.5, -0.25, -3.0])  # T_s - 1 = 5
    np.testing.assert_allclose(chunk_logprobs(np.array([0, 2, 3]), gold), [-3.0, -0.5, -3.25])
    assert chunk_logprobs(np.array([], dtype=np.int32), gold).shape == (0,)


def test_align_positions_picks_last_position_of_a_shared_context():
    piv_end = np.array([0, 3, 5, 9, 12])  # <bos> + 4 tokens: positions 0..3
    src_end = np.array([3, 4, 5, 5, 9, 12])  # a zero-width special at index 3: positions 0..4
    piv_pos, src_pos = align_positions(piv_end, src_end)
    np.testing.assert_array_equal(piv_pos, [1, 2, 3])
    np.testing.assert_array_equal(src_pos, [0, 3, 4])  # context 5: position 3 has read the special too
    assert piv_pos.dtype == np.int32 and src_pos.dtype == np.int32
    assert coverage(piv_pos, np.array([False, True, True, True])) == 1.0
    assert coverage(piv_pos, np.array([True, True, False, False])) == 0.5


def test_align_positions_rejects_unsorted_ends():
    with pytest.raises(ValueError, match="non-decreasing"):
        align_positions(np.array([3, 2, 5]), np.array([1, 5]))


def surface_of(pieces, special=(), dummy=False):
    flags = np.array([i in special for i in range(len(pieces))])
    return TokenSurface("byte_level", [b"" if i in special else p for i, p in enumerate(pieces)], flags, dummy)


def test_token_byte_ends_and_error_offset():
    s = surface_of([b"<s>", b"ab", b"c", b" d", b"e"], special={0})
    np.testing.assert_array_equal(token_byte_ends([0, 1, 2, 3], s, "abc d"), [0, 2, 3, 5])
    with pytest.raises(ByteAccountingError, match="byte offset 2"):
        token_byte_ends([1, 4], s, "abc")


def test_dummy_prefix_space_is_removed_only_when_declared():
    pieces = [b" ab", b"c"]
    np.testing.assert_array_equal(token_byte_ends([0, 1], surface_of(pieces, dummy=True), "abc"), [2, 3])
    np.testing.assert_array_equal(token_byte_ends([0, 1], surface_of(pieces, dummy=True), " abc"), [3, 4])
    with pytest.raises(ByteAccountingError):
        token_byte_ends([0, 1], surface_of(pieces, dummy=False), "abc")


def test_dtw_aligns_identical_and_shifted_tokenizations():
    a = [b"Hel", b"lo", b" wor", b"ld", b"!"]
    p, s = align_positions_dtw(a, a)
    np.testing.assert_array_equal(p, [0, 1, 2, 3])
    np.testing.assert_array_equal(s, [0, 1, 2, 3])
    b = [b"Hello", b" wor", b"ld", b"!"]
    p, s = align_pieces(a, b, strategy="dtw")
    assert list(zip(p.tolist(), s.tolist())) == [(2, 1), (3, 2)]
    p, s = align_pieces(a, b, strategy="exact-context")
    assert list(zip(p.tolist(), s.tolist())) == [(1, 0), (2, 1), (3, 2)]
    with pytest.raises(KeyError, match="dtw"):
        align_pieces(a, b, strategy="nope")


def test_mined_finds_a_nearest_token():
    rng = np.random.default_rng(2)
    alphabet = np.frombuffer(b"abcde \xc3\xa9\xe4", np.uint8)
    pivot = sorted({bytes(rng.choice(alphabet, size=rng.integers(1, 7))) for _ in range(400)})
    queries = [bytes(rng.choice(alphabet, size=rng.integers(1, 10))) for _ in range(200)]
    surface = surface_of(pivot)
    found = _fallback_mined(queries, surface)
    for q, f in zip(queries, found):
        d = [Levenshtein.distance(q.decode("latin-1"), p.decode("latin-1")) for p in pivot]
        assert Levenshtein.distance(q.decode("latin-1"), pivot[f].decode("latin-1")) == min(d)


def test_vocab_map_strategies_and_specials():
    src = TokenSurface("byte_level", [b"", b"ab", b"abc", b"zz", b"x"], np.array([1, 0, 0, 0, 0], bool),
                       special_names={0: "<eos>"})
    piv = TokenSurface("byte_level", [b"a", b"ab", b"", b"x", b"ab"], np.array([0, 0, 1, 0, 0], bool),
                       special_names={2: "<eos>"})
    exact = build_vocab_map(src, piv, "exact")
    np.testing.assert_array_equal(exact.src_to_piv, [2, 1, -1, -1, 3])  # duplicate b"ab": lowest id
    assert (exact.n_exact, exact.n_fallback, exact.n_unmapped) == (3, 0, 2)
    mined = build_vocab_map(src, piv, "exact+mined")
    assert mined.src_to_piv[2] == 1 and mined.n_unmapped == 0
    with pytest.raises(ValueError, match="pivot_tokenizer"):
        build_vocab_map(src, piv, "exact+first-token")
    with pytest.raises(KeyError, match="exact"):
        build_vocab_map(src, piv, "fuzzy")


def test_vocab_map_round_trip_and_version_check(tmp_path):
    vmap = VocabMap(np.array([3, -1, 0], np.int32), "exact", "a" * 64, "b" * 64, 2, 0, 1)
    path = tmp_path / "vocab_map.npz"
    vmap.save(path)
    back = VocabMap.load(path)
    np.testing.assert_array_equal(back.src_to_piv, vmap.src_to_piv)
    assert back.header() == vmap.header()
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(z["header"].tobytes())
        arrays = {"src_to_piv": z["src_to_piv"]}
    header["format_version"] = 99
    np.savez(path, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    with pytest.raises(VocabMapError, match="format version 99"):
        VocabMap.load(path)


def test_unknown_convention_raises_clear_error():
    from tokenizers import Tokenizer, models, normalizers

    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(UnknownTokenizerConvention, match="WordLevel"):
        token_surface(word_level)
    plain_bpe = Tokenizer(models.BPE({"a": 0, "b": 1}, merges=[]))
    with pytest.raises(UnknownTokenizerConvention, match="ByteLevel or SentencePiece"):
        token_surface(plain_bpe)
    plain_bpe.normalizer = normalizers.Lowercase()
    with pytest.raises(UnknownTokenizerConvention, match="Lowercase"):
        token_surface(plain_bpe)


def test_alignment_imports_nothing_else_of_ours():
    code = (
        "import sys, alignment; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('cache_builder', 'fuse_trainer', 'torch', 'transformers')); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
