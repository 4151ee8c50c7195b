"""Past one device: a source spread over devices by a device map (cache-build --device-map)."""

import pytest
import torch

from cache_builder.build import build_cache
from cache_builder.device_map import parse_max_memory, placement_units, plan_device_map, rank_gpus


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

