"""Conformance harness: diffusers' own pipeline tests, unpatched vs every pipeline `diffkern.patch`ed.

Two parts in one file:

* a pytest plugin (`-p patch_pipelines`, with this folder on PYTHONPATH) loaded into a run of
  diffusers' test suite. It wraps the `__init__` of every `DiffusionPipeline` subclass so that each
  pipeline the tests build (their own constructor calls, `from_pretrained`, `from_pipe`) is
  `diffkern.patch(pipe)`ed the moment it is built, when DIFFKERN_CONFORMANCE=patch, and left as it is
  when DIFFKERN_CONFORMANCE=off. In both modes it records what every pipeline `__call__` returns
  (the images / frames, as float arrays, the first 8 calls of each test) and, when patching, what
  each patch replaced; at the end of the session it writes them to DIFFKERN_CONFORMANCE_OUT
  (outputs-<mode>.npz, patches-<mode>.json). diffusers' test code is run where it lies (a copy of
  its tests/ folder); nothing of it is copied into diffkern.

* a driver (`python benchmarks/conformance/patch_pipelines.py --tests-root DIR FILE...`) that runs
  the two modes one after the other on the same selection, with junit XML, and writes a markdown
  report: per-test outcomes side by side, tests whose outcome differs, and for every test both modes
  ran the max |patched - unpatched| over the outputs it recorded.

Tests modify pipelines after building them (a scheduler swapped by `from_config`,
`set_default_attn_processor()`, attention slicing, save / load): those run on the patched pipeline as
a user's code would, which is the point (issue 21).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

MODE_ENV, OUT_ENV = "DIFFKERN_CONFORMANCE", "DIFFKERN_CONFORMANCE_OUT"
MAX_CALLS_PER_TEST = 8

# ---------------------------------------------------------------------------------------------
# the pytest plugin

_state = {"test": None, "depth": 0, "calls": {}, "outputs": {}, "patches": {}, "errors": {}}


def _mode():
    mode = os.environ.get(MODE_ENV, "off")
    if mode not in ("off", "patch"):
        raise ValueError(f"{MODE_ENV} must be 'off' or 'patch', got {mode!r}")
    return mode


def _as_array(x):
    """A float64 numpy array of a pipeline output's images, or None."""
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64) if x.dtype.kind in "fiub" else None
    if isinstance(x, (list, tuple)) and x:
        parts = [_as_array(v) for v in x]
        if all(p is not None for p in parts) and len({p.shape for p in parts}) == 1:
            return np.stack(parts)
        return None
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL image
        return np.asarray(x, dtype=np.float64) / 255.0
    return None


def _output_images(out):
    for name in ("images", "frames", "audios", "image_embeds"):
        value = getattr(out, name, None)
        if value is not None:
            return _as_array(value)
    if isinstance(out, tuple) and out:
        return _as_array(out[0])
    return _as_array(out)


