"""The one-process context and its checks (no process group is created here)."""

import pytest
import torch

from diffkern.distributed import DistContext, enable_cfg_parallel, init_distributed


def test_without_torchrun_a_single_process_context(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.device, ctx.distributed) == (0, 1, torch.device("cpu"), False)
    assert (ctx.data_rank, ctx.data_world, ctx.writes) == (0, 1, True)
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="even number of processes"):
        init_distributed("cpu", cfg_parallel=True)
    with pytest.raises(ValueError, match="device"):
        init_distributed("tpu")
    with pytest.raises(ValueError, match="device"):
        init_distributed("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            init_distributed("cuda")


def test_pairs_number_the_data_ranks():
    ctx = DistContext(rank=3, world_size=6, cfg_parallel=True)
    assert (ctx.data_rank, ctx.data_world, ctx.cfg_rank, ctx.writes) == (1, 3, 1, False)
    assert DistContext(rank=4, world_size=6, cfg_parallel=True).writes


def test_enable_cfg_parallel_needs_a_denoiser():
    class NoModel:
        pass

    pipe = NoModel()
    assert enable_cfg_parallel(pipe, DistContext()) is pipe  # one process: nothing to split
    with pytest.raises(ValueError, match="has none of unet, base_model, upsampler_model"):
        enable_cfg_parallel(pipe, DistContext(rank=0, world_size=2, cfg_parallel=True))
