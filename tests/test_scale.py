"""Past one device: a source spread over devices by a device map (cache-build --device-map), and the pivot sharded
across processes (fuse-train --fsdp, FSDP2 on CPU with gloo and two processes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from cache_builder.build import build_cache
from cache_builder.device_map import parse_max_memory, placement_units, plan_device_map, rank_gpus
from fuse_trainer.config import dump_yaml
from fuse_trainer.data import discover_sources
from fuse_trainer.train import train_run
from tests.runs import run_losses, train_config

REPO = Path(__file__).resolve().parents[1]


def skeleton(config):
    """The causal LM of `config` on the meta device: shapes only."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("name", ["srcq", "srcg"])
def test_a_build_with_half_the_layers_on_disk_writes_the_bytes_of_a_plain_build(world, tmp_path, name):
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig

    model = skeleton(AutoConfig.from_pretrained(world["models"][name]))
    kept, layers = placement_units(model)
    assert layers == ["model.layers.0", "model.layers.1"] and "lm_head" in kept and "model.embed_tokens" in kept
    sizes = compute_module_sizes(model, dtype=torch.float32)
    budget = {"cpu": sum(sizes[m] for m in kept) + sizes[layers[0]]}  # room for one of the two layers
    assert plan_device_map(model, budget, torch.float32).describe() == "decoder layers: 1 on cpu, 1 on disk"
    messages = []
    build_cache(world["corpus"], world["settings"][name], tmp_path, spread=budget, log=messages.append)
    assert any(m.endswith("decoder layers: 1 on cpu, 1 on disk") for m in messages)
    plain = {p.name: p.read_bytes() for p in (world["cache"] / name / "shards").glob("*.parquet")}
    spread = {p.name: p.read_bytes() for p in (tmp_path / name / "shards").glob("*.parquet")}
    assert len(plain) > 1 and spread == plain
    assert not (tmp_path / name / ".offload-r00000").exists()


def test_layers_fill_the_gpus_in_order_and_ranks_split_a_node():
    from accelerate.utils import compute_module_sizes
    from transformers import LlamaConfig

    model = skeleton(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    sizes = compute_module_sizes(model, dtype=torch.bfloat16)
    kept, layers = placement_units(model)
    layer = sizes[layers[0]]
    budgets = {4: sum(sizes[m] for m in kept) + layer, 5: 2 * layer + 1, "cpu": layer}
    plan = plan_device_map(model, budgets, torch.bfloat16)
    assert [plan.device_map[n] for n in layers] == [4, 5, 5, "cpu", "disk", "disk"]
    assert {plan.device_map[n] for n in kept} == {4}
    with pytest.raises(ValueError, match="do not fit"):
        plan_device_map(model, {0: layer}, torch.bfloat16)
    assert [rank_gpus(8, r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_gpus(8, 2, 3) == [4, 5]
    with pytest.raises(ValueError, match="at least one GPU per rank"):
        rank_gpus(2, 0, 4)
    assert parse_max_memory("gpu=70GiB, cpu=1MiB") == {"gpu": 70 * 2**30, "cpu": 2**20}
    with pytest.raises(ValueError, match="gpu=SIZE,cpu=SIZE"):
        parse_max_memory("0=70GiB")



def torchrun_fuse_train(cfg, out: Path, *flags: str) -> list[str]:
    """fuse-train with `cfg`'s settings (as a recipe file beside `out`) under torchrun: two gloo processes."""
    recipe = out.with_name(f"{out.name}-recipe.yaml")
    recipe.write_text(dump_yaml(cfg))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
            sys.executable, "-c", "import sys; from fuse_trainer.cli import train; sys.argv[0] = 'fuse-train'; train()",
            "--recipe", str(recipe), "--out", str(out), *flags]


GLOO_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_fsdp_on_two_processes_trains_the_model_of_one(world, tmp_path):
    """Same global batch: the losses of the one-process run, and a consolidated Hugging Face checkpoint equal to its
    model parameter by parameter."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    single = tmp_path / "single"
    cfg = train_config(world, single, grad_accum=2, max_steps=3)
    layers = discover_sources(world["cache"], "pivot")
    with pytest.raises(ValueError, match="launch with torchrun"):  # no process group to shard over
        train_run(train_config(world, single, fsdp=True), layers, single, log=lambda *_: None)
    train_run(cfg, layers, single, log=lambda *_: None)
    sharded = tmp_path / "fsdp"
    result = subprocess.run(torchrun_fuse_train(cfg, sharded, "--fsdp", "--save-every", "0"), capture_output=True,
                            text=True, env=GLOO_ENV, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.allclose(run_losses(sharded), run_losses(single), rtol=1e-4)
    plain, gathered = load_file(single / "final" / "model.safetensors"), load_file(sharded / "final" / "model.safetensors")
    assert plain.keys() == gathered.keys()
    for name in plain:
        assert torch.allclose(plain[name], gathered[name], rtol=1e-4, atol=1e-6), name
    model = AutoModelForCausalLM.from_pretrained(sharded / "final")
    assert not any(p.is_meta for p in model.parameters())
    assert (sharded / "final" / "fusion_config.yaml").exists() and not (sharded / "checkpoint").exists()


def test_fsdp_killed_after_a_checkpoint_resumes_to_the_losses_of_an_uninterrupted_run(world, tmp_path):
    """kill -9 of every process after a sharded checkpoint, then --resume (with activation checkpointing, which
    composes with FSDP); a sharded checkpoint is refused without --fsdp."""
    straight = tmp_path / "straight"
    cfg = train_config(world, straight, grad_accum=2, max_steps=10)
    layers = discover_sources(world["cache"], "pivot")
    train_run(cfg, layers, straight, log=lambda *_: None)
    killed = tmp_path / "killed"
    command = torchrun_fuse_train(cfg, killed, "--fsdp", "--activation-checkpointing", "--save-every", "2")
    proc = subprocess.Popen(command, env=GLOO_ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoint" / "trainer_state.pt").exists():
        time.sleep(0.02)
    launcher = psutil.Process(proc.pid)
    for process in [launcher, *launcher.children(recursive=True)]:  # torchrun and both ranks (own sessions)
        process.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint" / "dcp").is_dir() and not (killed / "final").exists()
    with pytest.raises(ValueError, match="written with --fsdp"):
        train_run(train_config(world, killed, grad_accum=2, max_steps=10, resume=True), layers, killed,
                  log=lambda *_: None)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=GLOO_ENV, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    assert np.allclose(run_losses(killed), run_losses(straight), rtol=1e-4)
