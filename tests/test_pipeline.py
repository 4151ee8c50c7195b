"""End to end on tiny random models: cache-build -> cache-align -> cache-verify -> fuse-train -> merge.

Three tiny models with three different tokenizers stand in for the real ones: a pivot (byte-level BPE,
like SmolLM2), a "qwen2" source (another byte-level BPE, untied head, padded vocabulary) and a "gemma3"
source (SentencePiece-style with byte fallback and <bos>).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_builder.build import BuildError, build_cache
from cache_builder.info import cache_summary
from cache_builder.reader import read_rows
from cache_builder.verify import verify_cache
from fuse_trainer.config import dump_yaml
from fuse_trainer.train import fuse_train, train_run
from fuse_trainer.data import discover_sources
from tests.runs import build_command, run_losses, train_config

REPO = Path(__file__).resolve().parents[1]

def test_built_cache_verifies_and_reports(world):
    assert verify_cache(world["cache"]) == []
    rows = {r["source"] + ("/" + r["pivot"] if r["pivot"] else ""): r for r in cache_summary(world["cache"])}
    assert set(rows) == {"srcq", "srcg", "srcq/pivot", "srcg/pivot"}
    assert rows["srcq"]["rows"] == 24 and rows["srcq"]["k"] == 4
    assert 0.3 < rows["srcq/pivot"]["coverage"] <= 1.0
    assert rows["srcg"]["bytes_per_token"] > 0


def test_aligned_positions_share_their_context(world):
    """Every aligned pair reads the same text prefix (same byte offset) in both tokenizations."""
    src = read_rows(world["cache"] / "srcg")
    aligned = read_rows(world["cache"] / "srcg" / "aligned" / "pivot")
    by_id = {rid: i for i, rid in enumerate(src["record_id"])}
    checked = 0
    for j, rid in enumerate(aligned["record_id"]):
        i = by_id[rid]
        piv_end, src_end = aligned["token_end"].row(j), src["token_end"].row(i)
        pos, spos = aligned["aligned_pos"].row(j), aligned["src_pos"].row(j)
        assert np.array_equal(piv_end[pos], src_end[spos])
        assert np.array_equal(aligned["gold_logprob"].row(j), src["gold_logprob"].row(i)[spos])
        checked += len(pos)
    assert checked > 100


def test_a_source_cut_at_max_tokens_is_aligned_to_a_pivot_row_of_the_same_text(world, tmp_path):
    """ALM chunks compare the same bytes: the last one ends where the cut source row ends, on both sides."""
    from cache_builder.align import align_cache

    build_cache(world["corpus"], replace(world["settings"]["srcg"], max_tokens=8), tmp_path, log=lambda *_: None)
    align_cache(tmp_path / "srcg", str(world["models"]["pivot"]), log=lambda *_: None)
    src, aligned = read_rows(tmp_path / "srcg"), read_rows(tmp_path / "srcg" / "aligned" / "pivot")
    cut = 0
    for j in range(len(aligned["record_id"])):
        assert aligned["record_id"][j] == src["record_id"][j]
        src_end, piv_end = src["token_end"].row(j), aligned["token_end"].row(j)
        assert piv_end[-1] == src_end[-1]
        cut += int(len(src_end) == 8)
    assert cut > 10  # most rows were cut


def test_rerun_is_a_no_op_and_other_settings_are_refused(world):
    shard = sorted((world["cache"] / "srcq" / "shards").glob("*.parquet"))[0]
    before = (shard.read_bytes(), shard.stat().st_mtime_ns)
    messages = []
    summary = build_cache(world["corpus"], world["settings"]["srcq"], world["cache"], log=messages.append)
    assert any("nothing to do" in m for m in messages) and summary.shards_written == 0
    assert (shard.read_bytes(), shard.stat().st_mtime_ns) == before
    with pytest.raises(BuildError, match="other settings"):
        build_cache(world["corpus"], replace(world["settings"]["srcq"], top_k=5), world["cache"], log=lambda *_: None)


def test_a_build_over_another_corpus_is_refused(world, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "A different corpus entirely.\n", "split": "train"}) + "\n")
    with pytest.raises(BuildError, match="from another corpus"):  # not "already complete"
        build_cache(other, world["settings"]["srcq"], cache, log=lambda *_: None)


def test_two_ranks_produce_the_same_rows_as_one(world, tmp_path):
    settings = replace(world["settings"]["srcq"], world_size=2)
    first = build_cache(world["corpus"], settings, tmp_path, rank=0, log=lambda *_: None)
    assert not first.complete  # the manifest waits for rank 1
    assert build_cache(world["corpus"], settings, tmp_path, rank=1, log=lambda *_: None).complete
    one, two = read_rows(world["cache"] / "srcq"), read_rows(tmp_path / "srcq")
    order_one, order_two = np.argsort(one["record_id"]), np.argsort(two["record_id"])
    assert list(one["record_id"][order_one]) == list(two["record_id"][order_two])
    for a, b in zip(order_one, order_two):
        assert np.array_equal(one["topk_ids"].row(a), two["topk_ids"].row(b))
        assert np.allclose(one["logsumexp"].row(a), two["logsumexp"].row(b), atol=1e-5)


def test_kill_9_mid_build_resumes_to_identical_shards(world, tmp_path):
    reference = subprocess.run(build_command(world, tmp_path / "ref"), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    proc = subprocess.Popen(build_command(world, tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / "srcq" / "shards"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(shards.glob("*.parquet"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "srcq" / "manifest.json").exists()
    resumed = subprocess.run(build_command(world, tmp_path / "killed"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    ref_files = sorted((tmp_path / "ref" / "srcq" / "shards").glob("*.parquet"))
    assert [f.name for f in ref_files] == sorted(f.name for f in shards.glob("*.parquet"))
    for f in ref_files:
        assert f.read_bytes() == (shards / f.name).read_bytes(), f.name
    assert not list(shards.glob(".*tmp*"))


@pytest.mark.parametrize("loss", ["infifusion", "fusellm", "topk-kl", "alm"])
def test_unified_training_lowers_the_loss(world, tmp_path, loss):
    cfg = train_config(world, tmp_path / loss, loss=loss, max_steps=12, epochs=1, gate="chunk", weighting="avgce")
    final = fuse_train(cfg, log=lambda *_: None)
    losses = run_losses(tmp_path / loss)
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    steps = [json.loads(line) for line in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    assert 0 < np.mean([s["gated_in"] for s in steps]) < 1  # the chunk gate lets some positions through, not all
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)
    assert (final / "fusion_config.yaml").exists() and "srcq" in (final / "fusion_provenance.json").read_text()


def test_pairwise_trains_one_pivot_per_source_and_merges(world, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = fuse_train(train_config(world, tmp_path / "pw", mode="pairwise", max_steps=3), log=lambda *_: None)
    assert (tmp_path / "pw" / "pairwise-srcq" / "final").is_dir() and (tmp_path / "pw" / "pairwise-srcg" / "final").is_dir()
    model = AutoModelForCausalLM.from_pretrained(merged)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "pw" / "pairwise-srcq" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "pw" / "pairwise-srcg" / "final").state_dict()
    base = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"]).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    expected = base[name] + 0.5 * (a[name] - base[name]) + 0.5 * (b[name] - base[name])
    assert torch.allclose(model.state_dict()[name], expected, atol=1e-6)


def test_fuse_train_with_no_recipe_flag_trains_the_recommended_recipe(world, tmp_path):
    import yaml
    from click.testing import CliRunner

    from fuse_trainer.cli import train
    from fuse_trainer.config import RECIPES, load_yaml

    out = tmp_path / "default"
    result = CliRunner().invoke(train, ["--shards", str(world["cache"]), "--mode", "pairwise", "--pivot",
                                        str(world["models"]["pivot"]), "--max-steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == yaml.safe_load((out / "pairwise-srcq" / "config.yaml").read_text())
    recommended = load_yaml(RECIPES / "recommended.yaml")
    assert saved["recipe"] == "recommended" and {k: saved[k] for k in recommended} == recommended
    assert yaml.safe_load((out / "merged" / "fusion_config.yaml").read_text())["gate"] == "candidate+chunk"


def test_pairwise_ties_uses_the_configured_density_and_weights_must_match_the_sources(world, tmp_path):
    cfg = train_config(world, tmp_path / "ties", mode="pairwise", max_steps=2, merge="ties", ties_density=0.5)
    merged = fuse_train(cfg, log=lambda *_: None)
    assert json.loads((merged / "merge_config.json").read_text())["options"] == {"density": 0.5}
    with pytest.raises(ValueError, match="2 sources"):
        fuse_train(replace(cfg, merge_weights=[1.0]), log=lambda *_: None)


def test_sources_that_disagree_are_refused(world, tmp_path):
    from cache_builder.manifest import CacheError

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    manifest_path = cache / "srcg" / "aligned" / "pivot" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["corpus"]["fingerprint"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="corpus fingerprint differs"):
        fuse_train(train_config(world, tmp_path / "run", shards=str(cache)), log=lambda *_: None)


def test_ddp_two_processes_match_one(world, tmp_path):
    """torchrun --nproc-per-node 2 (gloo) gives the weights of one process with the same global batch."""
    from safetensors.torch import load_file

    single = tmp_path / "single"
    cfg = train_config(world, single, grad_accum=2, max_steps=3)
    train_run(cfg, discover_sources(world["cache"], "pivot"), single, log=lambda *_: None)
    ddp = tmp_path / "ddp"
    recipe = tmp_path / "recipe.yaml"  # the single process's settings, as a recipe
    recipe.write_text(dump_yaml(cfg))
    script = (
        "import sys; from fuse_trainer.cli import train; sys.argv[0] = 'fuse-train'; train()"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "--no-python", sys.executable, "-c", script, "--recipe", str(recipe), "--out", str(ddp)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(single / "final" / "model.safetensors"), load_file(ddp / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert np.allclose(run_losses(single), run_losses(ddp), rtol=1e-5)


def test_a_second_build_on_the_same_folder_is_refused(world):
    from cache_builder.build import exclusive_lock

    folder = world["cache"] / "srcq"
    with exclusive_lock(folder / ".lock-r00000"):
        with pytest.raises(BuildError, match="another cache-build is writing"):
            build_cache(world["corpus"], world["settings"]["srcq"], world["cache"], log=lambda *_: None)
    assert verify_cache(folder) == []


def test_rescore_passes_on_the_real_signals_and_catches_forged_ones(world, tmp_path):
    """cache-verify --rescore: a re-signed cache whose statistics were altered is caught by re-running the model."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cache_builder.rescore import rescore_problems
    from tests.fake_cache import resign

    folder = tmp_path / "srcq"
    shutil.copytree(world["cache"] / "srcq", folder, ignore=shutil.ignore_patterns("aligned"))  # the source layer alone
    model = world["settings"]["srcq"].model
    assert rescore_problems(folder, 3, model_name=model) == []
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = manifest["shards"][0]["path"]
    table = pq.read_table(folder / shard)
    original = table["logsumexp"].combine_chunks()  # list<float32> per row
    forged = pa.ListArray.from_arrays(original.offsets, pc.add(original.flatten(), pa.scalar(1.0, pa.float32())))
    index = table.schema.get_field_index("logsumexp")
    pq.write_table(table.set_column(index, table.schema.field("logsumexp"), forged), folder / shard, compression="zstd")
    resign(folder, manifest)
    assert verify_cache(folder) == []  # checksums cannot tell: the forger re-signed the shard
    problems = rescore_problems(folder, 24, model_name=model)
    assert any("logsumexp differs" in p for p in problems)


