"""diffusers' own scheduler test suite, run on diffusers' classes and then on diffkern's.

    .venv/bin/python benchmarks/conformance/swap_schedulers.py [--diffusers-tests DIR] [--out FILE]

runs diffusers' tests/schedulers files for the classes diffkern provides (plus test_schedulers.py, the
common tests) twice in subprocesses: once as they are, once with this file loaded as a pytest plugin
(`-p swap_schedulers`, env DIFFKERN_SWAP_SCHEDULERS=1) that, as each test module is imported, replaces
the scheduler names it imported from diffusers (module globals and the `scheduler_classes` tuples of its
test classes) by diffkern's classes of the same name. diffusers itself is not patched, and none of
diffusers' test code is copied here. Writes per-test outcomes of both runs and every difference to a
markdown file (default benchmarks/results/conformance-schedulers.md).

The tests run with --noconftest: the checkout's tests/conftest.py puts its own src/ (an older diffusers)
first on sys.path, and the comparison must be against the installed diffusers, whose classes diffkern
subclasses.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import pytest

SWAP_ENV = "DIFFKERN_SWAP_SCHEDULERS"
DEFAULT_TESTS = "/work/ext/huggingface+diffusers/tests/schedulers"
FILES = [
    "test_schedulers.py", "test_scheduler_ddpm.py", "test_scheduler_ddim.py", "test_scheduler_ddim_inverse.py",
    "test_scheduler_unclip.py", "test_scheduler_euler.py", "test_scheduler_euler_ancestral.py",
    "test_scheduler_heun.py", "test_scheduler_lms.py", "test_scheduler_pndm.py", "test_scheduler_dpm_multi.py",
    "test_scheduler_unipc.py",
]
# why a test's outcome differs between the two runs, where the failure message alone does not say it:
# (test id prefix, reason)
EXPLAINED = [
    ("test_scheduler_lms::", "diffusers' LMSDiscreteScheduler needs scipy, which is not installed here: the name "
     "`diffusers.LMSDiscreteScheduler` is a placeholder raising ImportError. diffkern's class subclasses the real "
     "one (diffusers.schedulers.scheduling_lms_discrete) and integrates the LMS weights by Gauss-Legendre "
     "quadrature instead of scipy's quad, so these tests run and pass."),
]
# why a test fails in both runs (what this machine lacks), by the test's name
FAILS_HERE = [
    ("::test_compatibles", "builds every class of diffusers' compatibles list, which names LMSDiscreteScheduler "
     "and DPMSolverSDEScheduler; without scipy / torchsde those are diffusers' placeholders raising ImportError"),
    ("::test_beta_sigmas", "use_beta_sigmas needs scipy (not installed here)"),
    ("SchedulerBaseTests::test_default_", "loads hf-internal-testing/tiny-stable-diffusion-torch from the Hub "
     "(no network here)"),
]


# -- the plugin (loaded into the pytest subprocess with -p swap_schedulers) --------------------------------

def _swap_module(module):
    import diffusers.schedulers as ds

    import diffkern.schedulers as dk

    theirs = {}
    for name in dk.SCHEDULERS:
        cls = getattr(ds, name, None)
        theirs[name] = cls
    for name, ours in dk.SCHEDULERS.items():
        value = module.__dict__.get(name)
        if value is not None and value is theirs[name]:
            module.__dict__[name] = ours
    by_id = {id(c): dk.SCHEDULERS[n] for n, c in theirs.items() if c is not None}
    for obj in list(module.__dict__.values()):
        if isinstance(obj, type) and obj.__module__ == module.__name__:
            classes = obj.__dict__.get("scheduler_classes")
            if isinstance(classes, (tuple, list)):
                obj.scheduler_classes = type(classes)(by_id.get(id(c), c) for c in classes)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Import each test module first, swap its scheduler names, then let pytest collect it."""
    if os.environ.get(SWAP_ENV) == "1" and isinstance(collector, pytest.Module):
        try:
            _swap_module(collector.obj)
        except Exception:  # an import error is reported by the collection itself
            pass
    yield


# -- the runner ------------------------------------------------------------------------------------------

def _run(tests_dir, swap, log):
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "report.xml")
        ini = os.path.join(tmp, "pytest.ini")
        with open(ini, "w") as f:
            f.write("[pytest]\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
        env[SWAP_ENV] = "1" if swap else "0"
        cmd = [sys.executable, "-m", "pytest", "-c", ini, "--rootdir", os.path.dirname(os.path.dirname(tests_dir)),
               "--noconftest", "-p", "no:cacheprovider", "-p", "swap_schedulers", "-q", "-W", "ignore",
               f"--junitxml={xml}"] + [os.path.join(tests_dir, f) for f in FILES]
        log(("diffkern" if swap else "diffusers") + ": " + " ".join(cmd))
        subprocess.run(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return _parse(xml)


def _parse(xml):
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        test_id = f"{case.get('classname').split('.')[-2]}::{case.get('classname').split('.')[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").strip().splitlines()[0][:240] if child.get("message") else ""
        out[test_id] = (outcome, message)
    return out


def _counts(results):
    counts = {}
    for outcome, _ in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--diffusers-tests", default=DEFAULT_TESTS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                 "conformance-schedulers.md"))
    args = p.parse_args(argv)
    import diffusers
    import torch

    theirs = _run(args.diffusers_tests, False, print)
    ours = _run(args.diffusers_tests, True, print)
    ids = sorted(set(theirs) | set(ours))
    diffs = [(t, theirs.get(t, ("absent", "")), ours.get(t, ("absent", ""))) for t in ids
             if theirs.get(t, ("absent",))[0] != ours.get(t, ("absent",))[0]]
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    fmt = lambda c: ", ".join(f"{v} {k}" for k, v in sorted(c.items()))  # noqa: E731
    lines = [
        "# diffusers' scheduler tests with diffkern's schedulers swapped in",
        "",
        f"Command: `.venv/bin/python benchmarks/conformance/swap_schedulers.py` (git {sha}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, diffusers {diffusers.__version__}, "
        f"torch {torch.__version__}, CPU).",
        "",
        f"Tests: {', '.join(FILES)} from {args.diffusers_tests} (the diffusers checkout's tests, run with",
        "--noconftest against the installed diffusers).",
        "",
        "| run | tests | outcome |",
        "| --- | --- | --- |",
        f"| diffusers' own classes | {len(theirs)} | {fmt(_counts(theirs))} |",
        f"| diffkern's classes swapped in | {len(ours)} | {fmt(_counts(ours))} |",
        "",
        f"## Tests whose outcome differs ({len(diffs)})",
        "",
    ]
    if diffs:
        lines += ["| test | diffusers' classes | diffkern's classes | why |", "| --- | --- | --- | --- |"]
        for t, (o1, m1), (o2, m2) in diffs:
            why = next((r for prefix, r in EXPLAINED if t.startswith(prefix)), None) or (m2 or m1).replace("|", "\\|")
            lines.append(f"| `{t}` | {o1} | {o2} | {why} |")
    else:
        lines.append("None.")
    both = [t for t in ids if theirs.get(t, ("",))[0] in ("failed", "error") and ours.get(t, ("",))[0] in
            ("failed", "error")]
    lines += ["", f"## Tests that fail in both runs ({len(both)})", "",
              "| test | why |", "| --- | --- |"]
    for t in both:
        why = next((r for key, r in FAILS_HERE if key in t), None) or ours[t][1].replace("|", "\\|")
        lines.append(f"| `{t}` | {why} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[8:12]))
    print(f"{len(diffs)} differences; written to {os.path.normpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
