"""`diffkern generate --prompts FILE --outdir DIR`: a prompt file through diffkern.distributed, for any family.

The same command runs under `torchrun --nproc-per-node N` (and multi-node torchrun): each rank
joins the process group, loads the pipeline on its device (cuda:LOCAL_RANK, or the CPU with gloo)
and makes its share of the batches; rank 0 merges manifest.jsonl. See diffkern.distributed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffkern.cli_common import UsageError, backend_context


def _specs(module, args):
    """The prompt file read and every line checked (keys the family takes, their values), before loading."""
    from diffkern.distributed import read_prompts

    try:
        specs = read_prompts(args.prompts)
    except (OSError, ValueError) as e:
        raise UsageError(f"--prompts: {e}") from None
    accepts = getattr(module, "LINE_KEYS", None)  # what the family's runner takes per line
    check = getattr(module, "check_line", None)  # its own checks of a line's values
    for spec in specs:
        where = f"--prompts: {args.prompts}:{spec.get('line')}"
        if accepts is not None:
            refused = sorted(k for k in spec if k not in ("prompt", "seed", "line") and k not in accepts)
            if refused:
                raise UsageError(f"{where}: {module.NAME} does not take per-prompt {', '.join(refused)} (it takes "
                                 f"{', '.join(accepts) or 'none'})")
        steps = spec.get("steps")
        if isinstance(steps, str) and not getattr(module, "STEPS_AS_TEXT", False):
            raise UsageError(f"{where}: \"steps\" must be a positive integer for {module.NAME}, got {steps!r}")
        if check is not None:
            problem = check(spec, args)
            if problem:
                raise UsageError(f"{where}: {problem}")
    return specs


def _check_manifest(args):
    """--resume: the earlier manifest must be a readable file (bad lines in it are skipped, not fatal)."""
    from diffkern.distributed.output import MANIFEST

    manifest = Path(args.outdir) / MANIFEST
    if manifest.exists() and not manifest.is_file():
        raise UsageError(f"--outdir: {manifest} exists and is not a file")
    if manifest.is_file():
        try:
            manifest.read_bytes()
        except OSError as e:
            raise UsageError(f"--resume: cannot read {manifest} ({e.strerror or e})") from None


def _jobs(args, runner, specs):
    from diffkern.distributed import make_jobs

    try:
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
        specs = _specs(module, args)  # a bad line is refused before any model is loaded or image made
        _check_manifest(args)
        runner = module.make_runner(args, ctx.device)
        jobs = _jobs(args, runner, specs)
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
