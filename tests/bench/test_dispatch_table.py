"""benchmarks/dispatch_table.py (the GPU suite's table writer) and gpu_static.py --compare, fed synthetic
test results and benchmark rows: only tested backends that measured faster enter, and diffkern reads it."""

import importlib.util
import json
import os
import sys
from pathlib import Path


from diffkern import _dispatch
from diffkern.bench import harness, timing

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"_bench_{name}"] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.ops.test_group_norm" name="test_matches[cuda-float16]"/>
<testcase classname="tests.ops.test_group_norm_combinations" name="test_combo[triton-silu]"/>
<testcase classname="tests.ops.test_group_norm_combinations" name="test_combo[triton-gelu]"><failure message="x"/></testcase>
<testcase classname="tests.ops.test_attention" name="test_fwd[triton-64]"/>
<testcase classname="tests.ops.test_attention" name="test_fwd[sdpa-64]"/>
<testcase classname="tests.ops.test_attention" name="test_fwd[xformers-64]"><skipped message="no"/></testcase>
</testsuite></testsuites>"""


def _rows(op, times):
    """Rows of one case: {backend: median seconds}, quiet (1% noise) unless the name ends in '!'."""
    ts = {b.rstrip("!"): timing.Timing([t * (1 + 0.5 * (i % 2) * b.endswith("!")) * (1 + 0.01 * (i % 3))
                                        for i in range(9)]) for b, t in times.items()}
    cands = [(b, None, "") for b in ts]
    return harness.case_rows(op, (2, 3), ("c", "float16", "-"), cands, ts, ("torch.compile",), nbytes=1e6)


def test_table_takes_tested_backends_that_measured_faster_and_diffkern_reads_it(tmp_path, monkeypatch):
    dt = _load("dispatch_table")
    (tmp_path / "tests.xml").write_text(JUNIT)
    rows_gn = _rows("group_norm", {"reference": 3e-4, "cuda": 1e-4, "triton": 2e-4})  # triton failed a test
    rows_at = _rows("attention", {"reference": 9e-4, "sdpa": 1e-4, "triton!": 0.5e-4})  # triton's rows noisy
    env = {"device": "NVIDIA H100 80GB HBM3", "command": "test"}
    harness.write_results(rows_gn, env, tmp_path, "group_norm-nvidia")
    harness.write_results(rows_at, env, tmp_path, "attention-nvidia")
    out = tmp_path / "dispatch-nvidia-h100-80gb-hbm3.json"
    assert dt.main(["--tests", str(tmp_path / "tests.xml"), "--bench", str(tmp_path / "group_norm-nvidia.json"),
                    str(tmp_path / "attention-nvidia.json"), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["device"] == "NVIDIA H100 80GB HBM3" and table["format"] == _dispatch.TABLE_FORMAT
    assert table["ops"] == {"group_norm": {"*": ["cuda"]}, "attention": {"*": ["sdpa"]}}
    ev = table["evidence"]
    assert ev["group_norm"]["triton"]["tests_failed"] == 1 and not ev["group_norm"]["triton"]["in_table"]
    assert ev["attention"]["triton"]["cases"] == 0  # unreliable rows are no evidence
    assert ev["attention"]["xformers"]["tests_passed"] == 0  # skipped is not passed
    # and the dispatcher, on that device, reads it
    monkeypatch.setenv(_dispatch.TABLE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(_dispatch, "_device_name", lambda device_type: "NVIDIA H100 80GB HBM3")
    _dispatch.reload_tables()
    try:
        fam = _dispatch.op_family("attention")
        assert _dispatch.automatic_order(fam, None, "cuda")[0] == "sdpa"
        assert "dispatch table for 'NVIDIA H100 80GB HBM3'" in _dispatch.dispatch_table_status()
    finally:
        _dispatch.reload_tables()


def test_compare_puts_measured_rows_against_their_roofline_floor(tmp_path):
    gs = _load("gpu_static")
    rows = _rows("group_norm", {"reference": 3e-4, "cuda": 1e-4})
    harness.write_results(rows, {"device": "NVIDIA H200", "command": "t"}, tmp_path, "gn")
    md = gs.compare([tmp_path / "gn.json"])
    line = next(x for x in md.splitlines() if "| cuda |" in x)
    # 1 MB over 4.8 TB/s = 0.21 us against ~100 us measured
    assert "| 0.2 |" in line and "(H200)" in line
    assert abs(gs.floor_us(3.35e12, 0, "H100 SXM") - 1e6) < 1e-6
    assert abs(gs.floor_us(0, 989e12, "H200") - 1e6) < 1e-6
    assert gs.occupancy(254, 24576, 4) == (2, 0.125)  # the attention forward's numbers: register-bound
    assert gs.occupancy(32, 0, 4) == (16, 1.0)
    assert "TRITON_CACHE_DIR" not in os.environ or not os.environ["TRITON_CACHE_DIR"].startswith(
        str(Path(os.environ.get("TMPDIR", "/tmp")) / "diffkern-gpu-static-"))  # importing changed nothing
