"""Multi-process training on PyTorch's own engine: torchrun env vars, DDP, sharding, rank-0 output.

`torchrun --nproc_per_node N -m fastprompt train CONFIG` starts N copies of the command; each reads
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment torchrun sets
(multi-node: the same through torchrun's rendezvous). `init_from_env` joins the process group
(nccl on CUDA, gloo on CPU); everything else here is a no-op in a single process, so the training
loop and the protocols call these helpers unconditionally.

How one global batch is shared: every rank draws the same batch order and the same augmentation
(same seeded generators), then keeps its contiguous slice of the batch. Each rank's loss is the mean
over its slice and DDP averages the gradients, so with equal slices the update equals the
single-process step on the whole batch (to float rounding).

Besides the training process group (nccl on GPUs) a gloo group carries the small control messages
(stop flags, barriers): they never touch the GPU stream, so checking for SIGTERM every step costs no
device synchronisation.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

__all__ = [
    "init_from_env",
    "teardown",
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "any_rank",
    "share_from_main",
    "local_slice",
    "shard",
    "wrap_ddp",
    "device_for",
]

_control: Optional[dist.ProcessGroup] = None


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer (torchrun sets it)") from None


def init_from_env(device_name: str = "auto") -> bool:
    """Join the process group torchrun describes; returns True when running distributed.

    device_name is the config's train.device: "cpu" forces gloo even on a GPU machine.
    """
    global _control
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, e.g. "
                         "torchrun --nproc_per_node 2 -m fastprompt train CONFIG")
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(_env_int("LOCAL_RANK") or 0)
    # A generous timeout: rank 0 alone writes checkpoints and reports while the others wait.
    timeout = datetime.timedelta(minutes=30)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    _control = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else dist.group.WORLD
    return True


def teardown() -> None:
    """Leave the process group (every rank, also after an error)."""
    global _control
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return (_env_int("LOCAL_RANK") or 0) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 writes files, logs and prints; the others compute."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier(group=_control)


def device_for(device: torch.device) -> torch.device:
    """Each rank drives its own GPU: a bare "cuda" becomes cuda:LOCAL_RANK under torchrun."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (returned for chaining); identity in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a SIGTERM seen by one rank)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def share_from_main(value):
    """Rank 0's `value` on every rank (a small picklable object, e.g. an error to raise everywhere);
    `value` itself in one process."""
    if not is_distributed():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def local_slice(global_batch: int) -> slice:
    """This rank's contiguous part of a global batch of `global_batch` samples."""
    world = world_size()
    if global_batch % world:
        raise ConfigError(
            f"train.batch_size: the global batch of {global_batch} images does not split evenly over {world} "
            f"processes; use a multiple of {world} (e.g. train.batch_size={max(world, global_batch // world * world)})"
        )
    per_rank = global_batch // world
    return slice(rank() * per_rank, (rank() + 1) * per_rank)


def shard(items: list) -> list:
    """Every world_size-th item starting at this rank (evaluation: counts are summed afterwards)."""
    return items[rank()::world_size()] if is_distributed() else items


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable parameters only; `model` itself in one process.

    The frozen CLIP is built identically on every rank (same weights file, or the same seed for
    random weights), so DDP is told to ignore it: no start-up broadcast of hundreds of MB, no
    gradient buckets for it, and no buffer broadcasts (nothing trainable is a buffer).
    """
    if not is_distributed():
        return model
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
