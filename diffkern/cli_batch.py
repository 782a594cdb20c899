"""`diffkern generate --prompts FILE --outdir DIR`: a prompt file through diffkern.distributed, for any family.

The same command runs under `torchrun --nproc-per-node N` (and multi-node torchrun): each rank
joins the process group, loads the pipeline on its device (cuda:LOCAL_RANK, or the CPU with gloo)
and makes its share of the batches; rank 0 merges manifest.jsonl. See diffkern.distributed.
"""

from __future__ import annotations

import sys

from diffkern.cli_common import UsageError, backend_context


def _jobs(args, runner):
    from diffkern.distributed import make_jobs, read_prompts

    try:
        specs = read_prompts(args.prompts)
        return make_jobs(specs, seed=args.seed, num_images=args.num_images, defaults=runner.defaults,
                         accepts=runner.accepts)
    except (OSError, ValueError) as e:
        raise UsageError(f"--prompts: {e}") from None


def _cfg_parallel(module, runner, ctx):
    """Wrap the runner's pipelines (runner.cfg_parallel_pipes, else [runner.pipe]) for CFG-parallel."""
    from diffkern import distributed

    pipes = getattr(runner, "cfg_parallel_pipes", None) or [getattr(runner, "pipe", None)]
    try:
        for pipe in pipes:
            if pipe is None:
                raise ValueError("its runner exposes no pipeline (runner.pipe)")
            distributed.enable_cfg_parallel(pipe, ctx)
    except ValueError as e:
        raise UsageError(f"--cfg-parallel: not available for {module.NAME} ({e})") from None


def generate_batch(module, args):
    """Run a prompt file with the family `module` (see diffkern.cli.FAMILIES); returns the
    GenerationResult (failures listed there and on stderr; exit status 1 when there are some)."""
    from diffkern import distributed

    try:
        ctx = distributed.init_distributed(args.device, cfg_parallel=args.cfg_parallel)
    except ValueError as e:
        raise UsageError(f"--cfg-parallel / --device: {e}") from None
    try:
        runner = module.make_runner(args, ctx.device)
        jobs = _jobs(args, runner)
        if args.cfg_parallel:
            _cfg_parallel(module, runner, ctx)
        with backend_context(args.backend):
            result = distributed.generate_images(runner, jobs, args.outdir, batch_size=args.batch_size,
                                                 resume=args.resume, progress=not args.quiet, context=ctx)
    finally:
        ctx.close()
    if ctx.rank == 0:
        rate = f" in {result.seconds:.1f} s ({result.written / result.seconds:.2f} images/s)" \
            if result.written and result.seconds > 0 else ""
        print(f"{result.written} images written{rate}, {result.skipped} already there; manifest: "
              f"{args.outdir}/manifest.jsonl ({len(result.records)} images)")
        for f in result.failures:
            print(f"diffkern generate: rank {f['rank']} failed on image {f['index']} (prompt line {f['line']}: "
                  f"{f['prompt']!r}): {f['error']}; rerun with --resume to finish", file=sys.stderr)
    return result