def test_a_build_started_before_fused_epilogue_existed_resumes_and_other_settings_are_refused(tmp_path):
    from dataclasses import asdict, replace

    from cache_builder.build import SETTINGS_FILE, BuildError, BuildSettings, check_settings

    settings = BuildSettings(model="qwen")
    old = {k: v for k, v in asdict(settings).items() if k != "fused_epilogue"}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({**old, "corpus_fingerprint": "abc"}))
    check_settings(tmp_path, settings, "abc", overwrite=False)  # resumes
    with pytest.raises(BuildError, match="fused_epilogue"):
        check_settings(tmp_path, replace(settings, fused_epilogue=True), "abc", overwrite=False)


def test_rescore_tolerates_a_few_drifting_positions_in_half_precision_only():
    """A bf16 trunk in another batch composition drifts at a few positions of a long row; fp32 must match at
    every position; a row off at most positions (another model, forged values) fails in every dtype."""
    from cache_builder.format import STAT_COLUMNS
    from cache_builder.reader import Ragged
    from cache_builder.rescore import TOLERANCES, row_problems
    from cache_builder.scoring import ScoredSequence

    positions, k = 100, 4
    rng = np.random.default_rng(0)
    stats = {name: rng.normal(-3.0, 1.0, positions).astype(np.float32) for name in STAT_COLUMNS}
    logits = np.sort(rng.normal(0.0, 5.0, (positions, k)).astype(np.float32), axis=1)[:, ::-1]
    ids = np.tile(np.arange(k, dtype=np.int32), (positions, 1))
    offsets = np.array([0, positions])
    rows = {"record_id": ["r" * 64], "topk_ids": Ragged(ids, offsets), "topk_logits": Ragged(logits.copy(), offsets),
            **{name: Ragged(values, offsets) for name, values in stats.items()}}

    def fresh(drifting: int) -> ScoredSequence:
        mean = stats["logit_mean"].copy()
        mean[:drifting] += 0.22  # the bf16 drift seen on Gemma-3, beyond 3e-2 x the row's magnitude
        return ScoredSequence(topk_ids=ids, topk_logits=logits, logit_mean=mean,
                              **{name: stats[name] for name in STAT_COLUMNS if name != "logit_mean"})

    for dtype in ("bf16", "fp32"):
        tol = TOLERANCES[dtype]
        assert row_problems(rows, 0, fresh(0), tol, tol["logits"]) == []
        assert any("logit_mean differs" in p for p in row_problems(rows, 0, fresh(60), tol, tol["logits"]))
    bf16, fp32 = TOLERANCES["bf16"], TOLERANCES["fp32"]
    assert row_problems(rows, 0, fresh(2), bf16, bf16["logits"]) == []
    assert any("logit_mean differs by up to 0.22" in p for p in row_problems(rows, 0, fresh(2), fp32, fp32["logits"]))


