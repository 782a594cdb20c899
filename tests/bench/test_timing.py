"""The statistics behind the benchmark tables, fed synthetic samples: spread, unreliable marking, ratios,
targets, and the interleaving itself."""

import math
import random

import pytest
import torch

from diffkern.bench import harness, timing


def _quiet(median, n=21, rel=0.01, seed=0):
    rng = random.Random(seed)
    return timing.Timing([median * (1 + rel * rng.uniform(-1, 1)) for _ in range(n)])


def _loaded(median, n=21, seed=1):
    """What a busy 2-core machine does to a 65 us kernel: a third of the rounds land in a 16 ms or 32 ms
    scheduler quantum (the numbers of issue 25)."""
    rng = random.Random(seed)
    return timing.Timing([median * (1 + 0.02 * rng.uniform(-1, 1)) if i % 3 else rng.choice([16e-3, 32e-3])
                          for i in range(n)])


def test_quantiles_match_numpy_linear_interpolation():
    xs = sorted([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    assert timing.quantile(xs, 0.5) == 3.5 and timing.quantile(xs, 0.25) == 1.75 and timing.quantile(xs, 0.75) == 5.25
    t = timing.Timing([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    assert t.median == 3.5 and math.isclose(t.spread, (5.25 - 1.75) / 3.5)


def test_a_quiet_row_is_reliable_and_gets_its_speedup_with_error_bars():
    ref, fast = _quiet(1e-3), _quiet(2.5e-4, seed=3)
    row = harness.timed_row("op", "c", (2, 3), "float32", "contiguous", "cpu", fast, ref, None, nbytes=8e6)
    assert row.reliable and row.note == ""
    assert math.isclose(row.speedup_vs_reference, 4.0, rel_tol=0.03)
    lo, hi = row.speedup_iqr
    assert lo <= row.speedup_vs_reference <= hi and hi - lo < 0.1 * row.speedup_vs_reference
    assert row.q1_us <= row.median_us <= row.q3_us and row.rounds == 21
    assert math.isclose(row.gbps, 8e6 / fast.median / 1e9)
    assert "4.0" in harness.format_table([row])


def test_a_noisy_row_is_marked_unreliable_and_prints_no_speedup():
    ref, noisy = _quiet(1e-3), _loaded(65e-6)
    assert noisy.spread > timing.SPREAD_BOUND
    row = harness.timed_row("op", "c", (2, 3), "float32", "contiguous", "cpu", noisy, ref, None)
    assert not row.reliable and row.speedup_vs_reference is None and row.speedup_iqr is None
    assert "unreliable (this row IQR" in row.note
    line = harness.format_table([row]).splitlines()[-1]
    assert "unreliable" in line and "15.4" not in line  # 1e-3 / 65e-6: the number that must not be printed
    # the baseline's noise makes every speed-up against it unreliable too (the "493x" of issue 25)
    row = harness.timed_row("op", "c", (2, 3), "float32", "contiguous", "cpu", _quiet(65e-6), _loaded(1e-3), None)
    assert row.speedup_vs_reference is None and "its baseline IQR" in row.note


def test_too_few_samples_have_no_measurable_spread():
    t = timing.Timing([1.0, 1.0])
    assert math.isinf(t.spread) and not t.reliable()
    assert "unmeasurable" in timing.verdict(None, t)


def test_the_bound_is_a_parameter():
    t = timing.Timing([1.0, 1.1, 1.2, 1.3, 1.4])  # IQR 0.2 / median 1.2 = 17%
    assert not t.reliable() and t.reliable(0.2)
    assert timing.verdict(None, t, bound=0.2) == ""


def test_paired_ratios_cancel_noise_shared_by_a_round():
    """Interleaving puts both candidates in the same second: a slow round slows both, and the
    per-round ratio stays put even where the medians of each alone would wander."""
    load = [1, 1, 3, 1, 5, 1, 1, 2, 1, 4, 1]
    ref = timing.Timing([1e-3 * f for f in load])
    ours = timing.Timing([0.25e-3 * f for f in load])
    speed, lo, hi = timing.ratio(ref, ours)
    assert math.isclose(speed, 4.0) and math.isclose(lo, 4.0) and math.isclose(hi, 4.0)


def test_targets_say_met_missed_or_unreliable():
    good = harness.timed_row("op", "c", (1,), "float32", "-", "cpu", _quiet(1e-4), _quiet(3e-4), None)
    bad = harness.timed_row("op", "c", (1,), "float32", "-", "cpu", _loaded(1e-4), _quiet(3e-4), None)
    assert harness.target("t", good.speedup_vs_reference, 2.0, good)[1] is True
    assert harness.target("t", good.speedup_vs_reference, 5.0, good)[1] is False
    text, ok = harness.target("t", bad.speedup_vs_reference, 2.0, bad)
    assert ok is None and "unreliable" in text
    assert harness.weakest(good, bad) is bad and harness.weakest(good, good) is good


def test_interleaved_runs_every_candidate_in_every_round_in_rotated_order(monkeypatch):
    monkeypatch.setattr(timing, "BATCH_SECONDS", {"cpu": 0.0})  # one call per batch
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    fns["broken"] = lambda: (_ for _ in ()).throw(RuntimeError("shape not supported"))
    fns["absent"] = None
    logged = []
    out = timing.interleaved(fns, torch.device("cpu"), min_rounds=4, max_rounds=4, log=logged.append)
    assert out["broken"] is None and out["absent"] is None and "shape not supported" in logged[0]
    assert all(len(out[n].samples) == 4 for n in "abc")
    # after warm-up and calibration (3 calls each), the rounds: every candidate once, the order rotated
    assert calls[9:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


def test_machine_state_names_the_cpu_and_load():
    state = timing.machine_state()
    assert state["cpu_model"] and state["cpu_count"] >= 1 and len(state["load_average"]) == 3


@pytest.mark.parametrize("samples", [[1e-3] * 7, [1e-3, 1.02e-3, 0.99e-3, 1.01e-3, 1e-3]])
def test_a_steady_candidate_is_reliable(samples):
    assert timing.Timing(samples).reliable()