def _wrap_init(cls):
    init = cls.__dict__["__init__"]
    if getattr(init, "_diffkern_conformance", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _state["depth"] += 1
        try:
            init(self, *args, **kwargs)
        finally:
            _state["depth"] -= 1
        if _state["depth"] == 0 and _mode() == "patch":
            import diffkern

            report = diffkern.patch(self)
            test = _state["test"] or "<outside a test>"
            _state["patches"].setdefault(test, []).append(
                {"pipeline": type(self).__name__, "replaced": dict(report.replaced),
                 "left": sorted({f"{k}: {why}" for k, _, why in report.left})})

    __init__._diffkern_conformance = True
    cls.__init__ = __init__


def _wrap_call(cls):
    call = cls.__dict__["__call__"]
    if getattr(call, "_diffkern_conformance", False):
        return

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        test = _state["test"]
        if test is not None:
            n = _state["calls"].get(test, 0)
            _state["calls"][test] = n + 1
            if n < MAX_CALLS_PER_TEST:
                try:
                    arr = _output_images(out)
                except Exception as e:  # recording must never change a test's outcome
                    _state["errors"][f"{test}::{n}"] = repr(e)
                    arr = None
                if arr is not None:
                    _state["outputs"][f"{test}::{n}"] = arr
        return out

    __call__._diffkern_conformance = True
    cls.__call__ = __call__


def _wrap_all():
    from diffusers import DiffusionPipeline

    todo, seen = [DiffusionPipeline], set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
        if cls is DiffusionPipeline:
            continue
        if "__init__" in cls.__dict__:
            _wrap_init(cls)
        if "__call__" in cls.__dict__:
            _wrap_call(cls)


def _tokenizer_shim():
    """Environment shim, the same in both modes: diffusers' tests load hf-internal-testing/tiny-random-clip,
    whose tokenizer_config has no model_max_length (so transformers reports ~1e30); transformers 5 then
    fails to pad / truncate to it (OverflowError: int too big to convert). CLIP's context of 77 is what
    the tests' tiny text encoders have (max_position_embeddings=77)."""
    from transformers import PreTrainedTokenizerBase

    if getattr(PreTrainedTokenizerBase.from_pretrained, "_diffkern_conformance", False):
        return
    orig = PreTrainedTokenizerBase.from_pretrained.__func__

    @functools.wraps(orig)
    def from_pretrained(cls, *args, **kwargs):
        tok = orig(cls, *args, **kwargs)
        if getattr(tok, "model_max_length", 0) > 10**6:
            tok.model_max_length = 77
        return tok

    from_pretrained._diffkern_conformance = True
    PreTrainedTokenizerBase.from_pretrained = classmethod(from_pretrained)


def pytest_configure(config):
    _mode()  # a bad value fails before any test runs
    _tokenizer_shim()


def pytest_collection_finish(session):
    _wrap_all()


def pytest_runtest_setup(item):
    _wrap_all()  # pipeline classes imported lazily since collection
    _state["test"] = item.nodeid


def pytest_runtest_teardown(item, nextitem):
    _state["test"] = None


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mode = _mode()
    np.savez_compressed(out / f"outputs-{mode}.npz", **_state["outputs"])
    (out / f"patches-{mode}.json").write_text(json.dumps(
        {"patches": _state["patches"], "calls": _state["calls"], "record_errors": _state["errors"]}, indent=1))


# ---------------------------------------------------------------------------------------------
# the driver


def _outcomes(xml_path):
    """{nodeid-ish "file::Class::test": (outcome, message)} from a junit XML file."""
    res = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
                break
        res[name] = (outcome, msg)
    return res


def _run(mode, args, out):
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join([here] + args.extra_path + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env[MODE_ENV], env[OUT_ENV] = mode, str(out)
    env["HF_HUB_OFFLINE"] = "1"  # no network here: fail fast instead of retrying for minutes
    cmd = [sys.executable, "-m", "pytest", "-p", "patch_pipelines", "-p", "no:cacheprovider", "-q",
           f"--timeout={args.timeout}", f"--junitxml={out / f'junit-{mode}.xml'}", "-o", "junit_family=xunit1"]
    if args.k:
        cmd += ["-k", args.k]
    cmd += [str(Path("tests/pipelines") / f) for f in args.files]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=args.tests_root, env=env, capture_output=True, text=True)
    (out / f"pytest-{mode}.log").write_text(proc.stdout + proc.stderr)
    return time.time() - t0, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]


def _short(name):
    return name.replace("tests.pipelines.", "")


