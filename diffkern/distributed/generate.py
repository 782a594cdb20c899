"""The batch-generation driver: jobs -> batches -> ranks -> PNG files + manifest.jsonl.

    ctx = init_distributed()
    runner = runner_for(pipe, model="sd15")
    jobs = make_jobs(read_prompts("prompts.txt"), seed=0, defaults=runner.defaults)
    result = generate_images(runner, jobs, "out/", batch_size=4, context=ctx)

The batches are made once from all jobs (make_batches), the same for any world size, and dealt
round-robin to the ranks (to the pairs under CFG-parallel), so every image is computed in the
same batch, from its own generator, whatever the number of processes: the PNG bytes are equal.
The ranks go through their batches in rounds; after each round one all_reduce adds up the images
done (rank 0's tqdm bar counts all of them) and any failure, so that when a rank fails every rank
stops after that round, with everything written so far kept, and all report the failure.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffkern.distributed.context import DistContext
from diffkern.distributed.output import RankLog, image_name, merge_manifest, record_for, save_png
from diffkern.distributed.prompts import make_batches


@dataclass
class GenerationResult:
    """What a generate_images call did, over all ranks (on every rank)."""

    written: int = 0  # images made in this run
    skipped: int = 0  # images already there (resume)
    failures: list = field(default_factory=list)  # {"rank", "index", "line", "prompt", "error"} per failed rank
    records: list = field(default_factory=list)  # the merged manifest (rank 0; [] elsewhere)
    seconds: float = 0.0  # wall time of the generation rounds (the slowest rank's), without loading

    @property
    def ok(self):
        return not self.failures


def _progress_bar(total, initial, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, initial=initial, unit="image", desc="generate")


def generate_images(runner, jobs, outdir, *, batch_size=1, resume=False, progress=True, context=None):
    """Make the images of `jobs` with `runner` and write them to `outdir`; returns a GenerationResult.

    runner: a callable runner(jobs, generators) -> list of PIL images, with `metadata` (a dict put in
        every record: model, scheduler, ...); see diffkern.distributed.runners.
    jobs: Jobs from make_jobs (each with its index, seed and settings).
    resume: skip images whose file exists (files are written atomically, so one that exists is whole);
        without it, existing files are overwritten.
    context: a DistContext (init_distributed()); None: a single process.
    Under torch.distributed every rank must call this with the same jobs and arguments.
    """
    ctx = context or DistContext()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    todo = _todo(ctx, jobs, outdir, resume)
    skipped = len(jobs) - len(todo)
    batches = make_batches(todo, batch_size)
    mine = batches[ctx.data_rank::ctx.data_world]
    rounds = -(-len(batches) // ctx.data_world)
    meta = dict(getattr(runner, "metadata", {}) or {})
    bar = _progress_bar(len(jobs), skipped, progress and ctx.rank == 0)
    log = RankLog(outdir, ctx.rank) if ctx.writes else None
    records, failure, written = [], None, 0
    start = time.perf_counter()
    try:
        for r in range(rounds):
            done = 0
            if r < len(mine) and failure is None:
                batch = mine[r]
                try:
                    done = _run_batch(runner, batch, outdir, meta, log, records, ctx.writes)
                except Exception as e:  # reported with the prompt it was on; the others stop after this round
                    failure = _failure(ctx, batch, e)
            written += done
            done_all, failed_all = _sum(ctx, done, failure is not None)
            if bar is not None:
                bar.update(done_all)
            if failed_all:
                break
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return _finish(ctx, outdir, records, failure, written, skipped, time.perf_counter() - start)


def _todo(ctx, jobs, outdir, resume):
    """The jobs to run: all, or with resume those whose image is missing, as rank 0 sees the folder
    (broadcast, so that every rank deals the same batches even while others start writing)."""
    done = sorted(j.index for j in jobs if resume and (outdir / image_name(j.index)).is_file()) \
        if ctx.rank == 0 else None
    if ctx.distributed:
        box = [done]
        torch.distributed.broadcast_object_list(box, src=0)
        done = box[0]
    done = set(done)
    return [j for j in jobs if j.index not in done]


def _run_batch(runner, batch, outdir, meta, log, records, writes):
    generators = [torch.Generator().manual_seed(job.seed) for job in batch]
    images = runner(batch, generators)
    if len(images) != len(batch):
        raise RuntimeError(f"the runner returned {len(images)} images for a batch of {len(batch)}")
    if not writes:  # the second rank of a CFG-parallel pair: its partner writes the same images
        return 0
    for job, image in zip(batch, images):
        rec = record_for(job, meta, image.size)
        save_png(image, outdir / rec["file"], {k: v for k, v in rec.items() if k not in ("index", "file")})
        log.append(rec)
        records.append(rec)
    return len(batch)


def _failure(ctx, batch, error):
    job = batch[0]
    prompts = ", ".join(repr(j.prompt) for j in batch)
    print(f"diffkern generate: rank {ctx.rank} failed on image {job.index} (prompt line {job.line}: "
          f"{job.prompt!r}; batch {prompts}): {type(error).__name__}: {error}", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    return {"rank": ctx.rank, "index": job.index, "line": job.line, "prompt": job.prompt,
            "error": f"{type(error).__name__}: {error}"}


def _sum(ctx, done, failed):
    """(images done this round, ranks failed) over all ranks: one all_reduce."""
    if not ctx.distributed:
        return done, int(failed)
    dev = ctx.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([done, int(failed)], dtype=torch.int64, device=dev)
    torch.distributed.all_reduce(t)
    return int(t[0]), int(t[1])


def _finish(ctx, outdir, records, failure, written, skipped, seconds):
    """Gather every rank's records and failure; rank 0 merges the manifest; all get the totals."""
    if ctx.distributed:
        everyone = [None] * ctx.world_size
        torch.distributed.all_gather_object(everyone, (records, failure, written, seconds))
    else:
        everyone = [(records, failure, written, seconds)]
    all_records = [r for recs, *_ in everyone for r in recs]
    failures = [f for _, f, *_ in everyone if f is not None]
    merged = merge_manifest(outdir, all_records) if ctx.rank == 0 else []
    if ctx.distributed:  # nobody returns (and maybe exits) before the manifest is on disk
        torch.distributed.barrier()
    return GenerationResult(sum(e[2] for e in everyone), skipped, failures, merged, max(e[3] for e in everyone))
