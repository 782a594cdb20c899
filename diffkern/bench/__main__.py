"""`python -m diffkern.bench`: run the benchmark suite, print the table, write JSON + markdown.

    python -m diffkern.bench                    # every op on the GPU if there is one, else the CPU
    python -m diffkern.bench --device cpu --quick --no-compile --out /tmp/bench
    python -m diffkern.bench --ops end_to_end      # whole pipelines per family: s/image, it/s, peak memory

Beside each suite's JSON and markdown: a CSV and plots (diffkern.bench.report; matplotlib optional).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

import torch

from diffkern.bench import attention, dynamic_threshold, end_to_end, group_norm, guided_step, harness, models, report

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
    p.add_argument("--quick", action="store_true", help="one shape per set (smoke test)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--full-size", action="store_true",
                   help="models suite on a CPU: the released sizes (512x512, 50 steps) and torch.compile peers")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    allocator = harness.pin_cpu_allocator() if device.type == "cpu" else None
    env = harness.environment(device, allocator)
    print(f"diffkern benchmark on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    if allocator is not None:
        print(f"glibc allocator pinned: {allocator}")
    copy_gbps = harness.copy_bandwidth(device)
    env["copy_bandwidth_gbps"] = round(copy_gbps, 1)
    print(f"device-to-device copy bandwidth (read + write): {copy_gbps:.1f} GB/s")
    matmul = harness.matmul_tflops(device) if device.type == "cuda" else None
    if matmul is not None:
        env["matmul_tflops_fp16"] = round(matmul, 1)
        print(f"fp16 matmul rate: {matmul:.1f} TFLOP/s")

    failed = []
    for op in args.ops:
        suite = SUITES[op]
        print(f"\n== {op}")
        kw = dict(quick=args.quick, compile_reference=not args.no_compile)
        if op in ("models", "end_to_end"):
            # compiling a whole UNet takes minutes on a small CPU: there only with --full-size
            kw.update(full_size=args.full_size,
                      compile_reference=kw["compile_reference"] and (device.type == "cuda" or args.full_size))
        rows = suite.run(device, **kw)
        checks = suite.targets(rows, device, copy_gbps)
        notes = [f"Copy bandwidth (read + write) measured in the same run: {copy_gbps:.1f} GB/s.", ""]
        notes += [f"- target {'met' if ok else 'MISSED'}: {text}" for text, ok in checks]
        tag = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
        stem = f"{op}-{tag}{'-quick' if args.quick else ''}"
        if op == "end_to_end":
            notes += ["", report.end_to_end_table(rows)]
        _, report_md = report.write_reports(rows, args.out, stem, device.type, copy_gbps, matmul)
        json_path, md_path = harness.write_results(rows, env, args.out, stem, notes + [""] + report_md)
        print(harness.format_table(rows))
        for text, ok in checks:
            print(f"target {'met' if ok else 'MISSED'}: {text}")
            if not ok:
                failed.append(text)
        print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