def test_sparse_gather_in_the_trainer_equals_the_dense_loss(world):
    """The trainer feeds top-k KL with log-probs gathered at the K ids, and ULD with pivot statistics computed
    once per batch; both equal the plain (N, V) path."""
    from transformers import AutoModelForCausalLM

    from fuse_trainer.data import FusionData, collate
    from fuse_trainer.losses import pivot_uld_stats, topk_kl_from_logprobs, topk_kl_loss, uld_from_pivot_stats, uld_loss

    data = FusionData(discover_sources(world["cache"], "pivot"))
    shard, rows = data.plan(0, 256, seed=0)[0]
    batch = collate(data.shard(shard), rows)
    model = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"])
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    src = next(iter(batch.sources.values()))
    log_z = torch.logsumexp(logits, dim=-1)
    gathered = logits[src.row[:, None], src.pos[:, None], src.topk_ids.clamp_min(0)] - log_z[src.row, src.pos][:, None]
    sparse = topk_kl_from_logprobs(gathered, src.topk_ids, src.topk_logits, src.lse)
    dense = topk_kl_loss(logits[src.row, src.pos], src.topk_ids, src.topk_logits, src.lse)
    assert torch.allclose(sparse, dense, atol=1e-5)
    for standardize, normalize in [(True, "topk"), (False, "topk"), (True, "full")]:
        stats = pivot_uld_stats(logits, 4, standardize, normalize == "full")  # once for the whole batch
        args = (src.native_topk_logits, src.lse, src.mean, src.std, src.zlse)
        kwargs = dict(top_k=4, temperature=1.0, standardize=standardize, normalize=normalize)
        once = uld_from_pivot_stats({k: v[src.row, src.pos] for k, v in stats.items()}, *args, **kwargs)
        assert torch.allclose(once, uld_loss(logits[src.row, src.pos], *args, **kwargs), atol=1e-5)


