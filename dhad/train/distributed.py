"""Many devices through PyTorch's own engines: torchrun + DDP or FSDP2.

- `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
  multi-node through torchrun's rendezvous) and starts the process group: NCCL on GPUs, gloo on CPU.
  A process group created by the caller (tests spawn their own) is used as is.
- `wrap_model()`: DDP, or FSDP2 — `fully_shard` on every block, then on the root (torchtitan's
  order), with a `MixedPrecisionPolicy` (bf16 compute, fp32 gradient reduction) for bf16 runs.
  The optimizer is built *after* wrapping, over the (sharded) parameters.
- Both DDP and FSDP2 average gradients over processes; the loop scales each micro batch's loss by
  world_size / (global count) so the result is the exact mean over the global batch.
- Sharded training state goes through `torch.distributed.checkpoint` (see checkpointing.py):
  each process writes its shards, and a checkpoint reloads on any number of processes.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but torch.cuda.is_available() is False")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join (or start, under torchrun) the process group and choose this process's device."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistEnv(rank, world, local, pick_device(device, local), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=pick_device(device, 0))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                            device_id=dev if dev.type == "cuda" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dev, owns_group=True)


def current_env(device="cpu") -> DistEnv:
    """This process's place in the process group already started (by the loop or a test), with
    ``device`` as its device; one process when there is none."""
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), device.index or 0, device)
    return DistEnv(device=device)


def resolve_strategy(strategy: str, env: DistEnv) -> str:
    if strategy == "auto":
        return "ddp" if env.distributed else "none"
    if strategy == "none" and env.distributed:
        raise RuntimeError("distributed: none, but this run has several processes (use ddp or fsdp)")
    return strategy


def wrap_model(model: nn.Module, strategy: str, env: DistEnv, precision: str = "fp32") -> nn.Module:
    """Return the module the loop calls: the model itself, a DDP wrapper, or the FSDP2-sharded model."""
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        for block in model.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r}")


def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into a parameter, which may be an FSDP2 shard (a DTensor):
    each rank keeps its own slice of ``full`` (no communication), so a model built on the meta
    device and sharded first never holds more than one full tensor at a time."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    with torch.no_grad():
        param.copy_(full)


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (an FSDP2 model is its own root)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def grad_sync(model: nn.Module, strategy: str, sync: bool):
    """Skip the gradient all-reduce on all but the last micro batch of a step."""
    if strategy == "ddp" and not sync:
        with model.no_sync():
            yield
        return
    if strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    yield


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over processes (NCCL reduces only CUDA tensors: a CPU tensor makes the round trip)."""
    if env.distributed:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            u = t.to(env.device)
            dist.all_reduce(u, op=dist.ReduceOp.SUM)
            t.copy_(u.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_flag(flag: bool, env: DistEnv) -> bool:
    """True on every process when any process has the flag (a SIGTERM seen by one rank stops all)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64,
                     device=env.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (gathered from FSDP shards when needed), on every rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    m = unwrap(model)
    if any(type(p).__name__ == "DTensor" for p in m.parameters()):
        return get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in m.state_dict().items()}


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
