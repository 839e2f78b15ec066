"""Thin helpers over torch.distributed; every function is a no-op in a single process.

Launch with `torchrun --nproc_per_node=G train/main.py ...`: torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and we join the process group here.
"""
import os

import torch
import torch.distributed as dist


def init(device_kind):
    """Join the process group torchrun prepared (NCCL on CUDA, gloo otherwise); returns (rank, world_size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    return rank() == 0


def local_rank():
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_gather(t):
    """Concatenate the tensors of all ranks along dim 0, in rank order (no gradient).

    The sizes along dim 0 may differ between ranks (the last batch of an epoch).
    """
    if not is_distributed():
        return t
    t = t.contiguous()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.empty_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes),) + t.shape[1:])
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def broadcast(t, src=0):
    if is_distributed():
        dist.broadcast(t, src)
    return t


def all_reduce_sum(t):
    if is_distributed():
        dist.all_reduce(t)
    return t


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
