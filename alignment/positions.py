"""Token byte offsets and the pairing of two tokenizations' positions that share their context.

Units (docs/contracts.md): a tokenization of T tokens has `token_end` (T,) int32, the UTF-8 byte
offset where each token ends; special tokens have zero width. Position t (0 <= t < T-1) has read
tokens 0..t, so its context is the text prefix `text_bytes[:token_end[t]]`. Two positions of two
tokenizations are aligned iff their contexts are the same prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from alignment.surface import TokenSurface


class ByteAccountingError(ValueError):
    """The tokens' pieces do not spell the text they are said to tokenize."""


def _concat_pieces(token_ids: np.ndarray, pieces: Sequence[bytes]) -> bytes:
    if len(token_ids) == 0:
        return b""
    if len(token_ids) == 1:
        return pieces[int(token_ids[0])]
    return b"".join(itemgetter(*token_ids.tolist())(pieces))


def _first_mismatch(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    diff = np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8)  # (n,)
    return int(np.argmax(diff)) if diff.any() else n


def token_byte_ends(token_ids: Sequence[int] | np.ndarray, surface: TokenSurface, text: str) -> np.ndarray:
    """(T,) int32 byte offset where each token ends in `text.encode()`; specials have zero width.

    Verifies that the tokens' pieces concatenate to the text's UTF-8 bytes and raises
    `ByteAccountingError` naming the first mismatching byte offset otherwise.

    Dummy prefix: a tokenizer with `surface.dummy_prefix` (SentencePiece `add_dummy_prefix`, e.g.
    Llama-2/Phi-3; byte-level `add_prefix_space`) may spell the text with one extra leading space.
    That space is not in the text, so it is removed from the token that holds it (a token that is
    only that space gets zero width). Both spellings are accepted for such tokenizers only.
    """
    ids = np.asarray(token_ids, dtype=np.int64)  # (T,)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one sequence (T,), got shape {ids.shape}")
    if len(ids) and (ids.min() < 0 or ids.max() >= len(surface)):
        bad = int(ids[(ids < 0) | (ids >= len(surface))][0])
        raise ByteAccountingError(
            f"token id {bad} is outside the tokenizer's vocabulary (0..{len(surface) - 1}); the ids and the "
            "surface come from different tokenizers: build the surface from the tokenizer that made the ids."
        )
    data = text.encode("utf-8")
    spelled = _concat_pieces(ids, surface.pieces)
    ends = np.cumsum(surface.widths[ids], dtype=np.int64)  # (T,)
    if spelled == data:
        return ends.astype(np.int32)
    if surface.dummy_prefix and spelled == b" " + data:
        return np.maximum(ends - 1, 0).astype(np.int32)
    offset = _first_mismatch(spelled, data)
    hint = (
        "If the tokenizer normalises Unicode (NFC), pass NFC-normalised text; if the text contains special-token "
        "strings (e.g. a chat template's markers), those tokens have zero width here: keep them out of the "
        "canonical text or tokenize it with split_special_tokens=True."
    )
    raise ByteAccountingError(
        f"token pieces differ from the text's UTF-8 bytes at byte offset {offset} "
        f"(text has {data[offset:offset + 12]!r}, tokens spell {spelled[offset:offset + 12]!r}; "
        f"{len(data)} text bytes, {len(spelled)} token bytes). {hint}"
    )


