"""DistillKit's compressed top-k log-probs ("monotonic log-prob" encoding), written and read with numpy.

One position's k log-probs, sorted descending, become one byte string (`compressed_logprobs`), described by
`compression_config.yaml` (its `DistributionQuantizationConfig`):

    [delta encoding]  optionally v_0, v_1 - v_0, v_2 - v_1, ... instead of v (decoded by a cumulative sum)
    exact head        the first exact_k values in exact_dtype, little-endian
    polynomial tail   coefficients (term_dtype) of a least-squares fit of values exact_k..k-1 over the rank
                      t = 0, 1, ... (or t in [0, 1] with normalize_t) on the terms t^i, sqrt(t), exp(t)
    residual bins     for each bin: a scale (scale_dtype) and num_elements residuals quantised to
                      element_bits signed levels, bit-packed MSB first; tail values past the bins are the
                      polynomial alone

Precision the config promises: the head to exact_dtype's rounding (half a unit in the last place); a binned
tail value to one quantisation step (max |residual| of its bin / 2^(element_bits-1)) plus term_dtype's
rounding; an unbinned tail value to the polynomial fit only. With delta encoding the errors add up along
the rank. The encoder fits and quantises without error diffusion (the decoder is the same either way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cache_builder.interop.bitpack import index_bits, pack_bits, unpack_bits

FLOAT_WIDTHS = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
SPECIAL_TERMS = ("sqrt", "exp")
CONFIG_FILE = "compression_config.yaml"


class CodecError(ValueError):
    """A compression setting or byte string that cannot be decoded; the message names it."""


@dataclass(frozen=True)
class ResidualBin:
    scale_dtype: str
    element_bits: int
    num_elements: int


@dataclass(frozen=True)
class CompressionConfig:
    """DistillKit's DistributionQuantizationConfig (its defaults for the optional keys)."""

    d: int  # vocabulary size: ids are packed at ceil(log2 d) bits
    k: int
    exact_k: int
    residual_bins: tuple[ResidualBin, ...]
    exact_dtype: str = "float32"
    polynomial_terms: tuple[int | str, ...] = ()
    term_dtype: str = "float32"
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    @classmethod
    def from_dict(cls, raw: object) -> "CompressionConfig":
        """Parse and check a compression_config.yaml mapping; an unknown key or value is a CodecError."""
        if not isinstance(raw, dict):
            raise CodecError(f"{CONFIG_FILE} must be a mapping of settings, got {type(raw).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CodecError(f"unknown compression setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        missing = [key for key in ("d", "k", "exact_k", "residual_bins") if key not in raw]
        if missing:
            raise CodecError(f"compression setting {missing[0]!r} is required")
        bins = raw["residual_bins"] or []
        if not isinstance(bins, list) or not all(isinstance(b, dict) for b in bins):
            raise CodecError("residual_bins must be a list of {scale_dtype, element_bits, num_elements}")
        for b in bins:
            extra = sorted(set(b) - {"scale_dtype", "element_bits", "num_elements"})
            if extra or len(b) != 3:
                raise CodecError(f"residual bin {b}: unknown or missing compression setting {extra or list(b)}")
        config = cls(
            d=raw["d"], k=raw["k"], exact_k=raw["exact_k"],
            residual_bins=tuple(ResidualBin(**b) for b in bins),
            **{key: raw[key] for key in ("exact_dtype", "term_dtype", "delta_encoding", "error_diffusion", "normalize_t")
               if key in raw},
            polynomial_terms=tuple(raw.get("polynomial_terms") or ()),
        )
        config.check()
        return config

    def check(self) -> None:
        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        problems = []
        if not (is_int(self.d) and self.d > 0 and is_int(self.k) and self.k > 0 and is_int(self.exact_k)
                and 0 <= self.exact_k <= self.k):
            problems.append("d and k must be positive integers and 0 <= exact_k <= k")
        for dtype in (self.exact_dtype, self.term_dtype, *(b.scale_dtype for b in self.residual_bins)):
            if dtype not in FLOAT_WIDTHS:
                problems.append(f"unknown dtype {dtype!r} (known: {', '.join(FLOAT_WIDTHS)})")
        for term in self.polynomial_terms:
            if not ((is_int(term) and term >= 0) or term in SPECIAL_TERMS):
                problems.append(f"unknown polynomial term {term!r} (powers 0, 1, ... or {'/'.join(SPECIAL_TERMS)})")
        for b in self.residual_bins:
            if not (is_int(b.element_bits) and 1 <= b.element_bits <= 64 and is_int(b.num_elements) and b.num_elements > 0):
                problems.append(f"residual bin {b}: element_bits must be in 1..64 and num_elements positive")
        if sum(b.num_elements for b in self.residual_bins) > self.k - self.exact_k:
            problems.append("residual bins hold more values than the k - exact_k tail")
        if self.exact_k < self.k and not self.polynomial_terms and not self.residual_bins:
            problems.append("a tail (exact_k < k) needs polynomial_terms or residual_bins")
        for flag in ("delta_encoding", "error_diffusion", "normalize_t"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag} must be true or false")
        if problems:
            raise CodecError("invalid compression config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["residual_bins"] = [asdict(b) for b in self.residual_bins]
        out["polynomial_terms"] = list(self.polynomial_terms) or None
        return out

    @property
    def index_bits(self) -> int:
        return index_bits(self.d)

    @property
    def logprob_bytes(self) -> int:
        """Bytes of one position's compressed log-probs."""
        total = self.exact_k * FLOAT_WIDTHS[self.exact_dtype] + len(self.polynomial_terms) * FLOAT_WIDTHS[self.term_dtype]
        return total + sum(FLOAT_WIDTHS[b.scale_dtype] + (b.element_bits * b.num_elements + 7) // 8
                           for b in self.residual_bins)


def default_config(vocab_size: int, k: int) -> CompressionConfig:
    """DistillKit's recommended recipe, sized to k: the first min(k, 16) values exact in bfloat16, the rest a
    polynomial in (1, t, t^2, t^3, t^4, sqrt t), no residual bins, no delta encoding."""
    exact_k = min(k, 16)
    return CompressionConfig(d=vocab_size, k=k, exact_k=exact_k, residual_bins=(), exact_dtype="bfloat16",
                             polynomial_terms=(0, 1, 2, 3, 4, "sqrt") if exact_k < k else (), term_dtype="float32",
                             delta_encoding=False)


# ----------------------------------------------------------------------------------------------
# Floats <-> little-endian bytes, bfloat16 included (numpy has no bfloat16)
# ----------------------------------------------------------------------------------------------


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` rounded to `dtype` (round to nearest even), as float64."""
    return from_bytes(to_bytes(values, dtype), dtype, np.shape(values)[-1])


def to_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    """(..., n) floats -> (..., n * width) uint8, little-endian `dtype`."""
    values = np.asarray(values, dtype=np.float64)
    if dtype == "bfloat16":
        bits = values.astype(np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        stored = rounded.astype("<u2")
    else:
        stored = values.astype({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype])
    return np.ascontiguousarray(stored).view(np.uint8).reshape(*values.shape[:-1], -1)


def from_bytes(data: np.ndarray, dtype: str, n: int) -> np.ndarray:
    """(..., n * width) uint8 -> (..., n) float64."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if dtype == "bfloat16":
        halves = data.view("<u2").astype(np.uint32) << np.uint32(16)
        values = halves.view(np.float32)
    else:
        values = data.view({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype])
    return values.astype(np.float64).reshape(*data.shape[:-1], n)


# ----------------------------------------------------------------------------------------------
# Encode / decode
# ----------------------------------------------------------------------------------------------


def design_matrix(config: CompressionConfig, dtype: str) -> np.ndarray:
    """(t, terms) values of the polynomial terms at the tail's ranks, computed in `dtype`."""
    t = config.k - config.exact_k
    np_dtype = np.float64 if dtype == "float64" else np.float32
    ranks = np.linspace(0, 1, t, dtype=np_dtype) if config.normalize_t else np.arange(t, dtype=np_dtype)
    columns = [np.sqrt(ranks) if term == "sqrt" else np.exp(ranks) if term == "exp" else ranks ** term
               for term in config.polynomial_terms]
    return np.stack(columns, axis=-1).astype(np.float64)


def _quant_range(bits: int) -> tuple[int, int]:
    return (0, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def encode_logprobs(logprobs: np.ndarray, config: CompressionConfig) -> np.ndarray:
    """(N, k) log-probs sorted descending -> (N, config.logprob_bytes) uint8."""
    x = np.asarray(logprobs, dtype=np.float64)  # (N, k)
    if x.ndim != 2 or x.shape[1] != config.k:
        raise CodecError(f"expected (positions, {config.k}) log-probs, got {x.shape}")
    if config.delta_encoding:
        x = np.concatenate([x[:, :1], np.diff(x, axis=1)], axis=1)
    chunks = [to_bytes(x[:, : config.exact_k], config.exact_dtype)]  # (N, exact bytes)
    tail = x[:, config.exact_k :]  # (N, t)
    if config.polynomial_terms:
        design = design_matrix(config, "float64")  # (t, terms)
        u, s, vt = np.linalg.svd(design, full_matrices=False)
        s_inv = np.where(s > 1e-5, 1.0 / np.where(s > 1e-5, s, 1.0), 0.0)
        coeffs = round_to(tail @ (u * s_inv) @ vt, config.term_dtype)  # (N, terms) least squares
        chunks.append(to_bytes(coeffs, config.term_dtype))
        tail = tail - coeffs @ design_matrix(config, config.term_dtype).T  # (N, t) residuals
    start = 0
    for b in config.residual_bins:
        values = tail[:, start : start + b.num_elements]  # (N, n)
        top = 1.0 if b.element_bits == 1 else 2.0 ** (b.element_bits - 1)
        max_abs = np.abs(values).max(axis=1, keepdims=True)  # (N, 1)
        scale = round_to(np.where(max_abs == 0, 1.0, max_abs / top), b.scale_dtype)  # (N, 1)
        low, high = _quant_range(b.element_bits)
        levels = np.clip(np.round(values / scale), low, high) - low  # (N, n) in 0 .. 2^bits - 1
        chunks += [to_bytes(scale, b.scale_dtype), pack_bits(levels.astype(np.int64), b.element_bits)]
        start += b.num_elements
    return np.concatenate(chunks, axis=1).astype(np.uint8)


def decode_logprobs(data: np.ndarray, config: CompressionConfig) -> np.ndarray:
    """(N, config.logprob_bytes) uint8 -> (N, k) float32 log-probs; CodecError on a wrong byte count."""
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != config.logprob_bytes:
        raise CodecError(f"a position's compressed log-probs must be {config.logprob_bytes} bytes for this "
                         f"{CONFIG_FILE}, got {data.shape[-1] if data.ndim == 2 else data.shape}")
    at = 0

    def take(n_bytes: int) -> np.ndarray:
        nonlocal at
        at += n_bytes
        return data[:, at - n_bytes : at]

    exact = from_bytes(take(config.exact_k * FLOAT_WIDTHS[config.exact_dtype]), config.exact_dtype, config.exact_k)
    t = config.k - config.exact_k
    residual = np.zeros((len(data), t))  # (N, t)
    coeffs = None
    if config.polynomial_terms:
        n_terms = len(config.polynomial_terms)
        coeffs = from_bytes(take(n_terms * FLOAT_WIDTHS[config.term_dtype]), config.term_dtype, n_terms)
    start = 0
    for b in config.residual_bins:
        scale = from_bytes(take(FLOAT_WIDTHS[b.scale_dtype]), b.scale_dtype, 1)  # (N, 1)
        levels = unpack_bits(take((b.element_bits * b.num_elements + 7) // 8), b.element_bits, b.num_elements)
        low, _ = _quant_range(b.element_bits)
        signed = levels * 2.0 - 1.0 if b.element_bits == 1 else levels + float(low)
        residual[:, start : start + b.num_elements] = signed * scale
        start += b.num_elements
    tail = residual if coeffs is None else coeffs @ design_matrix(config, config.term_dtype).T + residual
    values = np.concatenate([exact, tail], axis=1)  # (N, k)
    if config.delta_encoding:
        values = np.cumsum(values, axis=1)
    return values.astype(np.float32)
