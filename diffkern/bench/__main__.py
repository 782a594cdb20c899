"""`python -m diffkern.bench`: run the benchmark suite, print the tables, write JSON, markdown, CSV, plots.

    python -m diffkern.bench                     # the quick suite (what `make bench` runs): every op at its
                                                 # headline shapes, one model step, one short end-to-end run
    python -m diffkern.bench --full              # every shape, dtype and model (the numbers of record)
    python -m diffkern.bench --full --out benchmarks/results   # write the official, committed results
    python -m diffkern.bench --ops group_norm attention --no-compile

Results go to benchmarks/out/ (untracked) unless --out says otherwise. Timing is interleaved round by
round (diffkern.bench.timing): each row has its median and spread (IQR); a row whose spread exceeds
--max-spread is marked unreliable and prints no speed-up. The run starts with the CPU model and load
average and ends with each target: met / MISSED / unreliable. Beside each suite's JSON and markdown:
a CSV and plots (diffkern.bench.report; matplotlib optional), and one index page linking them all.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

import torch

from diffkern.bench import attention, dynamic_threshold, end_to_end, group_norm, guided_step, harness, models, report
from diffkern.bench import timing

DEFAULT_OUT = "benchmarks/out"  # gitignored: a plain `make bench` leaves the clone clean

SUITES = {"group_norm": group_norm, "attention": attention, "dynamic_threshold": dynamic_threshold,
          "guided_step": guided_step, "models": models}
SUITES["schedulers"] = importlib.import_module("diffkern.bench.schedulers")  # each sampler's step vs diffusers'
SUITES["end_to_end"] = end_to_end  # whole pipelines per family: s/image, it/s, peak memory (report.end_to_end_table)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # `diffkern bench ...`
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="python -m diffkern.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", nargs="+", choices=sorted(SUITES), default=sorted(SUITES))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="every shape, dtype and model (default: the quick suite)")
    size.add_argument("--quick", action="store_true", help="the quick suite (the default; kept for old commands)")
    p.add_argument("--compile", action="store_true",
                   help="on a CPU, add the torch.compile peer to the quick suite too (minutes of compiling)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--full-size", action="store_true",
                   help="models suite on a CPU: the released sizes (512x512, 50 steps) and torch.compile peers")
    p.add_argument("--max-spread", type=float, default=timing.SPREAD_BOUND,
                   help="IQR / median above which a row is unreliable (default %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="folder for the results (default %(default)s, untracked; official: benchmarks/results)")
    args = p.parse_args(argv)
    previous_bound, timing.SPREAD_BOUND = timing.SPREAD_BOUND, args.max_spread
    try:  # the bound is module state that the report code reads; a caller of main() gets it back
        return _run(args, not args.full)
    finally:
        timing.SPREAD_BOUND = previous_bound


def _run(args, quick):
    device = torch.device(args.device)
    allocator = harness.pin_cpu_allocator() if device.type == "cpu" else None
    env = harness.environment(device, allocator)
    env.update(timing.machine_state(), suite="quick" if quick else "full", spread_bound=args.max_spread)
    print(f"diffkern benchmark ({env['suite']} suite) on {env['device']} (torch {env['torch']}, "
          f"triton {env['triton']})")
    print(f"CPU: {env['cpu_model']}, {env['cpu_count']} CPUs, load average {env['load_average']} "
          "(a load near or above the CPU count makes rows noisy: they are marked unreliable)")
    if allocator is not None:
        print(f"glibc allocator pinned: {allocator}")
    copy_gbps = harness.copy_bandwidth(device)
    env["copy_bandwidth_gbps"] = round(copy_gbps, 1)
    print(f"device-to-device copy bandwidth (read + write): {copy_gbps:.1f} GB/s")
    matmul = harness.matmul_tflops(device) if device.type == "cuda" else None
    if matmul is not None:
        env["matmul_tflops_fp16"] = round(matmul, 1)
        print(f"fp16 matmul rate: {matmul:.1f} TFLOP/s")
    # compiling every case takes minutes on a small CPU: the quick CPU suite leaves the compile peer out
    compile_ref = not args.no_compile and (device.type == "cuda" or not quick or args.compile)

    summary, index = [], []
    tag = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
    for op in args.ops:
        suite = SUITES[op]
        print(f"\n== {op}")
        kw = dict(quick=quick, compile_reference=compile_ref)
        if op in ("models", "end_to_end"):
            # compiling a whole UNet takes minutes on a small CPU: there only with --full-size
            kw.update(full_size=args.full_size,
                      compile_reference=kw["compile_reference"] and (device.type == "cuda" or args.full_size))
        rows = suite.run(device, **kw)
        checks = suite.targets(rows, device, copy_gbps)
        notes = [f"Copy bandwidth (read + write) measured in the same run: {copy_gbps:.1f} GB/s.",
                 f"Timing: interleaved rounds; 'IQR %' is the spread of a row's per-round samples; rows above "
                 f"{100 * args.max_spread:.0f}% (or whose baseline is) are unreliable and print no speed-up; "
                 "'x ref (IQR)' gives the quartiles of the per-round ratios.", ""]
        notes += [f"- target {_verdict(ok)}: {text}" for text, ok in checks]
        stem = f"{op}-{tag}{'-quick' if quick else ''}"
        if op == "end_to_end":
            notes += ["", report.end_to_end_table(rows)]
        paths, report_md = report.write_reports(rows, args.out, stem, device.type, copy_gbps, matmul)
        json_path, md_path = harness.write_results(rows, env, args.out, stem, notes + [""] + report_md)
        print(harness.format_table(rows))
        unreliable = sum(1 for r in rows if not r.reliable)
        if unreliable:
            print(f"{unreliable} of {len(rows)} rows unreliable (spread > {100 * args.max_spread:.0f}%)")
        for text, ok in checks:
            print(f"target {_verdict(ok)}: {text}")
        summary += [(op, text, ok) for text, ok in checks]
        index.append((op, md_path, json_path, paths, len(rows), unreliable))
        print(f"wrote {json_path} and {md_path}")
    index_path = report.write_index(index, summary, env, args.out, f"index-{tag}{'-quick' if quick else ''}")
    print("\n== summary")
    for op, text, ok in summary:
        print(f"  {_verdict(ok):10s} {op}: {text}")
    counts = {v: sum(1 for *_, ok in summary if _verdict(ok) == v) for v in ("met", "MISSED", "unreliable")}
    print(f"targets: {counts['met']} met, {counts['MISSED']} missed, {counts['unreliable']} unreliable; "
          f"load average now {timing.machine_state()['load_average']}")
    print(f"index of tables and plots: {index_path}")
    return 0


def _verdict(ok):
    return "unreliable" if ok is None else "met" if ok else "MISSED"


if __name__ == "__main__":
    sys.exit(main())
