"""Vocabulary map: every source token id -> one pivot token id (or -1), by the tokens' exact bytes.

Strategies (one registry, `VOCAB_STRATEGIES`):
  "exact"              exact byte-string match; everything else -1.
  "exact+mined"        then FuseLLM's MinED: the pivot token at the smallest edit distance
                       (Levenshtein over latin-1-decoded bytes; ties -> lowest pivot id).
  "exact+first-token"  then the pivot tokenizer's first token of the candidate's text (if that
                       token's bytes are a prefix of the candidate), else the longest pivot token
                       that is a byte prefix of the candidate.
Special tokens map to the pivot special of the same name where one exists, else -1. Among pivot
tokens with identical bytes (e.g. Gemma's `\\n` and `<0x0A>`), the lowest id is the target.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from alignment.surface import TokenSurface, surface_fingerprint

FORMAT_VERSION = 1
MAX_MEMBER_BYTES = 1 << 26  # per .npz member (a 16M-entry map); more is a zip bomb
_MAX_CELLS = 1 << 24  # distance-matrix cells per rapidfuzz call (64 MiB of int32)


class VocabMapError(ValueError):
    """A saved vocabulary map is unreadable, of another format version, or for other tokenizers."""


@dataclass(frozen=True, eq=False)
class VocabMap:
    """src_to_piv (V_src,) int32, -1 = unmapped; counts cover every source id (specials included)."""

    src_to_piv: np.ndarray
    strategy: str
    src_fingerprint: str
    piv_fingerprint: str
    n_exact: int
    n_fallback: int
    n_unmapped: int
    format_version: int = FORMAT_VERSION

    def header(self) -> dict:
        return {
            "format_version": self.format_version,
            "strategy": self.strategy,
            "src_fingerprint": self.src_fingerprint,
            "piv_fingerprint": self.piv_fingerprint,
            "n_exact": self.n_exact,
            "n_fallback": self.n_fallback,
            "n_unmapped": self.n_unmapped,
            "src_vocab_size": int(len(self.src_to_piv)),
        }

    def save(self, path: str | Path) -> None:
        """Write an `.npz` (no pickle): the int32 map and a JSON header; atomic (temporary file + rename)."""
        path = Path(path)
        buf = io.BytesIO()
        header = np.frombuffer(json.dumps(self.header(), sort_keys=True).encode(), dtype=np.uint8)
        np.savez(buf, src_to_piv=np.asarray(self.src_to_piv, dtype=np.int32), header=header)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # exclusive: no symlink
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "VocabMap":
        """Read a map written by `save`; raises VocabMapError on another format version or a damaged file."""
        try:
            fd = os.open(Path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise ValueError("not a regular file")
                with zipfile.ZipFile(f) as archive:  # each member's size is bounded before it is inflated
                    if any(m.file_size > MAX_MEMBER_BYTES for m in archive.infolist()):
                        raise ValueError(f"a member inflates to more than {MAX_MEMBER_BYTES} bytes")
                f.seek(0)
                with np.load(f, allow_pickle=False) as z:
                    header = json.loads(z["header"].tobytes().decode())
                    src_to_piv = z["src_to_piv"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise VocabMapError(f"{path}: not a readable vocabulary map ({err}); rebuild it with build_vocab_map") from err
        if not isinstance(header, dict):
            raise VocabMapError(f"{path}: the header is not a JSON object; rebuild the map with build_vocab_map")
        if header.get("format_version") != FORMAT_VERSION:
            raise VocabMapError(
                f"{path}: vocabulary map format version {header.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; rebuild it with build_vocab_map (cache-align does so when the file is removed)."
            )
        if src_to_piv.dtype != np.int32 or src_to_piv.ndim != 1 or len(src_to_piv) != header["src_vocab_size"]:
            raise VocabMapError(f"{path}: src_to_piv is not a (V_src,) int32 array matching its header; rebuild it")
        return cls(
            src_to_piv=src_to_piv,
            strategy=header["strategy"],
            src_fingerprint=header["src_fingerprint"],
            piv_fingerprint=header["piv_fingerprint"],
            n_exact=int(header["n_exact"]),
            n_fallback=int(header["n_fallback"]),
            n_unmapped=int(header["n_unmapped"]),
        )


def exact_index(surface: TokenSurface) -> dict[bytes, int]:
    """bytes -> lowest id of a non-special, non-empty token with those bytes."""
    index: dict[bytes, int] = {}
    for i, piece in enumerate(surface.pieces):
        if piece and not surface.is_special[i] and piece not in index:
            index[piece] = i
    return index


def _map_specials(src: TokenSurface, piv: TokenSurface) -> dict[int, int]:
    """Source special id -> pivot special id with the same token string (only where one exists)."""
    by_name = {name: i for i, name in sorted(piv.special_names.items(), reverse=True)}
    return {i: by_name[name] for i, name in src.special_names.items() if name in by_name}


def _latin1(pieces: list[bytes]) -> list[str]:
    return [p.decode("latin-1") for p in pieces]


def _mined_lower_bound(q_len: int, q_high: int, p_len: np.ndarray, p_high: np.ndarray) -> np.ndarray:
    """Edit-distance lower bound from counts of bytes < 0x80 and >= 0x80 (a two-class bag distance)."""
    q_low, p_low = q_len - q_high, p_len - p_high
    surplus_q = np.maximum(q_low - p_low, 0) + np.maximum(q_high - p_high, 0)
    surplus_p = np.maximum(p_low - q_low, 0) + np.maximum(p_high - q_high, 0)
    return np.maximum(surplus_q, surplus_p)


def _byte_classes(pieces: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) lengths and (N,) counts of bytes >= 0x80."""
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))  # (N,)
    flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)  # (sum lengths,)
    high_before = np.r_[0, np.cumsum(flat >= 0x80)]  # (sum lengths + 1,)
    ends = np.cumsum(lengths)
    return lengths, high_before[ends] - high_before[ends - lengths]


