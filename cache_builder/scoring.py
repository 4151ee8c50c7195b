"""The scoring core: one trunk forward per batch, then the output layer in float32, chunk by chunk.

For each sequence of T token ids, position t (0 <= t < T-1) predicts token t+1 (docs/contracts.md). We keep
per position the top-k logits and the full-vocabulary statistics, never the [batch, seq, vocab] logits:

    hidden = trunk(ids)                       # (B, T, D) in the model's dtype, right-padded bucket
    h = hidden[real positions]                # (N, D), N = sum(T_b - 1)
    for each chunk of C positions:
        mean, std = moments(h[chunk])         # (C,) from the output weights alone (affine heads, see LogitMoments)
        logits = head(h[chunk]) in float32    # (C, V)  the only vocab-wide tensor (plus one scratch buffer)
        top-k by strided group maxima, then log_softmax(logits) and log_softmax(logits / std): three reads
        logsumexp, z-logsumexp, gold log-prob -> CPU numpy

Every statistic is over every output row, padded vocabulary rows included (Qwen2.5: 151,936 rows for 151,665
tokens): they are what the model computes. Peak extra memory is about 2 x position_chunk x V x 4 bytes (Gemma-3,
V=262,144, chunk 128: ~0.27 GB).

Exactness: on CPU in float32, a sequence scored alone or inside a padded batch agrees within 1e-5 (right
padding cannot reach real positions under a causal mask; only matmul blocking differs). Determinism: the same
batch (same sequences in the same order), position_chunk, dtype, device, library versions and thread count
give bitwise identical arrays on CPU; on CUDA the kernels used here (GEMM, SDPA forward, topk, reductions) are
run-to-run deterministic for identical shapes on the same GPU and library versions. A byte-for-byte resume must
therefore rebuild the same batches (see `length_buckets`, which is deterministic).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

STD_FLOOR = 1e-30  # keeps logits / std finite for |logits| < 3e8; a smaller std means constant float32 logits
FIELDS = ("topk_ids", "topk_logits", "logsumexp", "logit_mean", "logit_std", "z_logsumexp", "gold_logprob")


@dataclass
class ScoredSequence:
    """Per-position outputs for one sequence of T tokens (docs/contracts.md, "Scoring core output")."""

    topk_ids: np.ndarray  # (T-1, K) int32, by descending logit
    topk_logits: np.ndarray  # (T-1, K) float32, sorted descending
    logsumexp: np.ndarray  # (T-1,) float32, over the full vocabulary (every output row)
    logit_mean: np.ndarray  # (T-1,) float32
    logit_std: np.ndarray  # (T-1,) float32, population std (correction 0)
    z_logsumexp: np.ndarray  # (T-1,) float32, logsumexp of (logits - mean) / std
    gold_logprob: np.ndarray  # (T-1,) float32, log-prob of token t+1 at position t


@dataclass(frozen=True)
class LogitMoments:
    """The mean and the population std over the vocabulary of an affine head's logits, as functions of h.

    With rows a_v = [w_v, b_v] and h' = [h, 1], the logit of row v is z_v = scale * a_v . h'. So
    mean_v z_v = (scale * mean_v a_v) . h' and var_v z_v = h'^T (scale^2 * Cov_v a_v) h': one (D+1)-vector and
    one (D+1) x (D+1) matrix, computed once per model in float64 from the centred rows (no cancellation), give
    both statistics of every position as a matrix product, without reading the (positions x V) logits.
    """

    mean_row: torch.Tensor  # (D+1,) float64
    covariance: torch.Tensor  # (D+1, D+1) float64, symmetric positive semi-definite

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
           block_rows: int = 16384) -> LogitMoments:
        """From the (V, D) weight, the (V,) bias or None and the scale; rows in blocks (no float64 copy of W)."""
        V, D = weight.shape

        def rows(start: int) -> torch.Tensor:  # (block, D+1) float64 augmented rows [w_v, b_v]
            block = weight[start:start + block_rows].double()
            last = (bias[start:start + block_rows].double() if bias is not None
                    else block.new_zeros(block.shape[0]))
            return torch.cat([block, last[:, None]], dim=1)

        starts = range(0, V, block_rows)
        mean_row = sum(rows(start).sum(dim=0) for start in starts) / V  # (D+1,)
        covariance = torch.zeros((D + 1, D + 1), dtype=torch.float64, device=weight.device)
        for start in starts:
            centred = rows(start) - mean_row  # (block, D+1)
            covariance.addmm_(centred.T, centred)
        return cls(mean_row=mean_row * scale, covariance=covariance * (scale * scale / V))

    def mean_std(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, D) hidden states, as the head multiplies them -> (C,) mean and (C,) population std, float64."""
        h = torch.cat([hidden.double(), hidden.new_ones((hidden.shape[0], 1), dtype=torch.float64)], dim=1)
        variance = (h @ self.covariance * h).sum(dim=1).clamp_min_(0.0)  # (C,)
        return h @ self.mean_row, variance.sqrt_()


