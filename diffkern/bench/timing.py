"""Timing that survives a noisy machine: candidates interleaved round by round, a spread per row, and
rows whose spread is too wide marked unreliable instead of printed as speed-ups.

- `interleaved(fns, device)`: every candidate of one case is timed in the same rounds. Each round
  runs every candidate once (a batch of calls long enough for the clock, the order rotated from round
  to round), so load from other processes hits all candidates alike instead of one of them.
  One sample per candidate per round: seconds per call, the batch's mean.
- `Timing`: median, quartiles and min / max of those samples. Its spread is IQR / median.
- A row is reliable when its spread and its baseline's are at most `SPREAD_BOUND` (10%). The
  speed-up of an unreliable row is not printed; its note says why. Each speed-up carries the
  quartiles of the per-round ratios (the same round's baseline over the row's time): the error bars.

Why not blocked_autorange or do_bench alone: timed one after another, a candidate whose turn falls
in a busy second gets a median that snapped to the scheduler's quanta (16 or 32 ms per call here),
and the ratio against a baseline timed in a quiet second says 500x.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass

import torch

SPREAD_BOUND = 0.10   # IQR / median above this: the row is unreliable (no speed-up printed)
MIN_ROUNDS = 7        # fewer samples give no usable quartiles
MAX_ROUNDS = 60
BATCH_SECONDS = {"cpu": 2e-2, "cuda": 5e-4}  # one sample is at least this long (clock resolution, launch and
# scheduler noise: 2 ms CPU samples gave IQRs of 10-37% of the median on a quiet 2-core VM)
CASE_SECONDS = 1.0    # time budget per case beyond MIN_ROUNDS


def quantile(sorted_xs, q):
    """Linear-interpolated quantile (numpy's default) of an ascending list."""
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (pos - lo) * (sorted_xs[hi] - sorted_xs[lo])


@dataclass
class Timing:
    """Seconds per call of one candidate, one sample per round."""

    samples: list

    def _sorted(self):
        return sorted(self.samples)

    @property
    def median(self):
        return quantile(self._sorted(), 0.5)

    @property
    def q1(self):
        return quantile(self._sorted(), 0.25)

    @property
    def q3(self):
        return quantile(self._sorted(), 0.75)

    @property
    def spread(self):
        """IQR / median (relative spread); inf with fewer than 3 samples (no spread can be measured)."""
        if len(self.samples) < 3 or not self.median > 0:
            return float("inf")
        return (self.q3 - self.q1) / self.median

    def reliable(self, bound=None):
        return self.spread <= (SPREAD_BOUND if bound is None else bound)


def ratio(base: Timing, t: Timing):
    """(speed-up, q1, q3): base's median over t's, and the quartiles of the per-round ratios (same round's
    base / t, which interleaving makes comparable)."""
    pairs = sorted(b / x for b, x in zip(base.samples, t.samples) if x > 0)
    return base.median / t.median, quantile(pairs, 0.25), quantile(pairs, 0.75)


def verdict(base: Timing | None, t: Timing | None, bound=None):
    """'' when both timings are reliable, else why not (for the row's note)."""
    bound = SPREAD_BOUND if bound is None else bound
    why = []
    for name, x in (("this row", t), ("its baseline", base)):
        if x is not None and not x.reliable(bound):
            s = "unmeasurable" if math.isinf(x.spread) else f"{100 * x.spread:.0f}%"
            why.append(f"{name} IQR {s} of median")
    return "" if not why else f"unreliable ({', '.join(why)} > {100 * bound:.0f}%)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH = {}


def _batch(fn, n, device):
    """Seconds per call of n calls: on a CPU back to back; on a GPU each call timed by CUDA events
    after the L2 cache is overwritten (as triton.testing.do_bench does: inputs come from HBM)."""
    if device.type == "cuda":
        if device not in _L2_FLUSH:
            _L2_FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
        flush = _L2_FLUSH[device]
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return sum(s.elapsed_time(e) for s, e in events) * 1e-3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def interleaved(fns: dict, device, min_rounds=None, max_rounds=None, case_seconds=None, log=None):
    """{name: Timing or None} for {name: fn or None}: warm-up, calibrate a batch size per candidate, then
    rounds in which every candidate runs one batch (rotated order). A candidate that raises in warm-up
    gets None and, with log, a line saying why."""
    min_rounds = MIN_ROUNDS if min_rounds is None else min_rounds
    max_rounds = MAX_ROUNDS if max_rounds is None else max(max_rounds, min_rounds)
    case_seconds = CASE_SECONDS if case_seconds is None else case_seconds
    live, batch, out = {}, {}, {name: None for name in fns}
    for name, fn in fns.items():
        if fn is None:
            continue
        try:
            fn()  # warm-up: allocations, lazy init, autotuning
            _sync(device)
            t = _batch(fn, 1, device)
        except RuntimeError as e:  # e.g. an SDPA backend that does not take this shape
            if log:
                log(f"  {name} failed: {str(e).splitlines()[0][:100]}")
            continue
        live[name] = fn
        batch[name] = max(1, min(1000, int(BATCH_SECONDS.get(device.type, 2e-3) / max(t, 1e-7))))
    if not live:
        return out
    per_round = sum(_batch(fn, 1, device) * batch[name] for name, fn in live.items())
    rounds = int(min(max_rounds, max(min_rounds, case_seconds / max(per_round, 1e-9))))
    samples = {name: [] for name in live}
    names = list(live)
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            samples[name].append(_batch(live[name], batch[name], device))
    out.update({name: Timing(s) for name, s in samples.items()})
    return out


def machine_state():
    """What the start of a run prints and records: CPU model, load averages, CPU count."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in load]}
