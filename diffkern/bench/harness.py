"""Benchmark harness: timing, environment record, and one row definition that produces the printed
table, the JSON and the markdown.

CPU timing: the median of torch.utils.benchmark's blocked_autorange, every candidate of a case timed
in the same process one after another, with glibc's allocator pinned (see `pin_cpu_allocator`).
GPU timing: triton.testing.do_bench's median (warm-up, L2 flushed before every repetition), or CUDA
events when Triton is absent.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
ALLOCATOR_SETTINGS = {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30, "M_TOP_PAD": 256 << 20}


def pin_cpu_allocator():
    """Keep freed heap memory mapped so that eager PyTorch's temporaries do not pay for heap trimming
    and fresh page faults on every call (which would inflate the reference's time and flatter our
    ratios). Applies to this process only; returns the settings applied, for the record."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return {"pinned": False, "why": "not glibc"}
    codes = {"M_MMAP_THRESHOLD": _M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD, "M_TOP_PAD": _M_TOP_PAD}
    applied = {name: value for name, value in ALLOCATOR_SETTINGS.items() if libc.mallopt(codes[name], value) == 1}
    return {"pinned": len(applied) == len(codes), "glibc_mallopt": applied}


def time_cpu(fn, min_run_time=0.5):
    """Median seconds per call."""
    from torch.utils import benchmark

    fn()  # warm-up (allocations, lazy init)
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return m.blocked_autorange(min_run_time=min_run_time).median


def time_cuda(fn):
    """Median seconds per call, L2 flushed before each repetition."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(fn, warmup=50, rep=200, return_mode="median") * 1e-3
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return sorted(times)[len(times) // 2]


def time_fn(fn, device):
    return time_cuda(fn) if device.type == "cuda" else time_cpu(fn)


def copy_bandwidth(device, nbytes=None):
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / t / 1e9


def matmul_tflops(device, n=8192, dtype=torch.float16):
    """Measured dense matmul rate (2 n^3 FLOP per n x n product) in TFLOP/s: the roof for attention rows."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device)
    return 2 * n ** 3 / t / 1e12


@dataclass
class Row:
    op: str
    case: str
    shape: tuple
    dtype: str
    layout: str
    backend: str
    median_us: float
    gbps: float | None
    speedup_vs_reference: float | None
    speedup_vs_best_peer: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def git_sha():
    if os.environ.get("DIFFKERN_GIT_SHA"):  # set by benchmarks/gpu_suite.sh: the GPU copy has no .git
        return os.environ["DIFFKERN_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[2])
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device, allocator):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from diffkern import _ext

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "diffkern.bench"] + sys.argv[1:]),
        "git_sha": git_sha(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()})",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "extension": _ext.build_info(),
    }
    if device.type == "cpu":
        env["allocator"] = allocator
    return env


def format_table(rows):
    head = ["case", "dtype", "layout", "backend", "median us", "GB/s or TFLOP/s", "x ref", "x best peer", "note"]

    def rate(r):
        if r.gbps is not None:
            return f"{r.gbps:.1f}"
        tf = r.extra.get("tflops")
        return "" if tf is None else f"{tf:.2f} TF"

    body = [[r.case, r.dtype, r.layout, r.backend, f"{r.median_us:.1f}", rate(r),
             "" if r.speedup_vs_reference is None else f"{r.speedup_vs_reference:.2f}",
             "" if r.speedup_vs_best_peer is None else f"{r.speedup_vs_best_peer:.2f}", r.note] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def write_results(rows, env, out_dir, stem, notes=()):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]},
                                                     indent=1) + "\n")
    md = [f"# {stem}", "", f"Command: `{env['command']}`", ""]
    md += [f"- {k}: {v}" for k, v in env.items() if k != "command"]
    md += [""] + [f"{n}" for n in notes] + ["", format_table(rows), ""]
    (out_dir / f"{stem}.md").write_text("\n".join(md))
    return out_dir / f"{stem}.json", out_dir / f"{stem}.md"


def compile_checked(fn, *args, **kwargs):
    """(call, "") where call() runs inductor's `fn(*args, **kwargs)`, compiled with a fresh dynamo
    cache and run once; (None, "failed: ...") when that fails (compile is a peer: its failure is a
    result to record, not our error)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False)
    call = lambda: compiled(*args, **kwargs)  # noqa: E731
    try:
        call()
    except Exception as e:  # noqa: BLE001
        return None, f"failed: {type(e).__name__}: {str(e)[:80]}"
    return call, ""


def compile_candidate(fn, *args, **kwargs):
    """("torch.compile", callable or None, note): the reference under inductor (see compile_checked)."""
    call, why = compile_checked(fn, *args, **kwargs)
    return ("torch.compile", call, why or "peer: inductor on the reference")


def kernel_backends(op, device, would_run):
    """The op's usable backends to time beside the reference: not the reference itself (each suite
    times its own eager baseline), not the Triton interpreter on CPU (it is for tests), and only
    those that take this case (would_run(name) raises ValueError otherwise, as the op would)."""
    from diffkern import ops

    names = []
    for name in ops.available_backends(op):
        if name == "reference" or (name == "triton" and device.type == "cpu"):
            continue
        try:
            would_run(name)
        except ValueError:
            continue
        names.append(name)
    return names


def run_cases(op, cases, make_candidates, device, describe, log=print):
    """Time every candidate of every case side by side (inference mode) and build the rows.

    make_candidates(case) -> ([(name, fn or None, note)], bytes moved); one candidate is named
    "reference" (the speed-up baseline) and one may be "torch.compile" (the peer).
    describe(case) -> (label, dtype name, layout)."""
    rows = []
    for case in cases:
        times = {}
        with torch.no_grad():
            cands, nbytes = make_candidates(case)
            for name, fn, _ in cands:
                times[name] = time_fn(fn, device) if fn is not None else None
        t_ref, t_peer = times["reference"], times.get("torch.compile")
        label, dtype, layout = describe(case)
        for name, _, note in cands:
            t = times[name]
            if t is None:
                rows.append(Row(op, label, tuple(case.shape), dtype, layout, name, float("nan"), None, None, None, note))
                continue
            peer = (t_peer / t) if (t_peer and name != "torch.compile") else None
            rows.append(Row(op, label, tuple(case.shape), dtype, layout, name, t * 1e6, nbytes / t / 1e9, t_ref / t,
                            peer, note))
        log(f"  {label} {dtype} {layout}: " + ", ".join(f"{n} {t * 1e6:.0f}us" for n, t in times.items() if t))
    return rows
