"""Loss functions of the fusion trainer: SFT, InfiFusion ULD, FuseLLM soft CE, top-k KL, ALM.

Every fusion loss is a pure function of tensors gathered at the N aligned pivot positions of a batch
(docs/contracts.md, "Pivot-aligned row") and returns PER-POSITION losses (N,): the trainer weights,
gates, masks and normalises them by the number of response tokens. Source-side inputs come from the
cache and carry no gradient; gradients flow into the pivot's logits / log-probs only.

Shared notation (one source):
    piv_logits       (N, V)  pivot logits, float32, with grad
    src_topk_logits  (N, K)  raw source logits, sorted descending; 0 in empty slots
    src_topk_ids     (N, K)  source candidates mapped to pivot ids, int64, -1 = empty slot
    src_lse          (N,)    logsumexp of the source logits over the source vocabulary
    src_mean, src_std (N,)   mean and (population) std of the source logits over its vocabulary
    src_zlse         (N,)    logsumexp over the source vocabulary of (z - mean) / std
    src_gold_logprob (N,)    source log-prob of the actual next text
    piv_gold_logprob (N,)    pivot log-prob of its own next token

Positions with no non-empty source slot carry no fusion signal: the sparse losses return 0 there and
`valid_positions(src_topk_ids)` tells the caller which positions are real. The registry
`FUSION_LOSSES` wraps every loss behind one calling convention that returns that mask too.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

_STD_EPS = 1e-6
_LOG_FLOOR = 1e4


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over masked positions.

    `logits[b, t]` is scored against `labels[b, t]` (the caller has already shifted labels by one).
    Computed in float32 whatever the logits' dtype.

    Args:
        logits: (B, T, V) pivot logits.
        labels: (B, T) int64 target token ids; values at masked-out positions are ignored.
        mask: (B, T) bool, True where the position counts (response tokens).

    Returns:
        (loss_sum, n_tokens): scalar summed CE and the scalar int64 number of counted positions;
        the trainer divides (after summing both over gradient accumulation / ranks).
    """
    mask = mask.bool()
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))  # (B, T)
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), safe_labels.flatten(), reduction="none"
    )  # (B*T,)
    loss_sum = (ce * mask.flatten()).sum()
    return loss_sum, mask.sum()