def _fallback_mined(queries: list[bytes], piv: TokenSurface, pivot_tokenizer: Any = None) -> np.ndarray:
    """(Q,) pivot id at minimal Levenshtein distance from each query (ties: lowest id).

    Exact search, made fast by buckets: pivot tokens are grouped by (length, count of bytes >= 0x80),
    queries likewise; for a query group the pivot buckets are visited in order of a lower bound on the
    distance, and a query stops as soon as the bound exceeds its best distance so far.
    """
    cand_ids = np.array([i for i, p in enumerate(piv.pieces) if p and not piv.is_special[i]], dtype=np.int64)  # (C,)
    cand = [piv.pieces[i] for i in cand_ids]
    c_len, c_high = _byte_classes(cand)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, key in enumerate(zip(c_len.tolist(), c_high.tolist())):
        buckets[key].append(k)
    keys = list(buckets)
    b_len = np.array([k[0] for k in keys])
    b_high = np.array([k[1] for k in keys])
    b_members = [np.asarray(buckets[k], dtype=np.int64) for k in keys]  # ascending -> lowest id first
    b_text = [_latin1([cand[m] for m in members]) for members in b_members]

    q_len, q_high = _byte_classes(queries)
    best_d = np.full(len(queries), np.iinfo(np.int64).max)  # (Q,)
    best_k = np.full(len(queries), -1)  # (Q,) index into cand
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for qi, key in enumerate(zip(q_len.tolist(), q_high.tolist())):
        groups[key].append(qi)
    for (ql, qh), members in groups.items():
        members = np.asarray(members, dtype=np.int64)  # (G,)
        texts = np.array(_latin1([queries[m] for m in members]), dtype=object)
        bound = _mined_lower_bound(ql, qh, b_len, b_high)  # (B,)
        for b in np.argsort(bound, kind="stable"):
            active = np.flatnonzero(best_d[members] > bound[b])  # (A,) queries this bucket could still improve
            if len(active) == 0:
                break
            step = max(1, _MAX_CELLS // len(b_members[b]))
            for start in range(0, len(active), step):
                rows = active[start:start + step]  # (R,)
                dist = cdist(b_text[b], list(texts[rows]), scorer=Levenshtein.distance, dtype=np.int32, workers=-1)  # (P_b, R)
                arg = dist.argmin(axis=0)  # (R,) first minimum = lowest id in the bucket
                d = dist[arg, np.arange(len(rows))]
                k = b_members[b][arg]
                q = members[rows]
                better = d < best_d[q]
                best_d[q[better]] = d[better]
                best_k[q[better]] = k[better]
    return np.where(best_k >= 0, cand_ids[np.maximum(best_k, 0)], -1)


def _longest_prefix(query: bytes, index: dict[bytes, int], max_len: int) -> int:
    for n in range(min(len(query), max_len), 0, -1):
        hit = index.get(query[:n])
        if hit is not None:
            return hit
    return -1


def _fallback_first_token(queries: list[bytes], piv: TokenSurface, pivot_tokenizer: Any) -> np.ndarray:
    """(Q,) the pivot tokenizer's first token of each query's text, when its bytes are a prefix of the query;
    otherwise (invalid UTF-8, a dummy-prefix space or a special token first) the longest pivot token that is
    a byte prefix of the query."""
    if pivot_tokenizer is None:
        raise ValueError(
            "strategy 'exact+first-token' needs the pivot tokenizer: pass build_vocab_map(..., pivot_tokenizer=tok), "
            "or use 'exact+mined', which needs only the surfaces."
        )
    backend = getattr(pivot_tokenizer, "backend_tokenizer", pivot_tokenizer)
    texts, valid = [], []
    for qi, q in enumerate(queries):
        try:
            texts.append(q.decode("utf-8"))
            valid.append(qi)
        except UnicodeDecodeError:
            continue
    encodings = backend.encode_batch(texts, add_special_tokens=False) if texts else []
    out = np.full(len(queries), -1, dtype=np.int64)  # (Q,)
    for qi, enc in zip(valid, encodings):
        if enc.ids:
            first = enc.ids[0]
            piece = piv.pieces[first] if first < len(piv) else b""
            if piece and queries[qi].startswith(piece):
                out[qi] = first
    index = exact_index(piv)
    max_len = max((len(p) for p in index), default=0)
    for qi in np.flatnonzero(out < 0):
        out[qi] = _longest_prefix(queries[qi], index, max_len)
    return out


Fallback = Callable[[list[bytes], TokenSurface, Any], np.ndarray]

VOCAB_STRATEGIES: dict[str, Fallback | None] = {
    "exact": None,
    "exact+mined": _fallback_mined,
    "exact+first-token": _fallback_first_token,
}


def build_vocab_map(
    src_surface: TokenSurface,
    piv_surface: TokenSurface,
    strategy: str = "exact+first-token",
    pivot_tokenizer: Any = None,
) -> VocabMap:
    """Map every source token id to a pivot token id by a strategy of VOCAB_STRATEGIES (see module doc)."""
    if strategy not in VOCAB_STRATEGIES:
        raise KeyError(f"unknown vocabulary strategy {strategy!r}; choose one of {sorted(VOCAB_STRATEGIES)}")
    index = exact_index(piv_surface)
    src_to_piv = np.full(len(src_surface), -1, dtype=np.int32)  # (V_src,)
    missing: list[int] = []
    for i, piece in enumerate(src_surface.pieces):
        if src_surface.is_special[i] or not piece:
            continue
        hit = index.get(piece)
        if hit is None:
            missing.append(i)
        else:
            src_to_piv[i] = hit
    for i, j in _map_specials(src_surface, piv_surface).items():
        src_to_piv[i] = j
    n_exact = int((src_to_piv >= 0).sum())

    fallback = VOCAB_STRATEGIES[strategy]
    n_fallback = 0
    if fallback is not None and missing:
        found = fallback([src_surface.pieces[i] for i in missing], piv_surface, pivot_tokenizer)  # (M,)
        src_to_piv[np.asarray(missing)] = found
        n_fallback = int((found >= 0).sum())
    return VocabMap(
        src_to_piv=src_to_piv,
        strategy=strategy,
        src_fingerprint=surface_fingerprint(src_surface),
        piv_fingerprint=surface_fingerprint(piv_surface),
        n_exact=n_exact,
        n_fallback=n_fallback,
        n_unmapped=len(src_to_piv) - n_exact - n_fallback,
    )
