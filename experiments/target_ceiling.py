"""How much of a source's lead survives into its cached targets? Bits per byte of the targets as a predictor.

    python -m experiments.target_ceiling out/repro/cache --source qwen --model sft=out/repro/runs/sft/final \
        [--split heldout] [--pivot smollm2]

Top-k KL asks the pivot to copy, at every aligned position, the source's top-k candidates mapped into the
pivot's vocabulary. If it copied them exactly, and kept its own distribution for the rest, it would predict

    p*(v) = q(v)                                   for the K mapped candidates v (q: the source's probabilities)
    p*(v) = (1 - sum q) * p(v) / (1 - sum_C p)     for every other token, the model's own tail rescaled
    p*(v) = p(v)                                   at positions with no aligned target

a proper distribution over the pivot's vocabulary at every position, so its bits per byte on the split's gold
text is a code length, comparable with fuse-eval's. It bounds what identity-aware distillation from this cache
can teach about that text. A ceiling near the source's own bits per byte means the cache carries the source's
lead and the loss fails to pass it on; a ceiling near the model's means the lead is lost between the two
tokenizers (unpaired positions, other events, the truncation to K).

Prints a table per domain: the share of response positions with an aligned target and with a target that names
the gold token, the model's bits per byte, the ceiling's, and the `--gate candidate` ceiling (p* where the targets
name the gold token, the model elsewhere: what that gate distils toward; the choice uses the gold token, so it
is a diagnostic, not a code length). Then, per kind of position (same event for both tokenizers or not, targets
naming the gold token or not, no target), the model's and the ceiling's nats per token and what they add up to. Reads the cache and runs
the given pivot model once over the split; no source model is loaded.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import numpy as np
import torch


from cache_builder.models import load_model, resolve_model
from cache_builder.reader import read_rows
from fuse_trainer.data import discover_sources
from experiments.target_agreement import same_event

COLUMNS = ["domain", "split", "token_ids", "token_end", "loss_mask", "aligned_pos", "src_pos", "topk_ids",
           "topk_logits", "logsumexp"]


def ceiling_logprobs(model_logprobs: np.ndarray, gold: np.ndarray, aligned_pos: np.ndarray, topk_ids: np.ndarray,
                     topk_logits: np.ndarray, logsumexp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log p*(gold) at every position of one record, and where the targets name the gold token.

    model_logprobs (T-1, V) the model's log-probabilities, gold (T-1,) the next tokens; aligned_pos (A,),
    topk_ids (A, K) with -1 in empty slots, topk_logits (A, K), logsumexp (A,). Returns (T-1,) float64 and
    (T-1,) bool (True where the gold token is among the mapped candidates).
    """
    out = model_logprobs[np.arange(len(gold)), gold].astype(np.float64)  # (T-1,) the model alone
    valid = topk_ids >= 0  # (A, K)
    q = np.where(valid, np.exp(topk_logits.astype(np.float64) - logsumexp[:, None]), 0.0)  # (A, K)
    ids = np.where(valid, topk_ids, 0)
    p_cand = np.where(valid, np.exp(model_logprobs[aligned_pos[:, None], ids].astype(np.float64)), 0.0)  # (A, K)
    g = gold[aligned_pos]  # (A,)
    is_gold = valid & (ids == g[:, None])  # (A, K)
    in_set = is_gold.any(axis=1)
    tail = np.clip(1.0 - q.sum(1), 1e-12, None) / np.clip(1.0 - p_cand.sum(1), 1e-12, None)  # (A,)
    from_set = np.log(np.clip((q * is_gold).sum(1), 1e-30, None))  # (A,) used only where in_set
    out[aligned_pos] = np.where(in_set, from_set, out[aligned_pos] + np.log(tail))
    named = np.zeros(len(gold), dtype=bool)
    named[aligned_pos] = in_set
    return out, named