def report(args, out, timings):
    import numpy as np

    off, on = _outcomes(out / "junit-off.xml"), _outcomes(out / "junit-patch.xml")
    imgs_off = dict(np.load(out / "outputs-off.npz")) if (out / "outputs-off.npz").exists() else {}
    imgs_on = dict(np.load(out / "outputs-patch.npz")) if (out / "outputs-patch.npz").exists() else {}
    patches = json.loads((out / "patches-patch.json").read_text())["patches"]

    def counts(d):
        c = {}
        for o, _ in d.values():
            c[o] = c.get(o, 0) + 1
        return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))

    # per test: max |patched - unpatched| over recorded outputs (keys "nodeid::i")
    diffs = {}
    for key, a in imgs_off.items():
        test = key.rsplit("::", 1)[0]
        b = imgs_on.get(key)
        if b is None or b.shape != a.shape:
            diffs[test] = ("shape/count differs", None)
            continue
        d = float(np.nanmax(np.abs(a - b))) if a.size else 0.0
        if np.isnan(a).any() != np.isnan(b).any():
            d = float("inf")
        prev = diffs.get(test)
        if prev is not None and prev[1] is None:
            continue
        diffs[test] = ("", max(prev[1] if prev else 0.0, d))
    lines = ["# diffusers' own pipeline tests, unpatched vs `diffkern.patch(pipe)` on every pipeline built", ""]
    lines += [f"Command (from /work/main): `{args.command_line}`", "",
              f"Tests root: `{args.tests_root}` (diffusers' tests/ folder; installed diffusers "
              f"{_version('diffusers')}, torch {_version('torch')}); files: "
              + ", ".join(f"`{f}`" for f in args.files) + (f"; `-k {args.k!r}`" if args.k else "")
              + f"; per-test timeout {args.timeout} s.", ""]
    lines += ["| mode | outcomes | wall time |", "|---|---|---|",
              f"| unpatched | {counts(off)} | {timings['off'][0]:.0f} s |",
              f"| patched | {counts(on)} | {timings['patch'][0]:.0f} s |", ""]
    changed = sorted(n for n in set(off) | set(on) if off.get(n, ("absent",))[0] != on.get(n, ("absent",))[0])
    lines += [f"## Tests whose outcome differs ({len(changed)})", ""]
    if changed:
        lines += ["| test | unpatched | patched | patched message |", "|---|---|---|---|"]
        for n in changed:
            a, b = off.get(n, ("absent", "")), on.get(n, ("absent", ""))
            lines.append(f"| {_short(n)} | {a[0]} | {b[0]} | {b[1].replace('|', '/')} |")
    else:
        lines.append("None: every test has the same outcome patched and unpatched.")
    lines += ["", "## Output differences, per test (both modes ran it and recorded outputs)", "",
              "max |patched - unpatched| over every recorded output of the test (images in [0, 1] unless "
              "the test asks for latents / pt); `calls` = pipeline calls recorded.", ""]
    nonzero = [(t, d) for t, d in diffs.items() if d[1] is None or d[1] > 0]
    zero = [t for t, d in diffs.items() if d[1] == 0.0]
    lines += [f"{len(diffs)} tests recorded outputs: {len(zero)} bit-identical, {len(nonzero)} differ.", ""]
    if nonzero:
        lines += ["| test | max abs diff | outcome (unpatched / patched) |", "|---|---|---|"]
        for t, (why, d) in sorted(nonzero, key=lambda x: -(x[1][1] if x[1][1] is not None else 1e9)):
            key = _junit_key(t, off)
            o = f"{off.get(key, ('?',))[0]} / {on.get(key, ('?',))[0]}"
            lines.append(f"| {_short(t)} | {why or f'{d:.3g}'} | {o} |")
    lines += ["", "## What patch replaced (first pipeline of the first tests, per file)", ""]
    shown = set()
    for test, plist in patches.items():
        f = test.split("::")[0]
        if f in shown or not plist:
            continue
        shown.add(f)
        p = plist[0]
        rep = ", ".join(f"{k}={v}" for k, v in p["replaced"].items() if v)
        lines.append(f"- `{f}` ({p['pipeline']}): {rep}" + (f"; left: {'; '.join(p['left'])}" if p["left"] else ""))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def _junit_key(nodeid, outcomes):
    """junit's classname::name of a pytest nodeid (file path::Class::test)."""
    parts = nodeid.split("::")
    mod = parts[0][:-3].replace("/", ".") if parts[0].endswith(".py") else parts[0]
    key = "::".join([".".join([mod] + parts[1:-1]), parts[-1]])
    return key if key in outcomes else nodeid


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests-root", required=True, help="folder holding diffusers' tests/ (a copy)")
    ap.add_argument("--out", required=True, help="folder for junit XML, logs, recorded outputs, report.md")
    ap.add_argument("--extra-path", action="append", default=[],
                    help="folders put on PYTHONPATH (the test suite's own imports: accelerate, ...)")
    ap.add_argument("-k", default="", help="pytest -k selection")
    ap.add_argument("--timeout", type=int, default=300, help="per-test timeout (pytest-timeout), seconds")
    ap.add_argument("--report-only", action="store_true", help="rewrite report.md from an earlier run")
    ap.add_argument("--rerun", choices=("off", "patch"), help="run this mode only, keep the other's earlier results")
    ap.add_argument("files", nargs="+", help="test files relative to tests/pipelines")
    args = ap.parse_args(argv)
    args.command_line = " ".join(["python", "benchmarks/conformance/patch_pipelines.py"] + (argv or sys.argv[1:]))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "timings.json"
    if args.report_only:
        timings = json.loads(timings_file.read_text())
    elif args.rerun:
        timings = json.loads(timings_file.read_text())
        timings[args.rerun] = _run(args.rerun, args, out)
        timings_file.write_text(json.dumps(timings))
    else:
        timings = {mode: _run(mode, args, out) for mode in ("off", "patch")}
        timings_file.write_text(json.dumps(timings))
    print(report(args, out, timings))


if __name__ == "__main__":
    main()