@dataclass(frozen=True)
class OutputHead:
    """The output layer, producing float32 logits: logits = cap(scale * (h @ weight.T + bias)).

    weight is float32, except for a half-precision model on CUDA: there it stays in the model's dtype and one
    GEMM with float32 output (`torch.mm(..., out_dtype=torch.float32)`) forms the same products of the same
    rounded inputs, accumulated in float32, at half-precision tensor-core speed and half the memory.
    moments: the logits' mean and std in closed form (`output_head` sets it when there is no softcap, which
    makes the head affine); without it `score_positions` computes both from the logits.
    """

    weight: torch.Tensor  # (V, D) float32, or the model's bf16/fp16 on CUDA
    bias: torch.Tensor | None  # (V,) float32
    scale: float  # Cohere's logit_scale, 1 / Granite's logits_scaling, else 1
    softcap: float | None  # Gemma-family final_logit_softcapping: cap * tanh(logits / cap)
    moments: LogitMoments | None = None

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) hidden states of any float dtype -> (N, V) float32 logits, written into `out` when given
        (float32 weights only; the CUDA half path allocates from the caching allocator)."""
        if self.weight.dtype == torch.float32:
            logits = torch.mm(hidden.float(), self.weight.T, out=out)  # (N, V)
        else:
            logits = torch.mm(hidden.to(self.weight.dtype), self.weight.T, out_dtype=torch.float32)  # (N, V)
        if self.bias is not None:
            logits.add_(self.bias)
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits


def half_gemm_to_float32(weight: torch.Tensor) -> bool:
    """Whether this half-precision weight can be multiplied with float32 output (CUDA, torch >= 2.8)."""
    if not (weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)):
        return False
    try:
        torch.mm(weight[:1], weight[:1].T, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False
    return True


def output_head(model: torch.nn.Module, verify: bool = True) -> OutputHead:
    """Read the model's output layer into an OutputHead (a float32 copy if the model is not float32, except
    half-precision weights on CUDA, kept as they are: see OutputHead).

    `score_batch` caches one per model (`cached_output_head`); pass your own to control it. With verify, one
    short forward checks it against the model's own logits, so an unhandled output transform fails loudly here.
    An affine head (no softcap) gets its LogitMoments here, once: one float64 pass over the weight.
    """
    layer = model.get_output_embeddings()
    if layer is None or not hasattr(layer, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding layer; pass a *ForCausalLM model")
    config = model.config.get_text_config()
    bias = getattr(layer, "bias", None)
    scale = float(getattr(model, "logit_scale", None) or 1.0)
    if config.model_type.startswith("granite") and getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    weight = layer.weight.detach()
    if not half_gemm_to_float32(weight):
        weight = weight.float()
    bias = None if bias is None else bias.detach().float()
    softcap = getattr(config, "final_logit_softcapping", None) or None
    head = OutputHead(weight=weight, bias=bias, scale=scale, softcap=softcap,
                      moments=None if softcap else LogitMoments.of(weight, bias, scale))
    if verify:
        verify_output_head(model, head)
    return head


HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weight key, verified OutputHead)


def cached_output_head(model: torch.nn.Module) -> OutputHead:
    """`output_head(model)` built and verified once per model, rebuilt if the output weight is replaced or
    updated in place (tracked by the tensor's storage pointer and version counter)."""
    weight = model.get_output_embeddings().weight
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
    cached = HEADS.get(model)
    if cached is None or cached[0] != key:
        cached = (key, output_head(model))
        HEADS[model] = cached
    return cached[1]


def verify_output_head(model: torch.nn.Module, head: OutputHead, probe_len: int = 8) -> None:
    """Compare `head` on the trunk's hidden states with `model(ids).logits` on a short probe; raise if apart.

    Tolerance: 1e-4 of the logit range in float32, 2e-2 in half types (the model's own head rounds there).
    """
    device = model_device(model)
    ids = torch.arange(min(probe_len, head.weight.shape[0]), device=device)[None]  # (1, P)
    with torch.inference_mode():
        reference = model(input_ids=ids, use_cache=False).logits[0].float()  # (P, V)
        ours = head.logits(trunk_hidden(model, ids, torch.ones_like(ids))[0])  # (P, V)
    rel = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    worst = (ours - reference).abs().max().item()
    if worst > 1e-4 + rel * reference.abs().max().item():
        raise ValueError(
            f"{type(model).__name__}: hidden states projected by the output layer differ from the model's own logits "
            f"by {worst:.3g}; its forward applies an output transform cache_builder.scoring.output_head does not "
            f"handle yet: add it there"
        )


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def trunk_hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ids and attention mask -> (B, T, D) final hidden states of the decoder trunk (final norm applied)."""
    decoder = model.get_decoder()
    if decoder is model:
        raise ValueError(f"{type(model).__name__}.get_decoder() returns the model itself; pass a *ForCausalLM model")
    return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def pad_right(sequences: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest: (B, T) int64 ids (pad id 0) and (B, T) int64 attention mask."""
    width = max(len(seq) for seq in sequences)
    ids = np.zeros((len(sequences), width), dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = np.asarray(seq, dtype=np.int64)
        mask[row, : len(seq)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def top_k_by_groups(logits: torch.Tensor, k: int, group_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row, sorted descending, and their column ids: (C, V) -> (C, k), (C, k).

    Columns j, j+n, ..., j+(group_size-1)n form group j (n = V // group_size; the < group_size columns past
    group_size * n are always candidates). The k groups with the largest maxima hold k distinct elements at least
    as large as the k-th largest logit, and every group that holds a top-k logit either is among them or has a
    maximum no larger than all of theirs; so the top-k values of those k groups are the row's top-k values.
    One vectorised max over the row and a top-k over V / group_size maxima replace a top-k over V; ids may
    differ from torch.topk's only between exactly equal logits.
    """
    C, V = logits.shape
    n = V // group_size
    if n <= k:
        return torch.topk(logits, k, dim=-1, sorted=True)
    group_max = logits[:, : n * group_size].view(C, group_size, n).amax(dim=1)  # (C, n)
    groups = torch.topk(group_max, k, dim=-1, sorted=False).indices  # (C, k)
    members = torch.arange(0, n * group_size, n, device=logits.device)  # (group_size,)
    candidates = (groups[:, :, None] + members).flatten(1)  # (C, k * group_size)
    tail = torch.arange(n * group_size, V, device=logits.device).expand(C, -1)  # (C, V - n * group_size)
    candidates = torch.cat([candidates, tail], dim=1)  # (C, M)
    top_logits, order = torch.topk(logits.gather(1, candidates), k, dim=-1, sorted=True)  # (C, k)
    return top_logits, candidates.gather(1, order)


def direct_moments(logits: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V) logits -> (C,) mean and (C,) population std, read from the logits (for heads that are not affine);
    scratch: (C, V) float32, overwritten."""
    mean = logits.mean(dim=-1)  # (C,)
    centred = torch.sub(logits, mean[:, None], out=scratch)  # (C, V)
    return mean, torch.linalg.vector_norm(centred, dim=-1) / logits.shape[-1] ** 0.5


def exp_sums(logits: torch.Tensor, row_max: torch.Tensor, inv_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V) logits, (C,) row maxima and (C,) 1 / std -> (C,) sum exp(logits - max) and (C,) sum exp((logits - max)
    / std): both normalisers of a chunk. Eager, this allocates; compiled (`compiled_exp_sums`), one read of the chunk."""
    shifted = logits - row_max[:, None]  # (C, V)
    return shifted.exp().sum(dim=-1), (shifted * inv_std[:, None]).exp().sum(dim=-1)


@functools.cache
def compiled_exp_sums():
    """`exp_sums` compiled once per process (inductor: a C++/OpenMP kernel on CPU, Triton on CUDA), dynamic in C."""
    return torch.compile(exp_sums, dynamic=True)


def fused_normalisers(logits: torch.Tensor, row_max: torch.Tensor, safe_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V) logits -> (C,) log sum exp(logits - max) and (C,) log sum exp((logits - max) / std), in one compiled
    read; a ValueError naming the fix when torch.compile cannot build the kernel here (no C++ compiler, no Triton)."""
    try:
        plain, scaled = compiled_exp_sums()(logits, row_max, 1.0 / safe_std)
    except Exception as err:  # inductor raises many types (BackendCompilerFailed, InductorError, CalledProcessError)
        raise ValueError(f"--fused-epilogue needs torch.compile to build a kernel on {logits.device.type}, which "
                         f"failed ({type(err).__name__}): install a C++ compiler (CPU) or Triton (CUDA), or drop "
                         f"--fused-epilogue") from None
    return plain.log(), scaled.log()


def score_positions(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, top_k: int,
                    buffers: torch.Tensor, fused: bool = False) -> dict:
    """(C, D) hidden states and (C,) next-token ids -> per-position tensors of one chunk, on the model's device.

    buffers: (2, >= C, V) float32 scratch, overwritten: the logits and one temporary live there, so a chunk
    allocates no vocabulary-wide tensor (on CPU each fresh one costs page faults on every 4 KiB page).
    After the output GEMM, an affine head's chunk is read three times: the group maxima of the top-k, the
    logits divided by the std into the scratch buffer, then two log_softmax kernels, each in place (each keeps
    its row in cache for its max, exp-sum and write, and writes to memory it has just read): one of the scaled
    logits (the standardized logsumexp), one of the logits (logsumexp and gold log-prob).
    fused: both normalisers from one compiled read of the chunk instead (`fused_normalisers`); the gold log-prob is
    then the gold logit less the logsumexp. Same top-k; the statistics agree with the eager path within 1e-5.
    """
    C = hidden.shape[0]
    logits = head.logits(hidden, out=buffers[0, :C])  # (C, V) float32
    if head.moments is not None:
        mean, std = (moment.float() for moment in head.moments.mean_std(hidden.to(head.weight.dtype)))  # (C,)
    else:
        mean, std = direct_moments(logits, buffers[1, :C])
    top_logits, top_ids = top_k_by_groups(logits, top_k)  # (C, K)
    row_max, argmax = top_logits[:, 0], top_ids[:, :1]  # (C,), (C, 1)
    safe_std = std.clamp_min(STD_FLOOR)  # (C,)
    if fused:
        log_sum, z_log_sum = fused_normalisers(logits, row_max, safe_std)  # (C,), (C,)
        lse = row_max + log_sum  # (C,)
        return {"topk_ids": top_ids.int(), "topk_logits": top_logits, "logsumexp": lse, "logit_mean": mean,
                "logit_std": std, "z_logsumexp": (row_max - mean) / safe_std + z_log_sum,
                "gold_logprob": logits.gather(1, targets[:, None])[:, 0] - lse}
    scaled = torch.div(logits, safe_std[:, None], out=buffers[1, :C])  # (C, V)
    z_log_probs = torch.log_softmax(scaled, dim=-1, out=scaled)  # (C, V)
    z_lse = (row_max - mean) / safe_std - z_log_probs.gather(1, argmax)[:, 0]  # (C,) logsumexp((logits - mean) / std)
    log_probs = torch.log_softmax(logits, dim=-1, out=logits)  # (C, V)
    lse = row_max - log_probs.gather(1, argmax)[:, 0]  # (C,) = row_max + log sum exp(logits - row_max)
    gold = log_probs.gather(1, targets[:, None])[:, 0]  # (C,)
    return {"topk_ids": top_ids.int(), "topk_logits": top_logits, "logsumexp": lse, "logit_mean": mean,
            "logit_std": std, "z_logsumexp": z_lse, "gold_logprob": gold}


def scoring_buffers(model: torch.nn.Module, position_chunk: int) -> torch.Tensor:
    """(2, position_chunk, V) float32 scratch for `score_batch`, on the model's device: allocate it once per job
    and pass it to every batch. On CPU a fresh buffer this size costs a page fault per 4 KiB page in every batch
    (Gemma-3, chunk 256: 0.5 GB, 131,072 faults)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return torch.empty((2, position_chunk, vocab), dtype=torch.float32, device=model_device(model))


def score_batch(model: torch.nn.Module, sequences: Sequence[Sequence[int] | np.ndarray], top_k: int,
                position_chunk: int = 128, head: OutputHead | None = None,
                buffers: torch.Tensor | None = None, fused: bool = False) -> list[ScoredSequence]:
    """Score a bucket of token id sequences with one trunk forward; returns one ScoredSequence per sequence.

    sequences: token ids, each of length >= 1 (a length-1 sequence has no positions and gives empty arrays).
    position_chunk: positions projected to the vocabulary at once (bounds memory, see the module docstring).
    head: `output_head(model)`; when omitted, a verified head cached per model is used.
    buffers: `scoring_buffers(model, position_chunk)`, reused across batches; when omitted, allocated here.
    fused: the normalisers from one compiled read of each chunk (`score_positions`).
    """
    if not sequences or min(len(seq) for seq in sequences) < 1:
        raise ValueError("score_batch needs a non-empty list of non-empty token id sequences")
    head = head if head is not None else cached_output_head(model)
    vocab = head.weight.shape[0]
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k} must be between 1 and the vocabulary size {vocab}")
    device = model_device(model)
    ids, mask = pad_right(sequences, device)  # (B, T), (B, T)
    with torch.inference_mode():
        hidden = trunk_hidden(model, ids, mask)  # (B, T, D)
        scored = mask[:, 1:].bool()  # (B, T-1): position t of row b predicts a real token t+1
        flat_hidden = hidden[:, :-1][scored]  # (N, D), row by row, position by position
        targets = ids[:, 1:][scored]  # (N,)
        if buffers is None:
            buffers = scoring_buffers(model, min(position_chunk, len(targets)))
        elif buffers.shape[0] != 2 or buffers.shape[1] < min(position_chunk, len(targets)) or buffers.shape[2] != vocab:
            raise ValueError(f"buffers of shape {tuple(buffers.shape)} cannot hold chunks of {position_chunk} "
                             f"positions over {vocab} logits; make them with scoring_buffers(model, position_chunk)")
        chunks = [score_positions(head, flat_hidden[start:start + position_chunk],
                                  targets[start:start + position_chunk], top_k, buffers, fused)
                  for start in range(0, flat_hidden.shape[0], position_chunk)]
        # one copy to the host per field and batch, after every chunk: a GPU never waits on a copy between chunks
        merged = {name: torch.cat([chunk[name] for chunk in chunks]).cpu().numpy() for name in FIELDS} if chunks else None
    return split_sequences(merged, [len(seq) - 1 for seq in sequences], top_k)


def split_sequences(merged: dict[str, np.ndarray] | None, positions: list[int], top_k: int) -> list[ScoredSequence]:
    """Cut the batch's per-position arrays (all positions, row by row) into one ScoredSequence per sequence."""
    if merged is None:
        merged = {name: np.zeros((0, top_k) if name.startswith("topk") else (0,),
                                 dtype=np.int32 if name == "topk_ids" else np.float32) for name in FIELDS}
    cuts = np.cumsum(positions)[:-1]
    per_field = {name: np.split(array, cuts) for name, array in merged.items()}
    return [ScoredSequence(**{name: per_field[name][row] for name in FIELDS}) for row in range(len(positions))]


def length_buckets(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices by ascending length (ties by index) so that max_len * batch_size <= batch_tokens.

    A sequence longer than the budget forms a batch of its own. Deterministic: same input, same batches.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if current and lengths[index] * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