def position_kinds(n_positions: int, aligned_pos: np.ndarray, src_pos: np.ndarray, named: np.ndarray) -> np.ndarray:
    """(T-1,) label of each position: unaligned, or single / multi (the same event for both tokenizers or not)
    joined with named / absent (the targets name the gold token or not)."""
    kinds = np.full(n_positions, "unaligned", dtype=object)
    event = np.where(same_event(aligned_pos, src_pos), "single", "multi")
    kinds[aligned_pos] = event + np.where(named[aligned_pos], "+named", "+absent")
    return kinds


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", help="cache root with <source>/aligned/<pivot>/")
    ap.add_argument("--source", default="qwen")
    ap.add_argument("--model", default="pivot=smollm2", help="LABEL=MODEL: the pivot model whose tail fills p*")
    ap.add_argument("--pivot", default="smollm2")
    ap.add_argument("--split", default="heldout")
    a = ap.parse_args()
    label, _, name = a.model.rpartition("=")
    folder = discover_sources(a.cache, a.pivot, [a.source])[a.source]
    rows = read_rows(folder, COLUMNS)
    model = load_model(resolve_model(name), dtype=torch.float32, device="cpu")
    # per domain: nats of the model, the ceiling, the candidate-gated ceiling; bytes; positions; aligned; named
    totals: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(7))
    # per (domain, kind of position): positions, nats of the model, nats of the ceiling
    by_kind: dict[tuple[str, str], np.ndarray] = defaultdict(lambda: np.zeros(3))
    for i in np.flatnonzero(rows["split"] == a.split):
        ids = rows["token_ids"].row(i)
        logits = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits[0, :-1].float()  # (T-1, V)
        logprobs = torch.log_softmax(logits, -1).numpy()
        gold, mask = ids[1:].astype(np.int64), rows["loss_mask"].row(i)  # (T-1,)
        pos = rows["aligned_pos"].row(i)
        star, named = ceiling_logprobs(logprobs, gold, pos, rows["topk_ids"].row(i), rows["topk_logits"].row(i),
                                       rows["logsumexp"].row(i))
        own = logprobs[np.arange(len(gold)), gold].astype(np.float64)
        gated = np.where(named, star, own)  # what `--gate candidate` distils toward
        aligned = np.zeros(len(gold), dtype=bool)
        aligned[pos] = True
        nbytes = np.diff(rows["token_end"].row(i))[mask].sum()
        figures = [-own[mask].sum(), -star[mask].sum(), -gated[mask].sum(), nbytes, mask.sum(),
                   (aligned & mask).sum(), (named & mask).sum()]
        kinds = position_kinds(len(gold), pos, rows["src_pos"].row(i), named)
        for key in (str(rows["domain"][i]), "all"):
            totals[key] += figures
            for kind in np.unique(kinds[mask]):
                sel = mask & (kinds == kind)
                by_kind[(key, kind)] += [sel.sum(), -own[sel].sum(), -star[sel].sum()]
    print(f"{a.split} split, pivot model {label or name}, targets of {a.source} from {folder}")
    print(f"{'domain':10s}{'aligned':>9s}{'named':>7s}{'model bpb':>11s}{'ceiling bpb':>13s}{'gated bpb':>11s}")
    for dom, (m, c, g, nbytes, n, na, nn) in sorted(totals.items()):
        bpb = [x / math.log(2) / nbytes for x in (m, c, g)]
        print(f"{dom:10s}{na / n:9.3f}{nn / n:7.3f}{bpb[0]:11.4f}{bpb[1]:13.4f}{bpb[2]:11.4f}")
    print("\nper kind of position (nats per token; the ceiling's total minus the model's)")
    print(f"{'domain':10s}{'kind':16s}{'share':>7s}{'model':>8s}{'ceiling':>9s}{'total Δ nats':>14s}")
    for (dom, kind), (n, m, c) in sorted(by_kind.items()):
        print(f"{dom:10s}{kind:16s}{n / totals[dom][4]:7.3f}{m / n:8.3f}{c / n:9.3f}{c - m:+14.1f}")


if __name__ == "__main__":
    main()
