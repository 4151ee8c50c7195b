"""Value checks of cache rows: every column of both layers, vectorised over a row group.

A re-signed cache passes every checksum, so the values themselves must be plausible before a trainer
sees them: lengths consistent per row, floats finite and within bounds no real model reaches, ids inside
the vocabulary, offsets monotone and inside the text, spans inside the text, positions inside the row and
increasing, top-k logits sorted and below the position's logsumexp, probabilities in [0, 1].
"""

from __future__ import annotations

import numpy as np

from cache_builder.reader import Ragged
from cache_builder.schema import MAX_TOKENS_PER_ROW

LOGIT_BOUND = 1e4  # |logit|, |logsumexp|, |mean|, std: real models stay within a few hundred
NLL_BOUND = 1e4  # mean next-token loss and -log-probabilities, in nats
SUM_BOUND = 1e7  # summed log-probabilities of an ALM chunk
PROB_SLACK = 1e-3  # float rounding on probabilities and on log-probabilities (<= 0)
KEPT_MASS_MAX = 1.05  # float16 top-k logits near 64 round a probability up by up to 1.6%
STAT_COLUMNS = ("logsumexp", "logit_mean", "logit_std", "z_logsumexp", "gold_logprob")


def rows_of(column: Ragged) -> np.ndarray:
    """(N,) the row of each value of a Ragged column."""
    return np.repeat(np.arange(len(column)), column.lengths)


def within_rows(column: Ragged) -> np.ndarray:
    """(N-1,) True where values i and i+1 belong to the same row."""
    same = np.ones(max(len(column.values) - 1, 0), dtype=bool)
    cut = column.offsets[1:-1] - 1
    same[cut[(cut >= 0) & (cut < len(same))]] = False
    return same


def increasing(column: Ragged, strict: bool) -> bool:
    """Whether the values rise (strictly or not) inside every row."""
    step = np.diff(column.values.astype(np.int64))[within_rows(column)]
    return bool(np.all(step > 0) if strict else np.all(step >= 0))


def _lengths(columns: dict, aligned: bool) -> list[str]:
    n_tokens = columns["num_tokens"].astype(np.int64)
    if np.any(n_tokens < 0):
        return ["negative num_tokens"]
    n_pos = np.maximum(n_tokens - 1, 0)
    problems = [f"{c} lengths disagree with num_tokens" for c in ("token_ids", "token_end")
                if not np.array_equal(columns[c].lengths, n_tokens)]
    per_row = columns["aligned_pos"].lengths if aligned else n_pos
    per_position = ("topk_ids", "topk_logits") + STAT_COLUMNS
    if aligned:
        per_position += ("native_topk_logits", "src_pos", "kept_mass", "chunk_logprob")
    problems += [f"{c} has the wrong number of positions per row" for c in per_position
                 if not np.array_equal(columns[c].lengths, per_row)]
    if aligned and not np.array_equal(columns["loss_mask"].lengths, n_pos):
        problems.append("loss_mask has the wrong number of positions per row")
    return problems


