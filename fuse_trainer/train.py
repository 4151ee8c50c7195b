"""fuse-train: train the pivot from cached source signals. No source model is loaded, ever.

One run, top to bottom:
  1. find the sources aligned to the pivot under the cache root, verify them, join them by record id;
  2. load the pivot, AdamW, a warmup + cosine schedule; resume from the run's checkpoint if asked;
  3. each optimizer step takes `grad_accum` token-budgeted micro-batches (this rank takes every
     world_size-th), computes (1-λ)·SFT + λ·fusion normalised by the step's response tokens (with
     `lambda_scope: distilled`, λ only where a source is distilled: elsewhere SFT keeps weight 1; records of a
     `distill_only_splits` split, text the pivot wrote itself, get the fusion term alone at weight 1), plus
     `graph_weight` times InfiGFusion's graph term (fuse_trainer/graph_loss.py) where it is on, all-reduces
     the gradients, clips and steps; metrics go to metrics.jsonl and the progress bar; every `eval_every` steps the
     pivot is scored on the `eval_split` records (fuse_trainer/validation.py), and `keep_best` keeps the best step;
  4. saves a Hugging Face checkpoint with the resolved config and the caches' fingerprints.
With --fsdp each rank holds a shard of the pivot, its gradients and AdamW state instead of a full copy
(fuse_trainer.sharding): same steps, sharded checkpoints, and the final model gathered into one folder.
Pairwise mode runs 1-4 once per source, then merges the pivots in weight space.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from cache_builder.format import write_text_atomic
from cache_builder.models import load_model, load_tokenizer, pick_device, resolve_model
from cache_builder.store import VerifiedLayer, ShardStore
from fuse_trainer.checkpoint import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    STATE_FILE,
    clear_run,
    keep_metrics_until,
    provenance_of,
    recover_checkpoint,
    refuse_other_settings,
    save_checkpoint,
    save_final,
    save_hf,
)
from fuse_trainer.config import TrainConfig, dump_yaml
from fuse_trainer.data import (Batch, FusionData, check_domain_epochs, check_named_sources, check_pivot,
                                 check_source_domains, check_sources, check_statistics, collate, discover_sources,
                                 refuse_unverified)
from fuse_trainer.gates import teacher_gate
from fuse_trainer.graph_loss import graph_loss
from fuse_trainer.guard import stop_if_not_finite
from fuse_trainer.losses import (FUSION_LOSSES, FusionInputs, chunk_spans, pivot_uld_stats, record_ratio, sft_loss,
                                 valid_positions)
from fuse_trainer.sharding import (
    check_checkpoint_kind,
    consolidated_state_dict,
    full_value,
    load_sharded_checkpoint,
    load_sharded_pivot,
    save_sharded_checkpoint,
)
from fuse_trainer.stream import MicroBatchStream
from fuse_trainer.validation import Validator, cache_records, evaluate_merged
from fuse_trainer.weighting import record_chunk_ce, source_weights, topk_entropy

# summed per step; objective_sum is the loss before the division by the step's response tokens
TERMS = ("objective_sum", "sft_sum", "fusion_sum", "n_tokens", "kept_mass_sum", "gated_in", "fusion_positions",
         "graph_sum")


# ----------------------------------------------------------------------------------------------
# The loss of one micro-batch
# ----------------------------------------------------------------------------------------------


def logprobs_at(logits: torch.Tensor, log_z: torch.Tensor, row: torch.Tensor, pos: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) normaliser -> (N, K) log-probs at `ids` (N, K) of positions (row, pos) (N,); an empty
    slot (id -1) reads id 0."""
    return logits[row[:, None], pos[:, None], ids.clamp_min(0)] - log_z[row, pos].unsqueeze(-1)


