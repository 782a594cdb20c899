"""Run by tests/distributed/test_multiprocess.py under torchrun (2 processes, gloo): several runs in
one launch (process start-up dominates the test time). argv: a JSON file of paths; each rank writes
rank-N.json with what it saw next to it."""

import json
import sys
from pathlib import Path

import torch

from diffkern import distributed as dd
from diffkern.cli import main


def _sd_runs(cfg):
    """The CLI, data parallel (a prompt file with a bad line: one rank fails) and CFG-parallel."""
    seen = []
    enable = dd.enable_cfg_parallel

    def recording(pipe, ctx, *a, **k):  # keep the pipeline, to count the split model calls
        seen.append(pipe)
        return enable(pipe, ctx, *a, **k)

    dd.enable_cfg_parallel = recording
    common = ["generate", "--checkpoint", cfg["sd"], *cfg["sd_args"]]
    status_dp = main(common + ["--prompts", cfg["bad_prompts"], "--outdir", cfg["out_dp"]])
    status_cfg = main(common + ["--prompts", cfg["prompts"], "--outdir", cfg["out_cfg"], "--batch-size", "2",
                                "--cfg-parallel"])
    return {"status_dp": status_dp, "status_cfg": status_cfg,
            "sd_split_calls": seen[0].unet.split_calls if seen else 0}


def _glide_cfg(cfg, ctx):
    """GLIDE through the Python API, CFG-parallel, against the same pipeline run alone on this rank."""
    from diffkern.pipelines.glide import GlidePipeline

    pipe = GlidePipeline.from_checkpoints(cfg["glide"], tokenizer=Path(cfg["glide_tok"]),
                                          base_options=cfg["glide_options"])
    prompts = ["a corgi", "corgi", "a"]

    def run():
        gens = [torch.Generator().manual_seed(10 + i) for i in range(len(prompts))]
        return pipe(prompts, guidance_scale=4.0, base_respacing="3", generator=gens, output_type="pt",
                    progress=False).images

    alone = run()
    dd.enable_cfg_parallel(pipe, ctx)
    split = run()
    # BLAS rounds a half batch differently from the whole one (the tiny GLIDE UNet's time-embedding
    # Linear: ~2e-7 between 6 and 3 rows, 2e-6 at its output), and 3 DDPM steps of a random-weight
    # model amplify that; SD's tiny UNet happens to give the same bits (see the CLI test)
    levels = ((alone * 255).round() - (split * 255).round()).abs().max()
    return {"glide_max_levels": float(levels), "glide_max_diff": float((alone - split).abs().max()),
            "glide_split_calls": pipe.base_model.split_calls}


if __name__ == "__main__":
    cfg = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(1)
    ctx = dd.init_distributed("cpu")  # the CLI runs below find the group initialised and use it
    seen = {"rank": ctx.rank, "world": ctx.world_size, "backend": torch.distributed.get_backend()}
    seen.update(_sd_runs(cfg))
    ctx_pairs = dd.init_distributed("cpu", cfg_parallel=True)
    seen.update(_glide_cfg(cfg, ctx_pairs))
    with open(cfg["report"].replace("RANK", str(ctx.rank)), "w") as f:
        json.dump(seen, f)
    ctx.close()
