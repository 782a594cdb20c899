"""Batch and multi-process generation on torch.distributed (launched with torchrun).

    from diffkern import distributed as dd
    ctx = dd.init_distributed()                       # rank, world, cuda:LOCAL_RANK or cpu (gloo)
    pipe = load_pipeline("sd15", device=ctx.device)
    runner = dd.runner_for(pipe, model="sd15")
    jobs = dd.make_jobs(dd.read_prompts("prompts.jsonl"), seed=0, defaults=runner.defaults,
                        accepts=runner.accepts)
    result = dd.generate_images(runner, jobs, "out/", batch_size=4, resume=True, context=ctx)

Run the same script with `torchrun --nproc-per-node N script.py`: prompts are sharded by rank,
rank 0 merges manifest.jsonl, the PNGs are byte-identical to a one-process run. With
init_distributed(cfg_parallel=True) and enable_cfg_parallel(pipe, ctx), pairs of ranks split
each guided step's conditional and unconditional halves. `diffkern generate --prompts` is this.
"""

from diffkern.distributed.cfg_parallel import BatchSplitModel, disable_cfg_parallel, enable_cfg_parallel
from diffkern.distributed.context import DistContext, init_distributed, shard
from diffkern.distributed.generate import GenerationResult, generate_images
from diffkern.distributed.output import merge_manifest, png_text, read_records, save_png
from diffkern.distributed.prompts import Job, make_batches, make_jobs, read_prompts
from diffkern.distributed.runners import GlideRunner, SDRunner, runner_for

__all__ = [
    "BatchSplitModel", "DistContext", "GenerationResult", "GlideRunner", "Job", "SDRunner",
    "disable_cfg_parallel", "enable_cfg_parallel", "generate_images", "init_distributed", "make_batches",
    "make_jobs", "merge_manifest", "png_text", "read_prompts", "read_records", "runner_for", "save_png",
    "shard",
]
