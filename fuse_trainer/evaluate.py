"""fuse-eval: held-out loss and bits per byte, per domain, for several models side by side.

Bits per byte is tokenizer-independent: the summed negative log-likelihood (nats) of the response
tokens, divided by ln 2 and by the number of UTF-8 bytes those tokens cover. Models with different
tokenizers (the pivot, its fused versions, the sources) are therefore compared on the same text.
A model that needs a BOS token (e.g. Gemma) reads it first; others start with the text's first token,
whose own bytes then cannot be predicted and are left out of that model's byte count.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from alignment import token_surface
from cache_builder.build import response_positions, tokenize
from cache_builder.corpus import Record
from cache_builder.models import load_model, load_tokenizer, resolve_model
from cache_builder.scoring import length_buckets, pad_right

MAX_TOKENS = 4096


@dataclass(frozen=True)
class EvalResult:
    model: str
    domain: str
    nll_nats: float  # summed over the response tokens
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / max(self.bytes, 1)

    @property
    def loss(self) -> float:
        return self.nll_nats / max(self.tokens, 1)


def evaluate_model(name: str, records: list[Record], *, label: str | None = None, device: str | torch.device = "cpu",
                   dtype=torch.float32, batch_tokens: int = 4096) -> list[EvalResult]:
    """Per-domain (and "all") results of one model over the given records, reported under `label`."""
    source = resolve_model(name)
    model = load_model(source, dtype=dtype, device=device)
    encoded = encode_records(records, load_tokenizer(source), source.add_bos)
    return score_records(model, encoded, records, label=label or name, batch_tokens=batch_tokens,
                         desc=f"fuse-eval {source.name}")


def encode_records(records: list[Record], tokenizer, add_bos: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids (T,), token byte ends (T,)) of every record, in the model's own tokenization."""
    surface = token_surface(tokenizer)
    return [tokenize(r.text, tokenizer, surface, add_bos, MAX_TOKENS) for r in records]


@torch.inference_mode()
def score_records(model, encoded: list[tuple[np.ndarray, np.ndarray]], records: list[Record], *, label: str,
                  batch_tokens: int = 4096, desc: str | None = None) -> list[EvalResult]:
    """Per-domain (and "all") results of a loaded model over records encoded by `encode_records`.

    desc: the progress bar's title (None: no bar, e.g. inside fuse-train's own bar)."""
    device = next(model.parameters()).device
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    buckets = length_buckets([len(ids) for ids, _ in encoded], batch_tokens)
    for bucket in tqdm(buckets, desc=desc, leave=False, disable=desc is None):
        ids, attention = pad_right([encoded[i][0] for i in bucket], device)  # (B, T)
        logits = model(input_ids=ids, attention_mask=attention).logits.float()  # (B, T, V)
        logprobs = (logits[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                    - torch.logsumexp(logits[:, :-1], -1)).cpu()  # (B, T-1), on the model's device until here
        for b, i in enumerate(bucket):
            token_ids, token_end = encoded[i]
            record = records[i]
            mask = response_positions(token_end, record.response_spans, len(record.text.encode()))  # (T-1,)
            predicted_bytes = np.diff(token_end)[mask]  # bytes of each predicted response token
            nll = -float(logprobs[b, : len(token_ids) - 1].numpy()[mask].sum())
            for key in (record.domain or "-", "all"):
                totals[key][0] += nll
                totals[key][1] += int(mask.sum())
                totals[key][2] += int(predicted_bytes.sum())
    return [EvalResult(label, d, *v) for d, v in sorted(totals.items())]


def results_table(results: list[EvalResult], split: str = "heldout") -> str:
    """Models as rows, domains as columns, bits per byte in the cells (lower is better)."""
    domains = sorted({r.domain for r in results} - {"all"}) + ["all"]
    models = list(dict.fromkeys(r.model for r in results))
    cell = {(r.model, r.domain): r.bits_per_byte for r in results}
    width = max(len(m) for m in models) + 2
    lines = [f"bits per byte on the {split} split (lower is better)", "model".ljust(width) + "".join(d.rjust(10) for d in domains)]
    for m in models:
        lines.append(m.ljust(width) + "".join(f"{cell.get((m, d), float('nan')):10.4f}" for d in domains))
    return "\n".join(lines)