def _context_ends(token_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct context lengths of positions t < T-1 and, for each, the LAST position that has it."""
    ends = np.asarray(token_end, dtype=np.int64)  # (T,)
    if ends.ndim != 1:
        raise ValueError(f"token_end must be one sequence (T,), got shape {ends.shape}")
    ctx = ends[:-1]  # (T-1,) context length of each position
    if len(ctx) and ((np.diff(ends) < 0).any() or ends[0] < 0):
        raise ValueError("token_end must be non-decreasing and >= 0 (cumulative byte widths); got an unsorted array")
    last = np.ones(len(ctx), dtype=bool)  # (T-1,)
    last[:-1] = ctx[1:] != ctx[:-1]
    positions = np.flatnonzero(last)  # (U,)
    return ctx[positions], positions


def align_positions(piv_token_end: np.ndarray, src_token_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pivot and source positions whose contexts are the same text prefix: (piv_pos (A,), src_pos (A,)) int32.

    Only positions t < T-1 exist. Where several positions share one context length (zero-width
    specials such as `<bos>` followed by text), the LAST of them is used: it has read the special too.
    Sorted by pivot position; linear in T after numpy's sort-based intersection.
    """
    piv_ctx, piv_positions = _context_ends(piv_token_end)  # (U_p,), (U_p,)
    src_ctx, src_positions = _context_ends(src_token_end)  # (U_s,), (U_s,)
    _, ip, is_ = np.intersect1d(piv_ctx, src_ctx, assume_unique=True, return_indices=True)  # (A,)
    return piv_positions[ip].astype(np.int32), src_positions[is_].astype(np.int32)


def coverage(piv_pos: np.ndarray, piv_loss_mask: np.ndarray) -> float:
    """Share of the pivot's response positions (loss_mask (T_p-1,) True) that have an aligned partner."""
    mask = np.asarray(piv_loss_mask, dtype=bool)  # (T_p-1,)
    total = int(mask.sum())
    if total == 0:
        return float("nan")
    return float(mask[np.asarray(piv_pos, dtype=np.int64)].sum()) / total


def _as_latin1(pieces: Sequence[bytes | str]) -> list[str]:
    return [p.decode("latin-1") if isinstance(p, bytes) else p for p in pieces]


def _dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost monotone path through cost (n, m) from (0, 0) to (n-1, m-1); steps right, down, diagonal.

    The accumulated cost is filled one anti-diagonal at a time (each is a vectorised numpy step).
    Ties prefer the diagonal step, then the step that advances the pivot.
    """
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)  # (n+1, m+1), row/col 0 are the virtual start
    acc[0, 0] = 0.0
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)  # (L,) rows on this anti-diagonal
        j = d - i
        best = np.minimum(np.minimum(acc[i - 1, j - 1], acc[i - 1, j]), acc[i, j - 1])
        acc[i, j] = cost[i - 1, j - 1] + best
    path = [(n - 1, m - 1)]
    i, j = n, m
    while (i, j) != (1, 1):
        steps = ((acc[i - 1, j - 1], i - 1, j - 1), (acc[i - 1, j], i - 1, j), (acc[i, j - 1], i, j - 1))
        _, i, j = min(steps, key=lambda s: s[0])
        path.append((i - 1, j - 1))
    return path[::-1]


def align_positions_dtw(piv_pieces: Sequence[bytes | str], src_pieces: Sequence[bytes | str]) -> tuple[np.ndarray, np.ndarray]:
    """FuseLLM-style fallback for tokenizations without offsets: DTW over token strings, edit-distance cost.

    piv_pieces (T_p,), src_pieces (T_s,): the tokens' strings (bytes are compared as latin-1 text).
    Returns (piv_pos (A,), src_pos (A,)) int32: the one-to-one steps of the DTW path (each token used by
    no other step) at positions t < T-1. An approximation: unlike `align_positions` it does not
    prove that both contexts are the same text. O(T_p * T_s) time and memory.
    """
    piv, src = _as_latin1(piv_pieces), _as_latin1(src_pieces)
    if not piv or not src:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    cost = cdist(piv, src, scorer=Levenshtein.distance, dtype=np.int32, workers=1).astype(np.float64)  # (T_p, T_s)
    path = np.asarray(_dtw_path(cost), dtype=np.int64)  # (P, 2)
    p_count = np.bincount(path[:, 0], minlength=len(piv))  # (T_p,)
    s_count = np.bincount(path[:, 1], minlength=len(src))  # (T_s,)
    one_to_one = (p_count[path[:, 0]] == 1) & (s_count[path[:, 1]] == 1)
    keep = one_to_one & (path[:, 0] < len(piv) - 1) & (path[:, 1] < len(src) - 1)
    return path[keep, 0].astype(np.int32), path[keep, 1].astype(np.int32)


def _align_pieces_by_offsets(piv_pieces: Sequence[bytes], src_pieces: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """`align_positions` on token ends computed from the pieces' byte widths (specials are b"")."""
    piv_end = np.cumsum([len(p) for p in piv_pieces], dtype=np.int64)
    src_end = np.cumsum([len(p) for p in src_pieces], dtype=np.int64)
    return align_positions(piv_end, src_end)


PositionAligner = Callable[[Sequence[bytes], Sequence[bytes]], tuple[np.ndarray, np.ndarray]]

POSITION_STRATEGIES: dict[str, PositionAligner] = {
    "exact-context": _align_pieces_by_offsets,
    "dtw": align_positions_dtw,
}


def align_pieces(piv_pieces: Sequence[bytes], src_pieces: Sequence[bytes], strategy: str = "exact-context") -> tuple[np.ndarray, np.ndarray]:
    """Align two tokenizations given as token byte strings, by a named strategy of POSITION_STRATEGIES."""
    if strategy not in POSITION_STRATEGIES:
        raise KeyError(f"unknown position strategy {strategy!r}; choose one of {sorted(POSITION_STRATEGIES)}")
    return POSITION_STRATEGIES[strategy](piv_pieces, src_pieces)
