"""Who am I in a torchrun job: rank, world size, device, and the CFG-parallel pairs.

    ctx = init_distributed()                 # under torchrun: joins the process group (nccl / gloo)
    mine = shard(prompts, ctx.data_rank, ctx.data_world)

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process; without
them (a plain `python` run) the context is a single process and nothing is initialised.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    """rank / world_size over all processes; device: this rank's (cuda:LOCAL_RANK or cpu).

    With cfg_parallel, ranks 2k and 2k + 1 form a pair that runs the same images (each the
    unconditional or conditional half of every guided step): data_rank = rank // 2 numbers the
    pairs, data_world counts them, and only the pair's first rank writes (`writes`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    cfg_parallel: bool = False
    cfg_group: object = None  # the torch.distributed group of this rank's pair
    initialized_here: bool = False

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def data_rank(self):
        return self.rank // 2 if self.cfg_parallel else self.rank

    @property
    def data_world(self):
        return self.world_size // 2 if self.cfg_parallel else self.world_size

    @property
    def cfg_rank(self):
        """0 (unconditional half) or 1 (conditional half) within the pair."""
        return self.rank % 2 if self.cfg_parallel else 0

    @property
    def writes(self):
        return self.cfg_rank == 0

    def close(self):
        """Leave the process group if init_distributed joined it."""
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.initialized_here = False


def _env_int(name, default):
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(device=None, *, backend=None, cfg_parallel=False, timeout_s=1800):
    """The DistContext of this process, joining torchrun's process group when there is one.

    device: "cuda", "cpu" or None (cuda when torch sees one). With CUDA each rank takes
    cuda:LOCAL_RANK and the backend defaults to nccl; on the CPU, gloo. cfg_parallel: pair the
    ranks (the world size must be even). A group that is already initialised is used as it is.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(kind).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}") from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but torch sees no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} CUDA "
                             "device(s); start at most that many processes per node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    if cfg_parallel and (world < 2 or world % 2):
        raise ValueError(f"cfg_parallel: needs an even number of processes (pairs of ranks), got "
                         f"{world}; start with torchrun --nproc-per-node 2")
    ctx = DistContext(rank, world, local_rank, dev, cfg_parallel)
    if world == 1:
        return ctx
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if kind == "cuda" else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout_s))
        ctx.initialized_here = True
    ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
    if cfg_parallel:
        # every rank must create every group, in the same order
        groups = [dist.new_group([2 * p, 2 * p + 1]) for p in range(ctx.world_size // 2)]
        ctx.cfg_group = groups[ctx.rank // 2]
    return ctx


def shard(items, rank, world_size):
    """This rank's share of `items`: every world_size-th one from position `rank` (balanced to one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    return list(items)[rank::world_size]