def source_graph_sum(logits: torch.Tensor, log_z: torch.Tensor, src, include: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """One source's GLD term (fuse_trainer.graph_loss) summed over the batch's records, each record's loss counted
    once per position it reads (so dividing by the step's response tokens gives a per-token mean, like the other
    terms) and times the record's source weight (B,). include (N,): the aligned positions the graph is built from."""
    at = include.nonzero().squeeze(-1)  # (M,) the positions read
    row, ids = src.row[at], src.topk_ids[at]  # (M,), (M, K)
    piv_p = logprobs_at(logits, log_z, row, src.pos[at], ids).exp()  # (M, K) pivot probabilities at the candidates
    src_p = (src.topk_logits[at] - src.lse[at].unsqueeze(-1)).exp()  # (M, K) source probabilities
    per_record = graph_loss(src_p, piv_p, ids, row, len(weights))  # (B,)
    return (per_record * torch.bincount(row, minlength=len(weights)) * weights).sum()


def gold_logprobs(logits: torch.Tensor, labels: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T), (B, T) normaliser -> (B, T) log-prob of each label, no (B, T, V) log-softmax copy."""
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_z


def source_scores(batch: Batch, cfg: TrainConfig) -> torch.Tensor:
    """(S, B) per-record cost of each source for the unified weighting (+inf: no aligned response position).

    entropy: the mean top-k entropy over the record's aligned response positions; otherwise the source's CE on
    the gold text in nats per pivot token (`record_chunk_ce`), one unit for every tokenizer.
    """
    scores = []
    B, T = batch.input_ids.shape
    for src in batch.sources.values():
        keep = batch.loss_mask[src.row, src.pos]  # (N,) chunks that start at a response position
        if cfg.weighting == "entropy":
            kept = keep.float()  # (N,)
            entropy = topk_entropy(src.topk_logits, src.lse)  # (N,)
            scores.append(record_ratio(entropy * kept, kept, src.row, B).float())
        else:
            start, end = chunk_spans(src.row, src.pos, batch.num_positions, T)  # (N,) flat pivot spans
            chunk = src.chunk_logprob  # uniform reads availability only: a missing (NaN) chunk of an imported cache is 0
            chunk = torch.where(chunk.isnan(), 0.0, chunk) if cfg.weighting == "uniform" else chunk
            scores.append(record_chunk_ce(chunk, end - start, src.row, keep, B))
    return torch.stack(scores)  # (S, B)


def micro_batch_terms(model, batch: Batch, cfg: TrainConfig, lam: float | None = None) -> dict[str, torch.Tensor]:
    """Summed SFT and fusion terms of one micro-batch, plus the figures logged per step; `lam`: this step's λ
    (`fusion_weight`), default `cfg.lam`."""
    lam = cfg.lam if lam is None else lam
    device_type = batch.input_ids.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits.float()  # (B, T, V)
    terms = {"fusion_sum": logits.new_zeros(()), "kept_mass_sum": logits.new_zeros(()), "gated_in": logits.new_zeros(()),
             "fusion_positions": logits.new_zeros(()), "graph_sum": logits.new_zeros(())}
    if cfg.mode == "sft" or (cfg.lam == 0.0 and not cfg.graph_weight and bool(batch.gold_text.all())):
        sft_sum, n_tokens = sft_loss(logits, batch.labels, batch.loss_mask)
        return {**terms, "objective_sum": sft_sum, "sft_sum": sft_sum, "n_tokens": n_tokens.float()}
    log_z = torch.logsumexp(logits, dim=-1)  # (B, T): one pass over the vocabulary, shared by every term
    piv_gold = gold_logprobs(logits, batch.labels, log_z)  # (B, T)
    ce = -(piv_gold * (batch.loss_mask & batch.gold_text[:, None]))  # (B, T) per-position SFT loss, gold text only
    terms["sft_sum"] = ce.sum()  # = sft_loss over the gold records
    terms["n_tokens"] = batch.loss_mask.sum().float()
    fusion_scale = torch.where(batch.gold_text, lam, 1.0).to(logits.dtype)  # (B,) λ, or 1 without gold text
    fusion_objective = logits.new_zeros(())
    weights = source_weights(source_scores(batch, cfg), cfg.weighting, cfg.weighting_temperature)
    distilled = torch.zeros_like(batch.loss_mask, dtype=logits.dtype)  # (B, T) summed source weight distilled there
    uld_stats = (pivot_uld_stats(logits, cfg.uld_top_k, cfg.standardize, cfg.normalize == "full")  # once for every source
                 if cfg.loss == "infifusion" else None)
    for s, (name, src) in enumerate(batch.sources.items()):
        keep = batch.loss_mask[src.row, src.pos]  # (N,) response positions only
        if cfg.loss == "infifusion":  # ULD needs no vocabulary map: the native top-k, every slot valid
            topk_ids, topk_logits = torch.zeros_like(src.topk_ids), src.native_topk_logits
        else:
            topk_ids, topk_logits = src.topk_ids, src.topk_logits
        sparse = cfg.loss in ("topk-kl", "fusellm")  # these need the pivot only at the K candidate ids
        inputs = FusionInputs(
            piv_logits=None,  # every loss gets what it needs below, never an (N, V) copy
            piv_uld_stats={k: v[src.row, src.pos] for k, v in uld_stats.items()} if uld_stats else None,
            piv_topk_logprob=logprobs_at(logits, log_z, src.row, src.pos, topk_ids) if sparse else None,  # (N, K)
            src_topk_ids=topk_ids, src_topk_logits=topk_logits, src_lse=src.lse, src_mean=src.mean,
            src_std=src.std, src_zlse=src.zlse, src_gold_logprob=src.gold_logprob,
            piv_gold_logprob=piv_gold[src.row, src.pos],
            piv_row_gold_logprob=piv_gold, aligned_row=src.row, aligned_pos=src.pos,
            src_chunk_logprob=src.chunk_logprob, num_positions=batch.num_positions,
        )
        per_position, valid = FUSION_LOSSES[cfg.loss](inputs, **cfg.loss_kwargs())  # (N,), (N,)
        gate = teacher_gate(batch, src, piv_gold, cfg.gates_of(name), cfg.gate_margin)  # (N,)
        mask = (keep & valid & gate).float()  # (N,)
        weighted = per_position * mask * weights[s, src.row]  # (N,)
        terms["fusion_sum"] = terms["fusion_sum"] + weighted.sum()
        fusion_objective = fusion_objective + (weighted * fusion_scale[src.row]).sum()
        distilled.index_put_((src.row, src.pos), mask * weights[s, src.row], accumulate=True)
        terms["kept_mass_sum"] += (src.kept_mass * keep).sum()
        terms["gated_in"] += mask.sum()
        terms["fusion_positions"] += keep.float().sum()
        if cfg.graph_weight:
            included = keep & gate & valid_positions(src.topk_ids)  # (N,) where the gates let the source in
            terms["graph_sum"] = terms["graph_sum"] + source_graph_sum(logits, log_z, src, included, weights[s])
    terms["objective_sum"] = weighted_sft_sum(ce, distilled, lam, cfg.lambda_scope) + fusion_objective
    if cfg.graph_weight:
        terms["objective_sum"] = terms["objective_sum"] + cfg.graph_weight * terms["graph_sum"]
    return terms


def weighted_sft_sum(ce: torch.Tensor, distilled: torch.Tensor, lam: float, scope: str) -> torch.Tensor:
    """The SFT part of the objective, summed from the per-position CE (B, T): (1-λ)·Σ CE (`lambda_scope: all`),
    or Σ (1 - λ·d)·CE with d (B, T) the source weight distilled at each position (`distilled`), so a position
    no source is distilled at is learned from the gold text at full weight."""
    if scope == "all":
        return (1 - lam) * ce.sum()
    return ((1 - lam * distilled.clamp(max=1.0)) * ce).sum()


def fusion_weight(cfg: TrainConfig, step: int, total: int) -> float:
    """λ at `step` (0-based) of `total`: `lam` throughout, or linear from `lambda_start` at step 0 to `lam` at
    the last step."""
    if cfg.lambda_start is None:
        return cfg.lam
    return cfg.lambda_start + (cfg.lam - cfg.lambda_start) * step / max(total - 1, 1)


# ----------------------------------------------------------------------------------------------
# Schedule, processes
# ----------------------------------------------------------------------------------------------


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 10% of the peak."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def distributed(sharded: bool = False) -> tuple[int, int]:
    """(rank, world size); initialises a gloo/nccl process group when launched by torchrun with several processes,
    or with one when `sharded` (FSDP shards over a process group, even of one)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if (world > 1 or (sharded and "RANK" in os.environ)) and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


# ----------------------------------------------------------------------------------------------
# One training run
# ----------------------------------------------------------------------------------------------


def train_run(cfg: TrainConfig, layers: dict[str, VerifiedLayer], out: Path, log=print, stop_after: int | None = None) -> Path | None:
    """Train the pivot on the given sources' aligned caches; returns the final checkpoint folder.

    stop_after: save a resumable checkpoint after this many steps and return None (a job that must end
    before its time limit); rerun with resume=True to continue exactly where it stopped.
    """
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds each rank to its GPU
    rank, world = distributed(sharded=cfg.fsdp)
    if cfg.fsdp and not dist.is_initialized():
        raise ValueError("--fsdp shards the pivot across the processes of torchrun: launch with torchrun "
                         "--nproc-per-node N, or leave out --fsdp")
    if cfg.grad_accum % world:
        raise ValueError(f"--grad-accum {cfg.grad_accum} must be a multiple of the {world} processes: the micro-batches "
                         "of each optimizer step are split between them")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    resume_dir = recover_checkpoint(out) if rank == 0 else out / CHECKPOINT_DIR
    if world > 1:
        dist.barrier()  # every rank sees the recovered checkpoint
    if cfg.resume:
        refuse_other_settings(out, cfg, layers, log)
        if (out / FINAL_DIR / "fusion_config.yaml").exists():
            log(f"{out}: already trained with these settings, nothing to do ({out / FINAL_DIR})")
            return out / FINAL_DIR
    torch.manual_seed(cfg.seed)
    check_sources(layers, cfg.join)
    check_statistics(layers, cfg.needed_statistics())
    data = FusionData(layers, tuple(cfg.train_splits), cfg.shuffle_window, tuple(cfg.distill_only_splits), cfg.join,
                      cfg.source_domains, cfg.domain_epochs)
    provenance = provenance_of(layers)
    pivot = resolve_model(cfg.pivot)
    tokenizer = load_tokenizer(pivot)
    resuming = cfg.resume and (resume_dir / STATE_FILE).exists()
    if resuming:
        check_checkpoint_kind(resume_dir, cfg.fsdp)
    if cfg.fsdp:  # from the pivot; a resumed run then loads its shards from the checkpoint
        model = load_sharded_pivot(pivot, device, bf16=cfg.dtype == "bf16", recompute=cfg.activation_checkpointing)
    else:
        model = load_model(resume_dir if resuming else pivot, dtype=torch.float32, device=device).train()
        if cfg.activation_checkpointing:
            model.activation_checkpointing_enable()
    check_pivot(layers, tokenizer, model.get_input_embeddings().num_embeddings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream = MicroBatchStream(data, cfg.batch_tokens, cfg.seed)
    total_steps = cfg.max_steps or max(1, stream.run_length(cfg.epochs) // cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, total_steps))
    start = 0
    if resuming:
        state = torch.load(resume_dir / STATE_FILE, weights_only=True, map_location="cpu")
        if cfg.fsdp:
            load_sharded_checkpoint(resume_dir, model, optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])  # moves the moments onto the parameters' device
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        log(f"resuming {out} at step {start} of {total_steps}")
        if rank == 0:
            keep_metrics_until(out / "metrics.jsonl", start)
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        clear_run(out)
        (out / "config.yaml").write_text(dump_yaml(cfg))
    validator = (Validator(cache_records(layers, cfg.eval_split), tokenizer, pivot.add_bos, cfg.eval_split, cfg.keep_best,
                           out, cfg.batch_tokens) if cfg.eval_every and rank == 0 else None)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(range(start, total_steps), desc=f"fuse-train {out.name}", disable=rank != 0, dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        lam = fusion_weight(cfg, step, total_steps)
        group = [stream[step * cfg.grad_accum + i] for i in range(cfg.grad_accum)]
        if step + 1 < total_steps:  # the next step's remote shards arrive while this step trains
            for shard, _ in [stream[(step + 1) * cfg.grad_accum + i] for i in range(cfg.grad_accum)][rank::world]:
                data.prefetch(shard)
        n_response = sum(stream.response_tokens(mb) for mb in group)  # the whole step, all ranks
        sums = dict.fromkeys(TERMS, 0.0)
        for shard, rows in group[rank::world]:
            terms = micro_batch_terms(model, collate(data.shard(shard), rows).to(device), cfg, lam)
            loss = terms["objective_sum"] / max(n_response, 1)
            loss.backward()
            for k in TERMS:
                sums[k] += float(terms[k].detach())
        if world > 1 and not cfg.fsdp:  # FSDP reduce-scatters the gradients in each backward
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        if world > 1:
            packed = torch.tensor([sums[k] for k in TERMS], dtype=torch.float64, device=device)
            dist.all_reduce(packed)
            sums = dict(zip(TERMS, packed.tolist()))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        stop_if_not_finite(step + 1, sums["objective_sum"], float(grad_norm), layers,
                           lambda: [data.shard(shard).record_ids[r] for shard, rows in group[rank::world] for r in rows])
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {
            "step": step + 1,
            "loss": sums["objective_sum"] / max(n_response, 1),
            "sft": sums["sft_sum"] / max(n_response, 1),
            "fusion": sums["fusion_sum"] / max(n_response, 1),
            **({"graph": sums["graph_sum"] / max(n_response, 1)} if cfg.graph_weight else {}),
            **({"lambda": lam} if cfg.lambda_start is not None else {}),
            "kept_mass": sums["kept_mass_sum"] / max(sums["fusion_positions"], 1),
            "gated_in": sums["gated_in"] / max(sums["fusion_positions"], 1),
            "grad_norm": full_value(grad_norm),
            "lr": lr,
            "tokens": n_response,
            "tokens_per_s": sum(stream.tokens(mb) for mb in group) / (time.time() - t0),
        }
        if validator and validator.due(step + 1, cfg.eval_every, total_steps):
            record.update(validator.evaluate(model, step + 1, lambda folder: save_hf(folder, model, tokenizer, cfg,
                                                                                     provenance)))
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        bar.set_postfix(loss=f"{record['loss']:.3f}", sft=f"{record['sft']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                        **(validator.postfix() if validator else {}))
        stopping = stop_after is not None and step + 1 == stop_after and step + 1 < total_steps
        periodic = cfg.save_every and (step + 1) % cfg.save_every == 0
        if (stopping or periodic) and step + 1 < total_steps:
            if cfg.fsdp:
                save_sharded_checkpoint(out, model, optimizer, scheduler, step + 1, cfg, provenance)
            elif rank == 0:
                save_checkpoint(out, model, tokenizer, optimizer, scheduler, step + 1, cfg, provenance)
        if stopping:
            bar.close()
            if metrics:
                metrics.close()
            return None
    final = out / FINAL_DIR
    weights = consolidated_state_dict(model) if cfg.fsdp else None  # gathered on rank 0; every rank takes part
    if rank == 0:
        if cfg.keep_best:
            validator.promote_best(log)
        else:
            save_final(out, model, tokenizer, cfg, provenance, weights)
        metrics.close()
        shutil.rmtree(resume_dir, ignore_errors=True)  # the final model supersedes the last resumable checkpoint
    if world > 1:
        dist.barrier()
    return final


def fuse_train(cfg: TrainConfig, log=print) -> Path:
    """The whole command: unified or SFT (one run), or pairwise (one run per source, then a merge)."""
    max_bytes = int(cfg.max_local_gb * 1e9) if cfg.max_local_gb else None
    store = ShardStore(Path(cfg.cache_dir) / "shards" if cfg.cache_dir else None, max_bytes)
    layers = discover_sources(cfg.shards, resolve_model(cfg.pivot).name, cfg.sources, align_pivot=cfg.pivot,
                              store=store, allow_insecure=cfg.allow_insecure, log=log)
    out = Path(cfg.out)
    log(f"sources: {', '.join(layers)} -> pivot {cfg.pivot}, mode {cfg.mode}, loss {cfg.loss}, lambda {cfg.lam}")
    refuse_unverified(layers)  # before the settings below read the manifests
    check_source_domains(layers, cfg.source_domains)
    check_named_sources(layers, "source_gates", cfg.source_gates)
    check_domain_epochs(layers, cfg.domain_epochs)
    if cfg.mode != "pairwise":
        return train_run(cfg, layers, out, log)
    if cfg.merge_weights and len(cfg.merge_weights) != len(layers):
        raise ValueError(f"--merge-weights gives {len(cfg.merge_weights)} weights for {len(layers)} sources "
                         f"({', '.join(layers)}): give one per source, in that order")
    if int(os.environ.get("RANK", 0)) == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", dump_yaml(cfg))  # the whole run's settings, as each pairwise run's
    finals = [train_run(cfg, {name: folder}, out / f"pairwise-{name}", log) for name, folder in layers.items()]
    if int(os.environ.get("RANK", 0)) != 0:
        return out / "merged"
    from fuse_trainer.merge import merge_checkpoints

    pivot_dir = load_model_dir(cfg.pivot)
    weights = cfg.merge_weights or [1.0 / len(finals)] * len(finals)
    merged = out / "merged"
    options = {"density": cfg.ties_density} if cfg.merge == "ties" else {}
    merge_checkpoints(pivot_dir, finals, weights, cfg.merge, merged, **options)
    write_text_atomic(merged / "fusion_config.yaml", dump_yaml(cfg))
    write_text_atomic(merged / "fusion_provenance.json", json.dumps(
        {"merged_from": [str(f) for f in finals], "weights": weights, "method": cfg.merge,
         "caches": provenance_of(layers)}, indent=2, sort_keys=True) + "\n")
    log(f"merged {len(finals)} pairwise pivots with {cfg.merge} -> {merged}")
    if cfg.eval_every:
        evaluate_merged(merged, cache_records(layers, cfg.eval_split), cfg.eval_split, pick_device(cfg.device), log)
    return merged


def load_model_dir(name: str) -> Path:
    """The local HF folder of a model name (converting a packaged GGUF model once if needed)."""
    from cache_builder.models import ensure_converted

    return ensure_converted(resolve_model(name))