def test_lambda_scope_distilled_keeps_full_sft_weight_where_no_source_is_distilled(world):
    """`lambda_scope: all` is (1-λ)·SFT + λ·fusion; `distilled` weighs each position's CE by 1-λ only where the
    source is distilled (aligned, a kept candidate, through the gate) and by 1 elsewhere: checked against a loop."""
    from transformers import AutoModelForCausalLM

    from fuse_trainer.config import TrainConfig
    from fuse_trainer.data import FusionData, collate
    from fuse_trainer.train import gold_logprobs, micro_batch_terms

    data = FusionData(discover_sources(world["cache"], "pivot", ["srcq"]))
    shard, rows = data.plan(0, 256, seed=0)[0]
    batch = collate(data.shard(shard), rows)
    model = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"]).eval()
    lam = 0.7

    def objective(**kw) -> dict:
        with torch.no_grad():
            return micro_batch_terms(model, batch, TrainConfig(mode="unified", loss="topk-kl", lam=lam, **kw).validate())

    every = objective(lambda_scope="all")
    assert torch.allclose(every["objective_sum"], (1 - lam) * every["sft_sum"] + lam * every["fusion_sum"])

    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        gold = gold_logprobs(logits, batch.labels, torch.logsumexp(logits, -1))  # (B, T)
    ce = -gold * batch.loss_mask
    src = batch.sources["srcq"]
    weight = torch.ones_like(ce)
    for r, t, ids, src_gold in zip(src.row.tolist(), src.pos.tolist(), src.topk_ids, src.gold_logprob.tolist()):
        if batch.loss_mask[r, t] and (ids >= 0).any() and src_gold > gold[r, t]:
            weight[r, t] = 1 - lam
    scoped = objective(lambda_scope="distilled", gate="token")
    assert 0 < int((weight < 1).sum()) < int(batch.loss_mask.sum())  # both kinds of position are present
    assert torch.allclose(scoped["objective_sum"], (weight * ce).sum() + lam * scoped["fusion_sum"], rtol=1e-5)

    nothing = objective(lambda_scope="distilled", gate="token", gate_margin=1e9)  # the gate lets no position in
    assert nothing["fusion_sum"] == 0 and torch.allclose(nothing["objective_sum"], nothing["sft_sum"])

    # The record gate: the source beats the pivot on the record's chunks together, per pivot token. The batch is
    # one record: a margin just under its figure lets it in, one just over keeps it out.
    assert len(batch.input_ids) == 1
    starts = src.pos.tolist()
    ends = starts[1:] + [int(batch.num_positions[0])]
    diff = sum(c - gold[0, a:b].sum().item() for c, a, b in zip(src.chunk_logprob.tolist(), starts, ends))
    per_pivot_token = diff / sum(b - a for a, b in zip(starts, ends))
    ungated = objective(lambda_scope="distilled")
    let_in = objective(lambda_scope="distilled", gate="record", gate_margin=per_pivot_token - 1e-3)
    kept_out = objective(lambda_scope="distilled", gate="record", gate_margin=per_pivot_token + 1e-3)
    assert torch.allclose(let_in["objective_sum"], ungated["objective_sum"])
    assert kept_out["fusion_sum"] == 0 and torch.allclose(kept_out["objective_sum"], kept_out["sft_sum"])
    assert not torch.allclose(ungated["objective_sum"], kept_out["objective_sum"])

    # The candidate gate: where the mapped candidates include the gold next token. The tiny random sources
    # rarely rank it, so every third aligned position is given it as its last candidate.
    src.topk_ids[::3, -1] = batch.labels[src.row[::3], src.pos[::3]]
    named = torch.ones_like(ce)
    for r, t, ids in zip(src.row.tolist(), src.pos.tolist(), src.topk_ids):
        if batch.loss_mask[r, t] and (ids == batch.labels[r, t]).any():
            named[r, t] = 1 - lam
    candidate = objective(lambda_scope="distilled", gate="candidate")
    assert 0 < int((named < 1).sum()) < int(batch.loss_mask.sum())
    assert torch.allclose(candidate["objective_sum"], (named * ce).sum() + lam * candidate["fusion_sum"], rtol=1e-5)

    # Gates joined by "+" all have to let a position in: the candidates name the gold token AND the source is surer.
    both = torch.ones_like(ce)
    for r, t, ids, src_gold in zip(src.row.tolist(), src.pos.tolist(), src.topk_ids, src.gold_logprob.tolist()):
        if batch.loss_mask[r, t] and (ids == batch.labels[r, t]).any() and src_gold > gold[r, t]:
            both[r, t] = 1 - lam
    combined = objective(lambda_scope="distilled", gate="candidate+token")
    assert 0 < int((both < 1).sum()) < int((named < 1).sum())  # the token gate removes some candidate positions
    assert torch.allclose(combined["objective_sum"], (both * ce).sum() + lam * combined["fusion_sum"], rtol=1e-5)
    loose = objective(lambda_scope="distilled", gate="candidate+token", gate_margin=-1e9)  # never that much worse
    assert torch.allclose(loose["objective_sum"], candidate["objective_sum"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("loss", ["topk-kl", "infifusion", "alm"])
def test_a_micro_batch_on_the_gpu_equals_the_cpu(world, loss):
    """Every term of a fusion micro-batch (gates and weighting included) is the same on cuda as on the CPU, fp32."""
    from transformers import AutoModelForCausalLM

    from fuse_trainer.config import TrainConfig
    from fuse_trainer.data import FusionData, collate
    from fuse_trainer.train import micro_batch_terms

    data = FusionData(discover_sources(world["cache"], "pivot"))
    shard, rows = data.plan(0, 256, seed=0)[0]
    batch = collate(data.shard(shard), rows)
    cfg = TrainConfig(mode="unified", loss=loss, gate="token", weighting="mince", uld_top_k=4).validate()
    model = AutoModelForCausalLM.from_pretrained(world["models"]["pivot"]).eval()
    cpu = micro_batch_terms(model, batch, cfg)
    gpu = micro_batch_terms(model.cuda(), batch.to(torch.device("cuda")), cfg)
    for name, value in cpu.items():
        assert torch.allclose(gpu[name].cpu(), value, rtol=1e-4, atol=1e-4), name


def test_realigning_after_the_source_changed_rewrites_every_shard(world, tmp_path):
    from cache_builder.align import align_cache

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    aligned = cache / "srcq" / "aligned" / "pivot"
    shipped = {p.name: p.read_bytes() for p in (aligned / "shards").glob("*.parquet")}
    align_cache(cache / "srcq", str(world["models"]["pivot"]), log=lambda *_: None)  # always rebuilt, never reused
    assert {p.name: p.read_bytes() for p in (aligned / "shards").glob("*.parquet")} == shipped  # deterministic
    before = {p.name: p.stat().st_mtime_ns for p in (aligned / "shards").glob("*.parquet")}
    time.sleep(0.01)
    align_cache(cache / "srcq", str(world["models"]["pivot"]), strategy="exact", log=lambda *_: None)
    after = {p.name: p.stat().st_mtime_ns for p in (aligned / "shards").glob("*.parquet")}
    assert before.keys() == after.keys()
    assert all(after[name] > before[name] for name in before)  # rewritten with the other map, none reused
    assert json.loads((aligned / "manifest.json").read_text())["build"]["vocab_map"] == "exact"
    assert verify_cache(cache) == []
