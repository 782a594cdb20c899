"""Benchmark harness: timing, environment record, and one row definition that produces the printed
table, the JSON and the markdown.

Timing (diffkern.bench.timing): every candidate of a case is timed interleaved, round by round, and
each row reports its median, quartiles and spread (IQR / median); a row whose spread, or whose
baseline's, exceeds timing.SPREAD_BOUND is marked unreliable and prints no speed-up. On a CPU glibc's
allocator is pinned (see `pin_cpu_allocator`); on a GPU each call is timed by CUDA events after the
L2 cache is overwritten. `time_fn` (one candidate alone: blocked_autorange / do_bench) remains for
measurements that are not side-by-side rows (copy bandwidth, matmul rate).
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

from diffkern.bench import timing

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
    q1_us: float | None = None        # quartiles of the per-round samples
    q3_us: float | None = None
    spread: float | None = None       # (q3 - q1) / median
    rounds: int | None = None
    reliable: bool = True             # spread <= timing.SPREAD_BOUND (and so is the baseline's, for the speed-up)
    speedup_iqr: tuple | None = None  # quartiles of the per-round ratios to the reference (error bars)


def timed_row(op, case, shape, dtype, layout, name, t, ref, peer, note="", extra=None, nbytes=None, flops=None):
    """The Row of candidate `name` timed `t` (timing.Timing or None: failed) beside baseline `ref` and
    best peer `peer` (Timings or None). Speed-ups are set only where both sides are reliable; otherwise
    the note says which spread was too wide."""
    extra = dict(extra or {})
    if t is None:
        return Row(op, case, tuple(shape), dtype, layout, name, float("nan"), None, None, None, note, extra)
    med = t.median
    if flops is not None:
        extra["tflops"] = flops / med / 1e12
    vs_ref = vs_peer = iqr = None
    why = timing.verdict(ref, t) if ref is not None else timing.verdict(None, t)
    if ref is not None and not why:
        vs_ref, lo, hi = timing.ratio(ref, t)
        iqr = (lo, hi)
    if peer is not None and peer is not t and not timing.verdict(peer, t):
        vs_peer = peer.median / med
    if why:
        note = f"{note}; {why}" if note else why
    return Row(op, case, tuple(shape), dtype, layout, name, med * 1e6, None if nbytes is None else nbytes / med / 1e9,
               vs_ref, vs_peer, note, extra, t.q1 * 1e6, t.q3 * 1e6, t.spread, len(t.samples), not why, iqr)


def weakest(*rows):
    """The first unreliable row of those a ratio rests on, else the first (for `target`'s verdict)."""
    return next((r for r in rows if not r.reliable), rows[0])


def target(text, value, need, row=None, fmt="{:.2f}x"):
    """(line, verdict) of one acceptance target: verdict True / False, or None (unreliable) when the
    measured value is missing because a row it rests on is unreliable (row.reliable False)."""
    if row is not None and not row.reliable:
        return f"{text}: unreliable, spread too wide (target {fmt.format(need)})", None
    if value is None:
        return f"{text}: not measured (target {fmt.format(need)})", None
    return f"{text}: {fmt.format(value)} (target {fmt.format(need)})", value >= need


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


def _speedup_cell(r):
    if r.speedup_vs_reference is None:
        return "unreliable" if not r.reliable else ""
    if r.speedup_iqr and r.backend != "reference":
        return f"{r.speedup_vs_reference:.2f} ({r.speedup_iqr[0]:.2f}-{r.speedup_iqr[1]:.2f})"
    return f"{r.speedup_vs_reference:.2f}"


def format_table(rows):
    head = ["case", "dtype", "layout", "backend", "median us", "IQR %", "GB/s or TFLOP/s", "x ref (IQR)",
            "x best peer", "note"]

    def rate(r):
        if r.gbps is not None:
            return f"{r.gbps:.1f}"
        tf = r.extra.get("tflops")
        return "" if tf is None else f"{tf:.2f} TF"

    body = [[r.case, r.dtype, r.layout, r.backend, f"{r.median_us:.1f}",
             "" if r.spread is None else ("-" if r.spread == float("inf") else f"{100 * r.spread:.0f}"), rate(r),
             _speedup_cell(r), "" if r.speedup_vs_best_peer is None else f"{r.speedup_vs_best_peer:.2f}", r.note]
            for r in rows]
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


def run_cases(op, cases, make_candidates, device, describe, log=print, peers=("torch.compile",)):
    """Time every candidate of every case interleaved (inference mode) and build the rows.

    make_candidates(case) -> ([(name, fn or None, note)], bytes moved); one candidate is named
    "reference" (the speed-up baseline); `peers` name the others users would pick instead (the best
    of them is the "best peer" column).
    describe(case) -> (label, dtype name, layout)."""
    rows = []
    for case in cases:
        with torch.no_grad():
            cands, nbytes = make_candidates(case)
            times = timing.interleaved({name: fn for name, fn, _ in cands}, device, log=log)
        rows += case_rows(op, case.shape, describe(case), cands, times, peers, nbytes=nbytes)
        log(f"  {describe(case)[0]} {describe(case)[1]} {describe(case)[2]}: " + ", ".join(
            f"{n} {t.median * 1e6:.0f}us +-{100 * t.spread / 2:.0f}%" for n, t in times.items() if t))
    return rows


def best_of(times, names):
    """The fastest Timing among `names` (None if none ran)."""
    got = [times[n] for n in names if times.get(n) is not None]
    return min(got, key=lambda t: t.median) if got else None


def case_rows(op, shape, described, cands, times, peers, nbytes=None, flops=None, baseline="reference",
              extras=None):
    """Rows of one case from its candidates [(name, fn, note)] and {name: Timing or None}."""
    label, dtype, layout = described
    ref = times.get(baseline)
    peer = best_of(times, [n for n in times if n in peers])
    return [timed_row(op, label, shape, dtype, layout, name, times.get(name), ref,
                      None if name in peers else peer, note, (extras or {}).get(name), nbytes, flops)
            for name, _, note in cands]
