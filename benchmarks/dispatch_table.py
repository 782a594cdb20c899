"""Write a device's dispatch table (read by diffkern._dispatch) from a GPU run's evidence.

    python benchmarks/dispatch_table.py --tests OUT/tests.xml --bench OUT/*.json --out OUT/dispatch-<device>.json

A backend enters an op's entry only if
1. it passed the GPU tests: the JUnit XML of the run has at least one passed test of that op's files
   (tests/ops/test_<op>*.py) parametrized with the backend's name, and none failed or errored; and
2. it measured faster than the op's eager reference in the kernel suites: the geometric mean over the
   suites' cases (reliable rows only: the spread of the row and of its reference within the bound) of
   reference time / backend time is above 1.
Entries are ordered fastest first by that mean. The op's own safe priority list always follows the table's
names when diffkern dispatches, so a table can only move measured, tested kernels forward.
Shape classes: an op whose family defines `shape_class(call)` can get one row per class; today none does,
so each op gets its "*" row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the kernel suites' op -> the diffkern op whose backends they time (rows named like the backends)
SUITE_OPS = {"group_norm": "group_norm", "attention": "attention", "dynamic_threshold": "dynamic_threshold",
             "guided_step": "guided_step"}


def test_outcomes(junit_paths):
    """{(op, backend): {"passed": n, "failed": n}} from JUnit XML files (pytest --junitxml)."""
    from diffkern import _dispatch
    import diffkern  # noqa: F401  (registers the ops)

    out = {}
    for path in junit_paths:
        root = ET.parse(path).getroot()
        for case in root.iter("testcase"):
            file = (case.get("file") or case.get("classname", "").replace(".", "/") + ".py")
            m = re.search(r"tests/ops/test_([a-z_]+?)(?:_combinations|_nonfinite)?(?:\.py|/|$)", file)
            if not m:
                continue
            op = next((o for o in _dispatch.registered_ops() if m.group(1).startswith(o)), None)
            if op is None:
                continue
            name = case.get("name", "")
            status = "skipped" if case.find("skipped") is not None else \
                "failed" if case.find("failure") is not None or case.find("error") is not None else "passed"
            if status == "skipped":
                continue
            for backend in _dispatch.op_family(op).backends:
                if re.search(rf"[\[\-]{re.escape(backend)}[\]\-]", name):
                    d = out.setdefault((op, backend), {"passed": 0, "failed": 0})
                    d[status] += 1
    return out


def speedups(bench_paths):
    """{(op, backend): [reference time / backend time per reliable case]} from diffkern.bench JSON."""
    out = {}
    device = None
    for path in bench_paths:
        data = json.loads(Path(path).read_text())
        device = device or data.get("environment", {}).get("device")
        for r in data.get("rows", []):
            op = SUITE_OPS.get(r.get("op"))
            if op is None or r.get("backend") == "reference":
                continue
            if r.get("speedup_vs_reference") is None or not r.get("reliable", True):
                continue
            out.setdefault((op, r["backend"]), []).append(r["speedup_vs_reference"])
    return out, device


def build(tests, speed, device, sources):
    from diffkern import _dispatch
    import diffkern  # noqa: F401

    ops, evidence = {}, {}
    for op in SUITE_OPS.values():
        fam = _dispatch.op_family(op)
        ranked = []
        for backend in fam.backends:
            if backend == "reference":
                continue
            t = tests.get((op, backend), {"passed": 0, "failed": 0})
            s = speed.get((op, backend), [])
            gm = math.exp(sum(math.log(x) for x in s) / len(s)) if s else None
            ok = t["passed"] > 0 and t["failed"] == 0 and gm is not None and gm > 1.0
            evidence.setdefault(op, {})[backend] = {"tests_passed": t["passed"], "tests_failed": t["failed"],
                                                    "cases": len(s), "geomean_x_reference": gm, "in_table": ok}
            if ok:
                ranked.append((gm, backend))
        if ranked:
            ops[op] = {"*": [b for _, b in sorted(ranked, reverse=True)]}
    return {"format": _dispatch.TABLE_FORMAT, "device": device,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": sources, "rule": "passed the GPU tests and geomean speed-up over the reference > 1",
            "ops": ops, "evidence": evidence}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tests", nargs="+", required=True, help="JUnit XML of the GPU test run")
    p.add_argument("--bench", nargs="+", required=True, help="diffkern.bench results JSON of the kernel suites")
    p.add_argument("--device-name", default=None, help="default: the device named in the bench JSON")
    p.add_argument("--out", default=None, help="default: benchmarks/results/dispatch-<device>.json")
    args = p.parse_args(argv)
    from diffkern import _dispatch

    speed, device = speedups(args.bench)
    device = args.device_name or device
    if not device:
        p.error("--device-name: the bench JSON names no device")
    table = build(test_outcomes(args.tests), speed, device,
                  {"tests": [Path(x).name for x in args.tests], "bench": [Path(x).name for x in args.bench]})
    problems = _dispatch._table_problems(table)
    if problems:
        raise SystemExit(f"refusing to write a malformed table: {problems}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"dispatch-{_dispatch.device_slug(device)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    for op, ev in table["evidence"].items():
        for backend, e in ev.items():
            gm = e["geomean_x_reference"]
            print(f"  {op:18s} {backend:9s} tests {e['tests_passed']} passed / {e['tests_failed']} failed, "
                  f"{e['cases']} reliable cases, {'-' if gm is None else f'{gm:.2f}x'} reference: "
                  f"{'IN TABLE' if e['in_table'] else 'safe list only'}")
    print(f"wrote {out}: {json.dumps(table['ops'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
