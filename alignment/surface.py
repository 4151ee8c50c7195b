"""Token surfaces: every token of a tokenizer as the exact bytes it stands for in the text.

A tokenizer stores its vocabulary in a private alphabet: byte-level BPE (GPT-2, Llama-3, Qwen,
SmolLM2) writes each byte as one printable character (`Ġ` for a space, `Ċ` for a newline);
SentencePiece-style BPE (Llama-2, Phi-3, Gemma) writes a space as `▁` and bytes without a piece
of their own as `<0xNN>` tokens. `token_surface` undoes that alphabet, so that token widths
in bytes can be summed to offsets and vocabularies of different tokenizers compared.

The convention is read from the tokenizer's own pipeline (normalizer, pre-tokenizer, decoder and
model JSON of its `tokenizers` backend). A pipeline we do not recognise raises
`UnknownTokenizerConvention`; nothing is guessed.

Special/control tokens (bos/eos/pad/unk, `<start_of_turn>`, `<|im_start|>`, ...) have zero width:
their piece is `b""` and `is_special` is True. Added tokens that are ordinary text (Gemma-3 lists
`\\n`, `\\n\\n`, `<tr>`, ... as added but not special) keep their text as their piece.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"

SPACE_MARK = "\u2581"  # SentencePiece's "▁"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_FINGERPRINT_VERSION = b"alignment.surface/1"


class UnknownTokenizerConvention(ValueError):
    """The tokenizer's vocabulary alphabet is not one that `token_surface` can decode exactly."""


@dataclass(frozen=True, eq=False)
class TokenSurface:
    """The byte string of every token id of one tokenizer.

    convention:    "byte_level" or "sentencepiece".
    pieces:        (V,) list of bytes; `b""` for special tokens and for ids the tokenizer lacks.
    is_special:    (V,) bool; zero-width control tokens (and ids without a token).
    dummy_prefix:  (not part of the fingerprint) the tokenizer may prepend one space to a text before tokenizing it
                   (SentencePiece `add_dummy_prefix`, byte-level `add_prefix_space`).
    special_names: (not part of the fingerprint) id -> token string of every special token, used to map
                   specials by name; empty for a surface rebuilt from (convention, pieces, is_special).
    """

    convention: str
    pieces: list[bytes]
    is_special: np.ndarray
    dummy_prefix: bool = False
    special_names: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pieces)

    @property
    def widths(self) -> np.ndarray:
        """(V,) int32 byte width of every token."""
        return np.fromiter((len(p) for p in self.pieces), dtype=np.int32, count=len(self.pieces))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte value to the printable character that stands for it."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_UNICODE_TO_BYTE = {ch: b for b, ch in bytes_to_unicode().items()}


def backend_json(tokenizer: Any) -> dict:
    """The `tokenizers` pipeline of a transformers tokenizer (or of a `tokenizers.Tokenizer`) as a dict."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise UnknownTokenizerConvention(
            f"{type(tokenizer).__name__} has no `tokenizers` backend, so its pipeline cannot be inspected; "
            "load it as a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True) or a "
            "transformers TokenizersBackend) and pass that."
        )
    return json.loads(backend.to_str())


def _components(node: Any) -> list[dict]:
    """All pipeline components of a normalizer/pre-tokenizer/decoder node, flattening `Sequence`s."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        children = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
        return [c for child in children for c in _components(child)]
    return [node]


def _is_space_mark_replace(c: dict, source: str, target: str) -> bool:
    return c.get("type") == "Replace" and c.get("pattern", {}).get("String") == source and c.get("content") == target


