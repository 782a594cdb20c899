"""The probes behind benchmarks/results/group_norm-cpu-side-by-side-xeon.md (shared CPU machines).

    python benchmarks/group_norm_cpu_probes.py wall THREADS N,C,H,W contig|cl ROUNDS
        eager reference, the C++ kernel, the kernel without SiLU and x.clone(), interleaved, 8 calls
        each per round; prints median / min microseconds and the eager / kernel ratios.
    python benchmarks/group_norm_cpu_probes.py cputime [OUT.json]
        one thread, time.thread_time per call (time the thread was descheduled is excluded).

Run it with PYTHONPATH pointing at the tree whose diffkern._C is to be measured (A/B of two builds).
"""

import json
import os
import statistics
import sys
import time

import torch

from diffkern import ops
from diffkern.bench import harness
from diffkern.kernels import reference


def wall(threads, shape, layout, rounds):
    torch.set_num_threads(threads)
    x = torch.randn(shape)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    fns = {"ref": lambda: reference.group_norm(x, 32, w, b, activation="silu"),
           "cpu": lambda: ops.group_norm(x, 32, w, b, activation="silu", backend="cpu"),
           "nosilu": lambda: ops.group_norm(x, 32, w, b, backend="cpu"),
           "copy": lambda: x.clone()}
    res = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                for _ in range(8):
                    t = time.perf_counter()
                    f()
                    res[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e6 for k, v in res.items()}
    low = {k: min(v) * 1e6 for k, v in res.items()}
    print(" ".join(f"{k}={med[k]:.0f}/{low[k]:.0f}" for k in fns),
          f"ratio med={med['ref'] / med['cpu']:.2f} min={low['ref'] / low['cpu']:.2f}")


def cputime(out=None):
    torch.set_num_threads(1)
    rows = []
    for shape, cl, ss in [((2, 320, 64, 64), False, False), ((2, 320, 64, 64), True, False),
                          ((2, 320, 64, 64), False, True), ((2, 1280, 8, 8), True, False),
                          ((2, 1280, 8, 8), False, False), ((2, 640, 32, 32), True, False)]:
        x = torch.randn(shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        C = shape[1]
        w, b = torch.randn(C), torch.randn(C)
        sc, sh = (0.1 * torch.randn(2, C), torch.randn(2, C)) if ss else (None, None)
        fns = {"reference": lambda: reference.group_norm(x, 32, w, b, scale=sc, shift=sh, activation="silu"),
               "cpu": lambda: ops.group_norm(x, 32, w, b, scale=sc, shift=sh, activation="silu", backend="cpu")}
        res = {k: [] for k in fns}
        with torch.no_grad():
            for f in fns.values():
                f()
            for _ in range(8):
                for k, f in fns.items():
                    for _ in range(8):
                        t = time.thread_time()
                        f()
                        res[k].append(time.thread_time() - t)
        med = {k: statistics.median(v) * 1e6 for k, v in res.items()}
        row = dict(shape=shape, layout="channels_last" if cl else "contiguous", scale_shift=ss,
                   cpu_time_median_us=med, ratio=med["reference"] / med["cpu"], load=os.getloadavg()[0])
        rows.append(row)
        print(f"{shape} {row['layout']} ss={ss}: eager {med['reference']:.0f} us, kernel {med['cpu']:.0f} us, "
              f"x{row['ratio']:.2f} (load {row['load']:.1f})")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    harness.pin_cpu_allocator()
    if sys.argv[1] == "wall":
        wall(int(sys.argv[2]), tuple(int(v) for v in sys.argv[3].split(",")), sys.argv[4], int(sys.argv[5]))
    else:
        cputime(sys.argv[2] if len(sys.argv) > 2 else None)
