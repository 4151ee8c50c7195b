"""fuse-train --fsdp: the pivot's weights, gradients and AdamW state sharded across the ranks (PyTorch FSDP2).

Data-parallel training keeps a full copy of the weights, gradients and both AdamW moments on every rank: 16 bytes
per parameter, about 235 GB for a 14.7B pivot. With --fsdp each rank keeps 1/world of each: `fully_shard` on every
decoder layer and then on the root (embeddings, final norm, output layer) makes each of them one group whose
weights are gathered just before it runs and freed after, and whose gradients are reduce-scattered as soon as
its backward is done. The micro-batches, the loss and the optimizer are those of the data-parallel run: the
gradients are summed across ranks, not averaged, because every rank already divides its loss by the whole
step's response tokens.

Loading: only rank 0 reads the pivot (into CPU memory); the other ranks build it on the meta device and receive
their shards from rank 0, so a node holds one full copy, not one per GPU.

Mixed precision (`--dtype bf16`): the layers compute with bf16 copies of the weights, the gradients are reduced
and the sharded weights and AdamW state kept in fp32 (MixedPrecisionPolicy). With fp32 a run reproduces the
one-process run (tests/test_scale.py).

Checkpoints (`checkpoint/`): every rank writes its shards of the model and optimizer state with
torch.distributed.checkpoint into `dcp/` (one folder all ranks can reach: a shared filesystem across nodes), rank 0
the scheduler, step and RNG (`trainer_state.pt`) and the settings. DCP reshards on load, so a checkpoint resumes
on any number of ranks. The final model is gathered once into a plain Hugging Face folder (safetensors).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from cache_builder.device_map import placement_units
from cache_builder.models import ensure_converted, load_model
from fuse_trainer.checkpoint import CHECKPOINT_DIR, STATE_FILE, save_settings, schedule_state, write_folder

SHARDS_DIR = "dcp"  # inside a checkpoint folder: the DCP files of every rank


def shard_model(model: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Shard `model` in place across the process group: each decoder layer, then the root, one FSDP2 group each.

    bf16: compute with bf16 copies of the weights, reduce gradients in fp32 (the sharded weights stay fp32).
    Gradients are summed across ranks (see the module docstring)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    _, layers = placement_units(model)
    for name in layers:
        fully_shard(model.get_submodule(name), mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum: each rank's loss is already divided by the step's tokens
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no pre-scaled sum)
    return model


def load_sharded_pivot(pivot, device: torch.device, bf16: bool, recompute: bool) -> torch.nn.Module:
    """The pivot (a ModelSource) in training mode, sharded across the process group (`shard_model`), with activation
    checkpointing when `recompute`. Only rank 0 reads the weights, into CPU memory; the other ranks build the model
    on the meta device and receive their shards (and the buffers) from rank 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    full = load_model(pivot, dtype=torch.float32, device="cpu") if dist.get_rank() == 0 else None
    dist.barrier()  # rank 0 has converted a GGUF pivot, if it had to
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ensure_converted(pivot)), dtype=torch.float32)
    model.train()
    if recompute:
        model.activation_checkpointing_enable()
    shard_model(model, device, bf16)
    model.to_empty(device=device)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():  # not in the state dict (rotary tables): computed once, on rank 0
        if full is not None:
            buffer.copy_(full.get_buffer(name))
        dist.broadcast(buffer, src=0)
    return model


def full_value(tensor: torch.Tensor) -> float:
    """A replicated DTensor (e.g. the gradient norm of sharded parameters) or a plain tensor as a float."""
    return float(tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor)


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / SHARDS_DIR).is_dir()


def check_checkpoint_kind(folder: Path, fsdp: bool) -> None:
    """A sharded checkpoint resumes only with --fsdp, a full one only without."""
    if is_sharded_checkpoint(folder) != fsdp:
        written, flag = ("with", "add --fsdp") if not fsdp else ("without", "leave out --fsdp")
        raise ValueError(f"{folder} was written {written} --fsdp: {flag} to resume it, or leave out --resume to start again")


def save_sharded_checkpoint(out: Path, model, optimizer, scheduler, step: int, cfg, provenance: dict) -> None:
    """`out/checkpoint/` of a sharded run, written whole or not at all; every rank must call it.

    Every rank writes its shards of the model and optimizer state to a staging folder (torch.distributed.checkpoint),
    then rank 0 moves them into the checkpoint with the settings and the schedule state (checkpoint.write_folder)."""
    rank = dist.get_rank()
    staging = out / f".{CHECKPOINT_DIR}.shards"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a save killed before its rename
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging)
    dist.barrier()
    if rank == 0:
        def write(tmp: Path) -> None:
            save_settings(tmp, cfg, provenance)
            staging.rename(tmp / SHARDS_DIR)
            torch.save(schedule_state(scheduler, step), tmp / STATE_FILE)

        write_folder(out / CHECKPOINT_DIR, write)
    dist.barrier()


def load_sharded_checkpoint(folder: Path, model, optimizer) -> None:
    """Load the model and optimizer shards of `folder`/dcp into the sharded `model` and its `optimizer`, whatever
    the number of ranks that wrote them."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder / SHARDS_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def consolidated_state_dict(model) -> dict[str, torch.Tensor]:
    """The full, unsharded weights on rank 0's CPU (empty on the other ranks); every rank must call it.

    Tied parameters (input and output embeddings) come back as one tensor under each name, as in a plain model,
    so `save_pretrained` writes them once."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(param), name)
        if first != name and name in full:
            full[name] = full[first]
    return full