def detect_convention(pipeline: dict) -> tuple[str, bool]:
    """(convention, dummy_prefix) read from a `tokenizers` pipeline dict; raises if not recognised."""
    model_type = pipeline.get("model", {}).get("type")
    if model_type not in ("BPE", "Unigram"):
        raise UnknownTokenizerConvention(
            f"tokenizer model type {model_type!r} is not supported (only BPE and Unigram vocabularies map "
            "tokens to exact text bytes); use a byte-level or SentencePiece tokenizer for alignment."
        )
    normalizers = _components(pipeline.get("normalizer"))
    pre = _components(pipeline.get("pre_tokenizer"))
    decoders = _components(pipeline.get("decoder"))

    byte_level = [c for c in pre + decoders if c.get("type") == "ByteLevel"]
    metaspace = [c for c in pre + decoders if c.get("type") == "Metaspace"]
    sp_markers = (
        metaspace
        + [c for c in normalizers if _is_space_mark_replace(c, " ", SPACE_MARK)]
        + [c for c in decoders if _is_space_mark_replace(c, SPACE_MARK, " ")]
    )
    for c in normalizers:
        if not (
            c.get("type") == "NFC"
            or _is_space_mark_replace(c, " ", SPACE_MARK)
            or (c.get("type") == "Prepend" and c.get("prepend") == SPACE_MARK)
        ):
            raise UnknownTokenizerConvention(
                f"normalizer {c.get('type')!r} rewrites the text before tokenizing, so token bytes no longer "
                "add up to the text's bytes; supported normalizers: NFC (a no-op on NFC text) and "
                "SentencePiece's space->'▁' Replace/Prepend."
            )
    if byte_level and sp_markers:
        raise UnknownTokenizerConvention("pipeline mixes ByteLevel and SentencePiece '▁' components; not supported.")
    if byte_level:
        dummy = any(c.get("add_prefix_space") for c in pre if c.get("type") == "ByteLevel")
        return BYTE_LEVEL, bool(dummy)
    if sp_markers:
        dummy = any(c.get("type") == "Prepend" for c in normalizers) or any(
            c.get("prepend_scheme", "always") in ("always", "first") or c.get("add_prefix_space") is True
            for c in metaspace
            if c in pre
        )
        return SENTENCEPIECE, bool(dummy)
    raise UnknownTokenizerConvention(
        "no ByteLevel or SentencePiece ('▁' Metaspace/Replace) component in the tokenizer's normalizer, "
        "pre-tokenizer or decoder: cannot tell how its vocabulary spells bytes. Supported: byte-level BPE "
        "(GPT-2 style) and SentencePiece-style BPE/Unigram."
    )


def _byte_level_piece(token: str) -> bytes:
    try:
        return bytes(_UNICODE_TO_BYTE[ch] for ch in token)
    except KeyError as err:
        raise UnknownTokenizerConvention(
            f"byte-level token {token!r} holds the character {err.args[0]!r}, which is not in GPT-2's "
            "byte-to-unicode alphabet; the vocabulary is not byte-level."
        ) from None


def _sentencepiece_piece(token: str, byte_fallback: bool) -> bytes:
    if byte_fallback:
        m = _BYTE_FALLBACK.fullmatch(token)
        if m:
            return bytes([int(m.group(1), 16)])
    return token.replace(SPACE_MARK, " ").encode("utf-8")


def _model_vocab(model: dict) -> dict[str, int]:
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        return vocab
    return {entry[0]: i for i, entry in enumerate(vocab or [])}


def token_surface(tokenizer: Any) -> TokenSurface:
    """The exact byte string of every token id of `tokenizer` (transformers fast tokenizer or `tokenizers.Tokenizer`)."""
    pipeline = backend_json(tokenizer)
    convention, dummy_prefix = detect_convention(pipeline)
    model = pipeline["model"]
    model_vocab = _model_vocab(model)
    added = {a["id"]: a for a in pipeline.get("added_tokens", [])}

    special_ids = {i for i, a in added.items() if a.get("special")}
    special_ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None)

    size = 1 + max([*model_vocab.values(), *added.keys(), -1])
    pieces: list[bytes] = [b""] * size
    is_special = np.ones(size, dtype=bool)  # (V,) ids without a token stay special (zero width)
    byte_fallback = bool(model.get("byte_fallback"))
    for token, i in model_vocab.items():
        if i in added:
            continue
        if convention == BYTE_LEVEL:
            pieces[i] = _byte_level_piece(token)
        else:
            pieces[i] = _sentencepiece_piece(token, byte_fallback)
        is_special[i] = False
    for i, a in added.items():
        if i in special_ids:
            continue
        pieces[i] = a["content"].encode("utf-8")
        is_special[i] = False

    names = {i: a["content"] for i, a in added.items() if i in special_ids}
    inverse = {i: t for t, i in model_vocab.items()}
    for i in special_ids:
        if 0 <= i < size:
            pieces[i] = b""
            is_special[i] = True
            names.setdefault(i, inverse.get(i, ""))
    return TokenSurface(convention, pieces, is_special, dummy_prefix, names)


def surface_fingerprint(surface: TokenSurface) -> str:
    """sha256 hex over the convention, every piece and every special flag; equal across processes and machines."""
    h = hashlib.sha256(_FINGERPRINT_VERSION)
    h.update(f"\0{surface.convention}\0{len(surface)}\0".encode())
    h.update(surface.widths.astype("<u4").tobytes())  # (V,) makes the concatenation below unambiguous
    h.update(np.asarray(surface.is_special, dtype=np.uint8).tobytes())
    h.update(b"".join(surface.pieces))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """`surface_fingerprint` of a tokenizer's `token_surface`."""
    return surface_fingerprint(token_surface(tokenizer))