def _floats(columns: dict, aligned: bool, missing: tuple[str, ...]) -> list[str]:
    """Value ranges; a statistic an imported layer lacks (`missing`) is null (NaN) there and checked where known."""
    problems = []
    floats = STAT_COLUMNS + ("topk_logits",) + (("native_topk_logits", "kept_mass", "chunk_logprob") if aligned else ())
    given = {c: columns[c].values.astype(np.float32) for c in floats}
    for c, v in given.items():
        if not np.all(np.isfinite(v[~np.isnan(v)] if c in missing else v)):
            problems.append(f"{c} contains NaN or infinite values")
    if problems:
        return problems
    # known values only, for the range checks; NaN compares false in the elementwise checks against logsumexp
    values = {c: v[~np.isnan(v)] if c in missing and v.ndim == 1 else v for c, v in given.items()}
    bounded = ("logsumexp", "logit_mean", "z_logsumexp", "topk_logits") + (("native_topk_logits",) if aligned else ())
    problems += [f"{c} outside [-{LOGIT_BOUND:g}, {LOGIT_BOUND:g}]" for c in bounded
                 if values[c].size and np.abs(values[c]).max() > LOGIT_BOUND]
    if problems:  # the comparisons below would overflow
        return problems
    std = values["logit_std"]
    if std.size and (std.min() < 0 or std.max() > LOGIT_BOUND):
        problems.append(f"logit_std outside [0, {LOGIT_BOUND:g}]")
    gold = values["gold_logprob"]
    if gold.size and (gold.max() > PROB_SLACK or gold.min() < -NLL_BOUND):
        problems.append(f"gold_logprob outside [-{NLL_BOUND:g}, 0] (a log-probability)")
    lse = given["logsumexp"][:, None]
    slack = 1e-2 + PROB_SLACK * np.abs(lse)
    filled = columns["topk_ids"].values >= 0
    if np.any(((values["topk_logits"] - lse) > slack) & filled):
        problems.append("top-k logits above the position's logsumexp (a probability above 1)")
    if aligned:
        kept = values["kept_mass"]
        if kept.size and (kept.min() < -PROB_SLACK or kept.max() > KEPT_MASS_MAX):
            problems.append("kept_mass outside [0, 1]")
        chunk = values["chunk_logprob"]
        if chunk.size and (chunk.max() > PROB_SLACK or chunk.min() < -SUM_BOUND):
            problems.append(f"chunk_logprob outside [-{SUM_BOUND:g}, 0] (a log-probability)")
        if np.any((values["native_topk_logits"] - lse) > slack):
            problems.append("native top-k logits above the position's logsumexp (a probability above 1)")
    else:
        nll = columns["mean_nll"].astype(np.float32)
        nll = nll[~np.isnan(nll)] if "mean_nll" in missing else nll
        if not np.all(np.isfinite(nll)) or (nll.size and (nll.min() < 0 or nll.max() > NLL_BOUND)):
            problems.append(f"mean_nll not a finite loss in [0, {NLL_BOUND:g}]")
        if values["topk_logits"].size and np.any(np.diff(values["topk_logits"], axis=1) > 0):
            problems.append("top-k logits are not sorted in descending order")
    return problems


def _ids(columns: dict, aligned: bool, vocab: int) -> list[str]:
    problems = []
    ids = columns["token_ids"].values
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        problems.append(f"token ids outside the vocabulary [0, {vocab})")
    topk = columns["topk_ids"].values
    low = -1 if aligned else 0
    if topk.size and (topk.min() < low or topk.max() >= vocab):
        problems.append(f"top-k ids outside the vocabulary [{low}, {vocab})")
    ranked = np.sort(topk, axis=1)
    if ranked.size and np.any((np.diff(ranked, axis=1) == 0) & (ranked[:, 1:] >= 0)):
        problems.append("an id appears twice among one position's top-k")
    return problems


def _offsets(columns: dict, aligned: bool) -> list[str]:
    problems = []
    ends = columns["token_end"]
    if ends.values.size and (ends.values.min() < 0 or not increasing(ends, strict=False)):
        problems.append("token_end offsets negative or decreasing inside a row")
    if aligned:
        n_pos = np.maximum(columns["num_tokens"].astype(np.int64) - 1, 0)
        pos = columns["aligned_pos"]
        if pos.values.size and (pos.values.min() < 0 or np.any(pos.values >= n_pos[rows_of(pos)])):
            problems.append("aligned_pos outside the row's positions")
        elif not increasing(pos, strict=True):
            problems.append("aligned_pos not increasing inside a row")
        src = columns["src_pos"]
        if src.values.size and (src.values.min() < 0 or src.values.max() >= MAX_TOKENS_PER_ROW
                                or not increasing(src, strict=True)):
            problems.append("src_pos negative, too large or not increasing inside a row")
        return problems
    n_bytes = np.array([len(t.encode("utf-8")) for t in columns["text"]], dtype=np.int64)
    if ends.values.size and np.any(ends.values > n_bytes[rows_of(ends)]):
        problems.append("token_end offsets past the end of the row's text")
    spans = columns["response_spans"]
    if spans.values.size:
        start, end = spans.values[:, 0].astype(np.int64), spans.values[:, 1].astype(np.int64)
        if start.min() < 0 or np.any(start > end) or np.any(end > n_bytes[rows_of(spans)]):
            problems.append("response_spans outside the row's text")
    if np.any(columns["window"] < 0):
        problems.append("negative window index")
    return problems


def value_problems(columns: dict, layer: str, vocab: int, missing: tuple[str, ...] = ()) -> list[str]:
    """Problems with the values of one row group (`columns` as reader.column_to_numpy gives them); `missing`: the
    statistics an imported layer stores as nulls (its manifest's missing_statistics)."""
    aligned = layer == "aligned"
    problems = _lengths(columns, aligned)
    if problems:  # the per-row checks below index by the lengths
        return problems
    return _floats(columns, aligned, missing) + _ids(columns, aligned, vocab) + _offsets(columns, aligned)