def valid_positions(src_topk_ids: torch.Tensor) -> torch.Tensor:
    """(N, K) candidate ids -> (N,) bool: positions with at least one non-empty slot."""
    return (src_topk_ids >= 0).any(dim=-1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the input already is (gradcheck); never bf16/fp16."""
    return torch.promote_types(x.dtype, torch.float32)


def _masked_log_softmax(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log_softmax over the kept entries of the last dim; -inf elsewhere, 0-safe for empty rows."""
    x = x.masked_fill(~keep, float("-inf"))  # (N, K)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (N, 1), -inf for empty rows
    out = x - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return out.masked_fill(~keep, float("-inf"))


def zscore(logits: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Z(z) = (z - mean) / max(std, eps), broadcasting the (N,) statistics over the last dim.

    DESIGN writes (std + eps); clamping instead keeps the pivot side and the cached source
    z_logsumexp (defined with plain std) on exactly the same definition. They differ by O(eps/std).
    """
    return (logits - mean.unsqueeze(-1)) / std.clamp_min(_STD_EPS).unsqueeze(-1)


def uld_loss(
    piv_logits: torch.Tensor,
    src_topk_logits: torch.Tensor,
    src_lse: torch.Tensor,
    src_mean: torch.Tensor,
    src_std: torch.Tensor,
    src_zlse: torch.Tensor,
    *,
    top_k: int = 10,
    temperature: float = 1.0,
    standardize: bool = True,
    normalize: str = "topk",
    src_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """InfiFusion's ULD: L1 distance between the sorted top-K probability vectors, per position.

        loss = sum_{i <= K} | p_src_(i) - p_piv_(i) |      (both sorted descending)

    Probabilities are softmax(s / temperature) of the scores s = Z(z) (standardize=True, the
    paper's z-score) or s = z (standardize=False, raw-probability ULD), normalised either
        "topk": within the K kept values of each side (each vector sums to 1), or
        "full": over the whole vocabulary. For the source this needs the cached full-vocab
                normaliser, which exists only at temperature 1 (src_zlse, or src_lse when not
                standardized); any other temperature raises ValueError.
    The pivot's top-K is found with torch.topk (never a full sort of the vocabulary); Z is
    monotone, so the top-K of z is the top-K of Z. Source empty slots (src_valid False) get
    probability 0 and sort to the end; positions without any valid slot return 0.

    Args:
        piv_logits: (N, V) pivot logits, with grad.
        src_topk_logits: (N, K_cache) source logits, K_cache >= top_k. ULD needs no vocab map, so
            the source-native top-k can be passed here as well as the pivot-aligned one.
        src_lse, src_mean, src_std, src_zlse: (N,) cached source statistics.
        src_valid: (N, K_cache) bool, False at empty slots (e.g. `src_topk_ids >= 0`); default all.

    Returns:
        (N,) loss per position.
    """
    piv = pivot_uld_stats(piv_logits.to(_compute_dtype(piv_logits)), top_k, standardize, normalize == "full")
    return uld_from_pivot_stats(
        piv, src_topk_logits, src_lse, src_mean, src_std, src_zlse, top_k=top_k, temperature=temperature,
        standardize=standardize, normalize=normalize, src_valid=src_valid,
    )


class _TopKMeanStd(torch.autograd.Function):
    """(..., V) logits -> sorted top-K values (..., K), mean (...,) and population std (...,) over V.

    The same values as torch.topk, Tensor.mean and Tensor.std(correction=0), with two fast reductions
    forward (a sum and a 2-norm: var = E[z^2] - mean^2, whose relative error is float eps times
    1 + mean^2 / var, small for logits; torch.var_mean took 8x longer on CPU) and a backward that writes
    the (..., V) gradient in one pass instead of one per statistic:
        d mean / dz = 1 / V,   d std / dz = (z - mean) / (V std)
        grad = z * a + b  with  a = g_std / (V std),  b = g_mean / V - mean * a;  then g_top scattered in.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, top_k: int):
        vocab = logits.shape[-1]
        top, idx = torch.topk(logits, top_k, dim=-1, sorted=True)  # (..., K)
        mean = logits.sum(dim=-1) / vocab  # (...,)
        mean_square = torch.linalg.vector_norm(logits, dim=-1).square() / vocab  # (...,)
        std = (mean_square - mean.square()).clamp_min(0.0).sqrt()  # (...,)
        ctx.save_for_backward(logits, idx, mean, std)
        return top, mean, std

    @staticmethod
    def backward(ctx, g_top: torch.Tensor, g_mean: torch.Tensor, g_std: torch.Tensor):
        logits, idx, mean, std = ctx.saved_tensors
        vocab = logits.shape[-1]
        a = torch.where(std > 0, g_std / (vocab * std), torch.zeros_like(std))  # (...,); a constant row has no std gradient
        b = g_mean / vocab - mean * a  # (...,)
        grad = torch.addcmul(b.unsqueeze(-1), logits, a.unsqueeze(-1))  # (..., V)
        return grad.scatter_add_(-1, idx, g_top), None


def pivot_uld_stats(logits: torch.Tensor, top_k: int, standardize: bool, full: bool) -> dict[str, torch.Tensor]:
    """What ULD needs of the pivot's (..., V) logits: sorted top-K values and, as needed, the vocabulary mean,
    std and normaliser. Computing it once for a whole (B, T, V) batch serves every source."""
    if standardize:
        top, mean, std = _TopKMeanStd.apply(logits, top_k)
        stats = {"top": top, "mean": mean, "std": std}  # (..., K), (...,), (...,)
    else:
        stats = {"top": torch.topk(logits, top_k, dim=-1, sorted=True).values}  # (..., K)
    if full:
        full_scores = zscore(logits, stats["mean"], stats["std"]) if standardize else logits
        stats["norm"] = torch.logsumexp(full_scores, dim=-1)  # (...,)
    return stats


def uld_from_pivot_stats(
    piv: dict[str, torch.Tensor],
    src_topk_logits: torch.Tensor,
    src_lse: torch.Tensor,
    src_mean: torch.Tensor,
    src_std: torch.Tensor,
    src_zlse: torch.Tensor,
    *,
    top_k: int,
    temperature: float,
    standardize: bool,
    normalize: str,
    src_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`uld_loss` given `pivot_uld_stats` at the N positions (each entry indexed to (N, ...))."""
    if normalize not in ("topk", "full"):
        raise ValueError(f"normalize must be 'topk' or 'full', got {normalize!r}")
    if normalize == "full" and temperature != 1.0:
        raise ValueError(
            "uld_loss(normalize='full') needs the source's full-vocabulary normaliser, which the "
            f"cache stores only at temperature 1 (got temperature={temperature}); use "
            "normalize='topk' or temperature=1.0"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if src_topk_logits.shape[-1] < top_k:
        raise ValueError(
            f"top_k={top_k} but the cache holds only {src_topk_logits.shape[-1]} source logits "
            "per position; lower top_k or rebuild the cache with a larger k"
        )
    if src_valid is None:
        src_valid = torch.ones_like(src_topk_logits, dtype=torch.bool)
    dtype = piv["top"].dtype
    src_valid = src_valid[:, :top_k]  # (N, K)
    src_z = src_topk_logits[:, :top_k].to(dtype)  # (N, K)
    src_lse, src_mean, src_std, src_zlse = (
        t.to(dtype) for t in (src_lse, src_mean, src_std, src_zlse)
    )

    # Pivot side.
    piv_s = (zscore(piv["top"], piv["mean"], piv["std"]) if standardize else piv["top"]) / temperature  # (N, K)
    if normalize == "topk":
        piv_logp = torch.log_softmax(piv_s, dim=-1)  # (N, K)
    else:
        piv_logp = piv_s - piv["norm"].unsqueeze(-1)  # temperature is 1 here
    piv_p = piv_logp.exp()  # (N, K)

    # Source side.
    src_s = (zscore(src_z, src_mean, src_std) if standardize else src_z) / temperature  # (N, K)
    if normalize == "topk":
        src_logp = _masked_log_softmax(src_s, src_valid)
    else:
        norm = src_zlse if standardize else src_lse  # (N,)
        src_logp = (src_s - norm.unsqueeze(-1)).masked_fill(~src_valid, float("-inf"))
    src_p = torch.sort(src_logp.exp(), dim=-1, descending=True).values  # (N, K), K is small

    loss = (src_p - piv_p).abs().sum(dim=-1)  # (N,)
    return loss * src_valid.any(dim=-1)


def _gather_piv_logprob(piv_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(piv_logits)[ids] without an (N, V) log-prob tensor; ids < 0 give garbage."""
    lse = torch.logsumexp(piv_logits, dim=-1, keepdim=True)  # (N, 1)
    return piv_logits.gather(-1, ids.long().clamp_min(0)) - lse  # (N, K)


def soft_ce_loss(
    piv_logits: torch.Tensor,
    src_topk_ids: torch.Tensor,
    src_topk_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """FuseLLM / FuseChat soft cross-entropy against the source's renormalised top-k.

        target_k = softmax_k(src_logit_k / temperature)   over the non-empty slots k
        loss     = - sum_k target_k * log_softmax(piv_logits)[src_topk_ids_k]

    Positions with no non-empty slot return 0; `valid_positions(src_topk_ids)` marks them.

    Args:
        piv_logits: (N, V) pivot logits, with grad.
        src_topk_ids: (N, K) int64 pivot ids, -1 = empty slot.
        src_topk_logits: (N, K) source logits (0 in empty slots, ignored).

    Returns:
        (N,) loss per position.
    """
    piv_logits = piv_logits.to(_compute_dtype(piv_logits))  # (N, V)
    piv_logp = _gather_piv_logprob(piv_logits, src_topk_ids)  # (N, K)
    return soft_ce_from_logprobs(piv_logp, src_topk_ids, src_topk_logits, temperature=temperature)


def soft_ce_from_logprobs(
    piv_logp: torch.Tensor,
    src_topk_ids: torch.Tensor,
    src_topk_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`soft_ce_loss` given the pivot's log-probs at the candidate ids, piv_logp (N, K), instead of its
    (N, V) logits: the trainer gathers them straight from the batch logits, no (N, V) copy."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keep = src_topk_ids >= 0  # (N, K)
    src_s = src_topk_logits.to(piv_logp.dtype) / temperature  # (N, K)
    target = _masked_log_softmax(src_s, keep).exp()  # (N, K)
    return -(target * piv_logp.masked_fill(~keep, 0.0)).sum(dim=-1)


def topk_kl_loss(
    piv_logits: torch.Tensor,
    src_topk_ids: torch.Tensor,
    src_topk_logits: torch.Tensor,
    src_lse: torch.Tensor,
    *,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Forward KL(p_src || p_piv) on the kept entries plus one explicit tail bucket.

        p_k = exp(src_logit_k - src_lse)           true source probabilities (no renormalisation)
        q_k = softmax(piv_logits)[src_topk_ids_k]
        p_tail = max(1 - sum_k p_k, 0),  q_tail = max(1 - sum_k q_k, eps)
        loss = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail)

    Mass of candidates that found no pivot token (empty slots) lands in the tail, so nothing is
    silently renormalised away. With K = V and identity ids this is the dense KL. A position with
    no kept entry has p_tail = q_tail = 1 and loss 0.

    Args:
        piv_logits: (N, V) pivot logits, with grad.
        src_topk_ids: (N, K) int64 pivot ids, -1 = empty slot; ids assumed duplicate-free.
        src_topk_logits: (N, K) source logits (duplicates already merged by logsumexp).
        src_lse: (N,) source full-vocabulary logsumexp.

    Returns:
        (N,) loss per position.
    """
    piv_logits = piv_logits.to(_compute_dtype(piv_logits))  # (N, V)
    piv_logp = _gather_piv_logprob(piv_logits, src_topk_ids)  # (N, K)
    return topk_kl_from_logprobs(piv_logp, src_topk_ids, src_topk_logits, src_lse, eps=eps)


def topk_kl_from_logprobs(
    piv_logp: torch.Tensor,
    src_topk_ids: torch.Tensor,
    src_topk_logits: torch.Tensor,
    src_lse: torch.Tensor,
    *,
    eps: float = 1e-8,
) -> torch.Tensor:
    """`topk_kl_loss` given the pivot's log-probs at the candidate ids, piv_logp (N, K), instead of its
    (N, V) logits: the trainer gathers them straight from the batch logits, no (N, V) copy."""
    keep = src_topk_ids >= 0  # (N, K)
    neg_inf = float("-inf")
    src_logit = src_topk_logits.to(piv_logp.dtype)  # (N, K)
    src_logp = (src_logit - src_lse.to(src_logit.dtype).unsqueeze(-1)).masked_fill(~keep, neg_inf)
    piv_logp = piv_logp.masked_fill(~keep, neg_inf)
    p = src_logp.exp()  # (N, K)
    kept = torch.where(keep, p * (src_logp - piv_logp), torch.zeros_like(p)).sum(dim=-1)  # (N,)

    p_tail = (1.0 - p.sum(dim=-1)).clamp_min(0.0)  # (N,)
    q_tail = -torch.expm1(torch.logsumexp(piv_logp, dim=-1))  # (N,) 1 - sum q, accurately
    q_tail = q_tail.clamp_min(eps)
    tail = torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()  # (N,)
    return kept + tail


def record_ratio(
    numerator: torch.Tensor, denominator: torch.Tensor, record_index: torch.Tensor, num_records: int
) -> torch.Tensor:
    """(R,) float64, no grad: per record, sum(numerator) / sum(denominator) over its items.

    +inf where a record's denominator sums to 0 (no item, or none counted). numerator, denominator and
    record_index (in [0, num_records)) are (A,), one entry per item. A mean over positions is
    record_ratio(value * kept, kept).
    """
    record_index = record_index.long()
    top = torch.zeros(num_records, dtype=torch.float64, device=numerator.device)
    top = top.index_add_(0, record_index, numerator.detach().double())  # (R,)
    bottom = torch.zeros_like(top).index_add_(0, record_index, denominator.detach().double())  # (R,)
    return torch.where(bottom > 0, top / bottom.clamp_min(1e-300), torch.full_like(top, float("inf")))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012): -inf at x = 0."""
    return torch.where(
        x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )


def chunk_spans(
    aligned_row: torch.Tensor, aligned_pos: torch.Tensor, num_positions: torch.Tensor, T: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pivot span [start, end) of every ALM chunk of a (B, T) batch.

    Chunk k of row r = aligned_row[k] covers pivot positions aligned_pos[k] .. aligned_pos[k+1] - 1
    when chunk k+1 is in the same row, else aligned_pos[k] .. num_positions[r] - 1. Positions before
    a row's first aligned position belong to no chunk.

    Args:
        aligned_row: (A,) row of each chunk.
        aligned_pos: (A,) start position; (aligned_row, aligned_pos) sorted ascending.
        num_positions: (B,) number of valid positions per row (T_p - 1 for T_p tokens).

    Returns:
        (start (A,), end (A,)) int64 flat indices into (B * T); end - start is the chunk's length.
    """
    aligned_row, aligned_pos = aligned_row.long(), aligned_pos.long()  # cache stores int32
    num_positions = num_positions.long()
    start = aligned_row * T + aligned_pos  # (A,)
    row_end = aligned_row * T + num_positions[aligned_row]  # (A,) flat end of each chunk's row
    if bool((start[1:] <= start[:-1]).any()) or bool((start >= row_end).any()):
        raise ValueError(
            "ALM chunk starts must be unique, sorted by (row, position), and lie before their "
            "row's num_positions"
        )
    same_row_next = torch.cat([aligned_row[1:] == aligned_row[:-1], start.new_zeros(1).bool()])
    next_start = torch.cat([start[1:], start.new_zeros(1)])
    return start, torch.where(same_row_next, next_start, row_end)


def chunk_logprob_sum(
    piv_gold_logprob: torch.Tensor,
    aligned_row: torch.Tensor,
    aligned_pos: torch.Tensor,
    num_positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pivot log-likelihood of every ALM chunk (`chunk_spans`), by a segment sum (no loop over chunks).

    Args:
        piv_gold_logprob: (B, T) pivot log-prob of each next token, with grad.
        aligned_row, aligned_pos, num_positions: as in `chunk_spans`.

    Returns:
        (chunk_sum (A,), chunk_length (A,) int64).
    """
    B, T = piv_gold_logprob.shape
    start, end = chunk_spans(aligned_row, aligned_pos, num_positions, T)  # (A,), (A,)
    if start.numel() == 0:  # no aligned position in the batch (a source that teaches none of its records)
        return piv_gold_logprob.new_zeros(0), end - start
    flat = torch.arange(B * T, device=piv_gold_logprob.device)  # (B*T,)
    chunk = torch.searchsorted(start, flat, right=True) - 1  # (B*T,) last chunk starting <= t
    inside = (chunk >= 0) & (flat < end[chunk.clamp_min(0)])  # (B*T,)
    values = piv_gold_logprob.reshape(-1)[inside]  # (M,)
    chunk_sum = piv_gold_logprob.new_zeros(start.shape[0]).index_add(0, chunk[inside], values)
    return chunk_sum, end - start


def alm_loss(
    piv_gold_logprob: torch.Tensor,
    aligned_row: torch.Tensor,
    aligned_pos: torch.Tensor,
    chunk_logprob: torch.Tensor,
    num_positions: torch.Tensor,
    *,
    temperature: float = 1.0,
    distance: str = "kl",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALM chunk-level likelihood matching (Minixhofer et al. 2025), one loss per chunk.

    A chunk is the text between two consecutive shared token boundaries, so source and pivot
    assign likelihoods to the same event. With L_s = chunk_logprob (source, cached) and L_p the
    pivot's summed gold log-probs over the chunk (`chunk_logprob_sum`), both are binarised:
        a = clamp(L_s / tau, -1e4, -eps),  b = clamp(L_p / tau, -1e4, -eps)
        (tau = the binarization temperature)
        P = Bernoulli(exp(a)),  Q = Bernoulli(exp(b))
    and compared with
        "kl":      KL(P || Q) = e^a (a - b) + (1 - e^a) (log1mexp(a) - log1mexp(b))
        "abs-log": |a - b| + |log1mexp(a) - log1mexp(b)|
    where log1mexp(x) = log(1 - e^x) is evaluated stably. The clamp at -eps keeps log1mexp finite
    when a chunk is (numerically) certain; the floor at -1e4 keeps e^a (a - b) at 0 rather than
    NaN for a chunk the source finds impossible (L_s = -inf).
    Gradient: d KL / d L_p = (q - p) / ((1 - q) tau) with p = e^a, q = e^b. A large tau (e.g. 100,
    tried in DESIGN section 5) shrinks it roughly as 1 / tau; a small tau strengthens it.

    Args:
        piv_gold_logprob: (B, T) pivot log-prob of each next token, with grad.
        aligned_row, aligned_pos: (A,) int64 chunk starts, sorted by (row, position).
        chunk_logprob: (A,) source log-likelihood of each chunk (contracts: `chunk_logprob`).
        num_positions: (B,) int64 valid positions per row.

    Returns:
        (chunk_losses (A,), chunk_lengths (A,) int64 number of pivot tokens per chunk).
        Chunk k starts at aligned position k, so the losses line up with the N = A aligned
        positions; mask prompt chunks with loss_mask[aligned_pos].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    piv_chunk, lengths = chunk_logprob_sum(
        piv_gold_logprob, aligned_row, aligned_pos, num_positions
    )  # (A,), (A,)
    a = (chunk_logprob.to(piv_chunk.dtype) / temperature).clamp(-_LOG_FLOOR, -eps)  # (A,)
    b = (piv_chunk / temperature).clamp(-_LOG_FLOOR, -eps)  # (A,)
    if distance == "kl":
        loss = a.exp() * (a - b) + (-torch.expm1(a)) * (log1mexp(a) - log1mexp(b))
    elif distance == "abs-log":
        loss = (a - b).abs() + (log1mexp(a) - log1mexp(b)).abs()
    else:
        raise ValueError(f"distance must be 'kl' or 'abs-log', got {distance!r}")
    return loss, lengths


@dataclass
class FusionInputs:
    """Everything a fusion loss may read for ONE source, gathered at N aligned pivot positions.

    The N positions are sorted by (row, position). Per-position fields are (N,) unless noted.
    The ALM fields are needed only by "alm"; the others ignore them.
    """

    piv_logits: Optional[torch.Tensor]  # (N, V) with grad; may be None for "fusellm" / "topk-kl" given piv_topk_logprob
    src_topk_ids: torch.Tensor  # (N, K) int64, -1 = empty slot
    src_topk_logits: torch.Tensor  # (N, K)
    src_lse: torch.Tensor
    src_mean: torch.Tensor
    src_std: torch.Tensor
    src_zlse: torch.Tensor
    src_gold_logprob: torch.Tensor
    piv_gold_logprob: torch.Tensor
    piv_row_gold_logprob: Optional[torch.Tensor] = None  # (B, T) with grad, for "alm"
    aligned_row: Optional[torch.Tensor] = None  # (N,) int64 row of each position
    aligned_pos: Optional[torch.Tensor] = None  # (N,) int64 pivot position in its row
    src_chunk_logprob: Optional[torch.Tensor] = None  # (N,)
    num_positions: Optional[torch.Tensor] = None  # (B,) int64
    piv_topk_logprob: Optional[torch.Tensor] = None  # (N, K) pivot log-probs at src_topk_ids (cheaper than piv_logits)
    piv_uld_stats: Optional[dict] = None  # `pivot_uld_stats` at the N positions (cheaper than piv_logits)


def _infifusion(x: FusionInputs, **cfg) -> tuple[torch.Tensor, torch.Tensor]:
    valid = valid_positions(x.src_topk_ids)
    if x.piv_uld_stats is not None:
        loss = uld_from_pivot_stats(
            x.piv_uld_stats, x.src_topk_logits, x.src_lse, x.src_mean, x.src_std, x.src_zlse,
            src_valid=x.src_topk_ids >= 0, **cfg,
        )
    else:
        loss = uld_loss(
            x.piv_logits, x.src_topk_logits, x.src_lse, x.src_mean, x.src_std, x.src_zlse,
            src_valid=x.src_topk_ids >= 0, **cfg,
        )
    return loss, valid


def _fusellm(x: FusionInputs, **cfg) -> tuple[torch.Tensor, torch.Tensor]:
    if x.piv_topk_logprob is not None:
        loss = soft_ce_from_logprobs(x.piv_topk_logprob, x.src_topk_ids, x.src_topk_logits, **cfg)
    else:
        loss = soft_ce_loss(x.piv_logits, x.src_topk_ids, x.src_topk_logits, **cfg)
    return loss, valid_positions(x.src_topk_ids)


def _topk_kl(x: FusionInputs, **cfg) -> tuple[torch.Tensor, torch.Tensor]:
    if x.piv_topk_logprob is not None:
        loss = topk_kl_from_logprobs(x.piv_topk_logprob, x.src_topk_ids, x.src_topk_logits, x.src_lse, **cfg)
    else:
        loss = topk_kl_loss(x.piv_logits, x.src_topk_ids, x.src_topk_logits, x.src_lse, **cfg)
    return loss, valid_positions(x.src_topk_ids)


def _alm(x: FusionInputs, **cfg) -> tuple[torch.Tensor, torch.Tensor]:
    needed = (
        "piv_row_gold_logprob", "aligned_row", "aligned_pos", "src_chunk_logprob", "num_positions"
    )
    missing = [name for name in needed if getattr(x, name) is None]
    if missing:
        raise ValueError(f"fusion loss 'alm' needs FusionInputs fields {missing}")
    loss, _ = alm_loss(
        x.piv_row_gold_logprob, x.aligned_row, x.aligned_pos, x.src_chunk_logprob,
        x.num_positions, **cfg,
    )
    return loss, torch.ones_like(loss, dtype=torch.bool)


# name -> fn(inputs: FusionInputs, **config) -> (per-position loss (N,), valid (N,) bool).
# The trainer multiplies loss by valid & its response / gate masks & source weights, sums, and adds
# the sum to the SFT term (fuse_trainer/train.py: micro_batch_terms). For "alm" position k carries the loss of the chunk starting
# there. Config kwargs are those of the wrapped function (uld_loss, soft_ce_loss, topk_kl_loss,
# alm_loss) after its positional tensors.
FUSION_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "infifusion": _infifusion,
    "fusellm": _fusellm,
    "topk-kl": _topk_kl,
    "alm": _alm,
}
# loss -> {keyword argument of its function: the training setting (fuse_trainer.config.TrainConfig) that gives it}
LOSS_SETTINGS: dict[str, dict[str, str]] = {
    "infifusion": {"top_k": "uld_top_k", "temperature": "fusion_temperature", "standardize": "standardize",
                   "normalize": "normalize"},
    "fusellm": {"temperature": "fusion_temperature"},
    "topk-kl": {},
    "alm": {"temperature": "alm_temperature", "distance": "alm_distance"},
}
