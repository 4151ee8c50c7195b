"""Weight-space merges of fine-tuned pivots (pairwise mode): task arithmetic and TIES.

A merge method is a pure function of state dicts (name -> tensor):
    fn(base, finetuned: list[state dict], weights: list[float], **options) -> merged state dict
registered in `MERGE_METHODS` (mergekit style). Floating-point tensors are merged in float32
(float64 stays float64) and cast back to the base tensor's dtype; non-float tensors (integer
buffers, masks) are copied from the base. `merge_checkpoints` applies a method to Hugging Face
checkpoint folders.
"""

import json
import math
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch

from fuse_trainer.checkpoint import write_folder

StateDict = dict[str, torch.Tensor]

# Tokenizer files copied from the base checkpoint next to the merged weights, when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _check_compatible(
    base: StateDict, finetuned: Sequence[StateDict], weights: Sequence[float]
) -> None:
    """Raise ValueError unless every model has the base's tensor names and shapes and a weight."""
    if len(finetuned) == 0:
        raise ValueError("need at least one fine-tuned model to merge")
    if len(weights) != len(finetuned):
        raise ValueError(f"got {len(weights)} weights for {len(finetuned)} fine-tuned models")
    for i, sd in enumerate(finetuned):
        if sd.keys() != base.keys():
            diff = sorted(set(sd) ^ set(base))[:5]
            raise ValueError(
                f"fine-tuned model {i} has different tensors than the base, e.g. {diff}"
            )
        for name, t in sd.items():
            if t.shape != base[name].shape:
                raise ValueError(
                    f"fine-tuned model {i}: {name} has shape {tuple(t.shape)}, base has "
                    f"{tuple(base[name].shape)}; models of different architectures cannot be merged"
                )


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _merge_each(
    base: StateDict,
    finetuned: Sequence[StateDict],
    weights: Sequence[float],
    merge_deltas: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> StateDict:
    """Apply `merge_deltas(deltas (S, *shape), weights (S,)) -> (*shape)` to every float tensor."""
    _check_compatible(base, finetuned, weights)
    merged = {}
    for name, b in base.items():
        if not b.is_floating_point():
            merged[name] = b.clone()
            continue
        dtype = _work_dtype(b)
        base_w = b.to(dtype)
        deltas = torch.stack([sd[name].to(dtype) - base_w for sd in finetuned])  # (S, *shape)
        w = torch.tensor(weights, dtype=dtype)  # (S,)
        merged[name] = (base_w + merge_deltas(deltas, w)).to(b.dtype)
    return merged


def task_arithmetic(
    base: StateDict, finetuned: Sequence[StateDict], weights: Sequence[float]
) -> StateDict:
    """Task arithmetic: theta = theta_base + sum_s w_s (theta_s - theta_base), per tensor."""

    def weighted_sum(deltas: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(w, deltas, dims=1)  # (*shape)

    return _merge_each(base, finetuned, weights, weighted_sum)


def ties_deltas(deltas: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-merge the task vectors of one tensor (Yadav et al. 2023): trim, elect, disjoint mean.

        trim:  d_s <- d_s with all but its ceil(density * numel) largest-|.| entries zeroed
        scale: d_s <- w_s d_s
        elect: sign = sign(sum_s d_s)                           (the sign of the larger total mass)
        merge: out = sum_{s agrees} d_s / #{s agrees},   agrees: d_s != 0 and sign(d_s) == sign
    Entries where no model agrees (or the elected sign is 0) stay 0.

    Args:
        deltas: (S, *shape) task vectors theta_s - theta_base.
        weights: (S,) per-model weights.

    Returns:
        (*shape) merged task vector.
    """
    S = deltas.shape[0]
    flat = deltas.reshape(S, -1)  # (S, P)
    keep = max(1, math.ceil(density * flat.shape[1]))
    idx = torch.topk(flat.abs(), keep, dim=1).indices  # (S, keep)
    trimmed = torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx))  # (S, P)
    scaled = trimmed * weights.unsqueeze(1)  # (S, P)
    sign = torch.sign(scaled.sum(dim=0))  # (P,)
    agree = (torch.sign(scaled) == sign) & (scaled != 0)  # (S, P)
    total = (scaled * agree).sum(dim=0)  # (P,)
    count = agree.sum(dim=0).clamp_min(1)  # (P,)
    return (total / count).reshape(deltas.shape[1:])


def ties(
    base: StateDict, finetuned: Sequence[StateDict], weights: Sequence[float], density: float = 0.2
) -> StateDict:
    """TIES-merging: theta = theta_base + ties_deltas(theta_s - theta_base, w, density), per tensor.

    Weights scale each trimmed task vector before sign election, so equal weights w reproduce the
    paper's TIES with scaling lambda = w; weight 0 removes a model; density 1 keeps every entry.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")

    def merge_deltas(deltas: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ties_deltas(deltas, w, density)

    return _merge_each(base, finetuned, weights, merge_deltas)


# name -> fn(base, finetuned, weights, **options) -> merged state dict.
MERGE_METHODS: dict[str, Callable[..., StateDict]] = {
    "task-arithmetic": task_arithmetic,
    "ties": ties,
}


def merge_checkpoints(
    base_dir: str | Path,
    finetuned_dirs: Sequence[str | Path],
    weights: Sequence[float],
    method: str,
    out_dir: str | Path,
    **options,
) -> Path:
    """Merge Hugging Face causal-LM checkpoints in weight space and save the result.

    Loads every folder with AutoModelForCausalLM.from_pretrained (stored dtype), merges the state
    dicts with MERGE_METHODS[method], loads the result into the base model (tied weights stay tied:
    they are one parameter), saves it with save_pretrained, copies the base's tokenizer files and
    writes merge_config.json (method, weights, options, inputs).

    Args:
        base_dir: the pivot before fine-tuning (theta_base).
        finetuned_dirs: one fine-tuned pivot per source.
        weights: one weight per fine-tuned pivot.
        method: a key of MERGE_METHODS.
        out_dir: written whole to a temporary sibling folder, then renamed over any earlier one.
        **options: method options, e.g. density for "ties".

    Returns:
        out_dir as a Path.
    """
    from transformers import AutoModelForCausalLM

    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {sorted(MERGE_METHODS)}")
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    for d in [base_dir, *map(Path, finetuned_dirs)]:
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d} is not a Hugging Face checkpoint (no config.json)")

    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    base_sd = {k: v.detach() for k, v in base_model.state_dict().items()}
    finetuned = []
    for d in finetuned_dirs:
        model = AutoModelForCausalLM.from_pretrained(d, dtype="auto")
        finetuned.append({k: v.detach() for k, v in model.state_dict().items()})
        del model
    merged = MERGE_METHODS[method](base_sd, finetuned, list(weights), **options)
    base_model.load_state_dict(merged, strict=True)

    record = {
        "method": method,
        "weights": list(map(float, weights)),
        "options": options,
        "base": str(base_dir),
        "finetuned": [str(d) for d in finetuned_dirs],
    }

    def write(tmp: Path) -> None:
        base_model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
        (tmp / "merge_config.json").write_text(json.dumps(record, indent=2) + "\n")

    write_folder(out_dir, write)
    return out_dir
