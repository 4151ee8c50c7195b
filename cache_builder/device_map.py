"""Placing a source model that does not fit one device: its decoder layers spread over this rank's GPUs, then
CPU memory, then disk, through accelerate's dispatch (`from_pretrained(device_map=...)`).

Everything that is not a decoder layer (the embeddings, the final norm, the output layer, rotary tables) stays on
the main device, the first of the rank's GPUs (or the CPU): scoring reads the output layer's weight directly
(cache_builder.scoring.output_head) and takes the final hidden states, the attention mask and the token ids on
one device. The layers run in order, each on its device or, when offloaded, on the main device with its weights
brought in for the forward (accelerate's hooks), so the rows are those of a build on one device.

Ranks and device maps combine: the GPUs a process sees are split evenly among the ranks of its node
(LOCAL_RANK of LOCAL_WORLD_SIZE), and each rank spreads its model over its own group.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

MAIN_HEADROOM = 0.85  # share of a GPU's free memory the weights may take by default (activations need the rest)
CPU_HEADROOM = 0.8  # share of the free RAM the weights of one node's ranks may take by default


def rank_gpus(visible: int, local_rank: int, local_world: int) -> list[int]:
    """The GPU indices of one rank: the node's `visible` GPUs cut into `local_world` equal, contiguous groups."""
    if visible < local_world:
        raise ValueError(f"{local_world} ranks on this node share {visible} GPUs: a device map needs at least one GPU "
                         "per rank; start fewer processes per node (torchrun --nproc-per-node)")
    per_rank = visible // local_world
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))


def parse_max_memory(text: str) -> dict[str, int]:
    """"gpu=70GiB,cpu=200GiB" -> {"gpu": bytes, "cpu": bytes}: the weights' budget on each GPU of a rank and in its
    CPU memory (either may be left out: it defaults to what is free)."""
    from accelerate.utils import convert_file_size_to_int

    budgets = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, size = item.partition("=")
        if key not in ("gpu", "cpu") or not size:
            raise ValueError(f"--max-memory {text!r}: write gpu=SIZE,cpu=SIZE (e.g. gpu=70GiB,cpu=200GiB)")
        budgets[key] = convert_file_size_to_int(size)
    return budgets


def memory_budgets(gpus: Sequence[int], given: dict[str, int], main_reserve: int) -> dict[int | str, int]:
    """Bytes for weights on each device, in the order they fill: the rank's GPUs, then "cpu".

    Defaults: MAIN_HEADROOM of each GPU's free memory (less `main_reserve` on the main GPU, for the scoring
    buffers), and CPU_HEADROOM of the free RAM shared by the node's ranks."""
    import psutil

    budgets: dict[int | str, int] = {}
    for i, gpu in enumerate(gpus):
        free = given.get("gpu", int(torch.cuda.mem_get_info(gpu)[0] * MAIN_HEADROOM))
        budgets[gpu] = max(free - (main_reserve if i == 0 and "gpu" not in given else 0), 0)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    budgets["cpu"] = given.get("cpu", int(psutil.virtual_memory().available * CPU_HEADROOM / local_world))
    return budgets


def placement_units(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(module names kept on the main device, decoder layer names in forward order) of a causal LM.

    The layers are the `layers` list of `model.get_decoder()`; every module beside the path to it is kept."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no list of decoder layers at get_decoder().layers to place or shard "
                         "layer by layer; run it without --device-map and --fsdp")
    path = next(name for name, module in model.named_modules() if module is layers).split(".")
    kept = []
    for depth, step in enumerate(path):
        parent = ".".join(path[:depth])
        kept += [f"{parent}.{name}" if parent else name
                 for name, _ in model.get_submodule(parent).named_children() if name != step]
    prefix = ".".join(path)
    return kept, [f"{prefix}.{i}" for i in range(len(layers))]


@dataclass(frozen=True)
class DevicePlan:
    """Where each module of a model goes: `device_map` for `from_pretrained(device_map=...)`; `layers`, the
    decoder layers among its keys, in forward order."""

    device_map: dict[str, int | str]
    layers: tuple[str, ...]

    def describe(self) -> str:
        """'decoder layers: 14 on 0, 14 on 1, 8 on cpu, 12 on disk'."""
        counts = Counter(self.device_map[name] for name in self.layers)
        return "decoder layers: " + ", ".join(f"{n} on {device}" for device, n in counts.items())


def plan_device_map(model: torch.nn.Module, budgets: dict[int | str, int], dtype: torch.dtype) -> DevicePlan:
    """The kept modules (see `placement_units`) on the first device of `budgets`, the decoder layers in order on
    the first device with room left, "disk" after the last.

    model: the causal LM, on the meta device is enough (only shapes are read)."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=dtype)
    kept, layers = placement_units(model)
    devices = list(budgets)
    left = dict(budgets)
    main = devices[0]
    left[main] -= sum(sizes[name] for name in kept)
    if left[main] < 0:
        raise ValueError(f"the embeddings and output layer ({sum(sizes[n] for n in kept) / 2**30:.2f} GiB) do not fit in "
                         f"the {budgets[main] / 2**30:.2f} GiB given to device {main}; raise --max-memory or free that device")
    device_map: dict[str, int | str] = dict.fromkeys(kept, main)
    device = 0
    for name in layers:
        while device < len(devices) and left[devices[device]] < sizes[name]:
            device += 1
        if device == len(devices):
            device_map[name] = "disk"
            continue
        device_map[name] = devices[device]
        left[devices[device]] -= sizes[name]
    return DevicePlan(device_map, tuple(layers))


def auto_device_map(folder, dtype: torch.dtype, gpus: Sequence[int], given: dict[str, int],
                    main_reserve: int) -> DevicePlan:
    """The plan for the model in HF folder `folder` across `gpus` (none: the CPU), then CPU memory, then disk."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return plan_device_map(skeleton, memory_budgets(gpus, given, main_reserve), dtype)


def load_spread(source, dtype: torch.dtype, device: str | torch.device, max_memory: dict[str, int], main_reserve: int,
                offload_folder: Path, log=print) -> torch.nn.Module:
    """The source model (a ModelSource) spread over this rank's GPUs (`device` cuda; the CPU when cpu), then CPU
    memory, then disk under `offload_folder`, in eval mode. `main_reserve`: bytes kept free on the main GPU."""
    from cache_builder.models import ensure_converted, load_model

    gpus = []
    if torch.device(device).type == "cuda":
        gpus = rank_gpus(torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", 0)),
                         int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    plan = auto_device_map(ensure_converted(source), dtype, gpus, max_memory, main_reserve)
    log(f"{source.name} spread over devices: {plan.describe()}")
    return load_model(source, dtype, device, device_map=plan.device_map, offload_folder=offload_folder)
