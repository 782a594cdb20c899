"""Run diffusers' own model tests against diffusers' classes and against diffkern's, side by side.

As a pytest plugin (``-p swap_models`` with this folder on PYTHONPATH) it swaps diffkern's model classes
into diffusers' test modules when DIFFKERN_SWAP=1: every global of a test module (and every class
attribute of its test classes) that is one of diffusers' UNet2DConditionModel, UNet2DModel,
AutoencoderKL, PriorTransformer or UnCLIPTextProjModel becomes diffkern's class of the same name.
Nothing of diffusers' test code is copied: the tests run from the extracted diffusers source tree.

As a script it runs the selected test files twice (diffusers' classes, then diffkern's) and writes a
markdown report with both pass counts and every test that passes with diffusers' class and not with
diffkern's, with its reason:

    .venv/bin/python benchmarks/conformance/swap_models.py \
        --tests /work/ext/huggingface+diffusers/tests --out benchmarks/results/conformance-models.md

The diffusers tests' conftest puts their own `src/` first on sys.path; this plugin imports the installed
diffusers before that happens, so both runs use the installed diffusers (the version is in the report).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if "pytest" in sys.modules:  # loaded as a plugin (-p): the installed diffusers, before the tests' conftest
    import diffusers  # noqa: F401  puts their src/ first on sys.path

SWAPPED = ("UNet2DConditionModel", "UNet2DModel", "AutoencoderKL", "PriorTransformer", "UnCLIPTextProjModel")
TEST_FILES = ("models/unets/test_models_unet_2d_condition.py", "models/unets/test_models_unet_2d.py",
              "models/autoencoders/test_models_autoencoder_kl.py", "models/transformers/test_models_prior.py")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# ------------------------------------------------------------------------------------------------
# The pytest plugin


def _pairs():
    """{diffusers class: diffkern class} (UnCLIPTextProjModel lives in diffusers' deprecated pipelines)."""
    import diffusers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    import diffkern.models as ours

    theirs = {name: getattr(diffusers, name, None) for name in SWAPPED}
    theirs["UnCLIPTextProjModel"] = UnCLIPTextProjModel
    return {theirs[name]: getattr(ours, name) for name in SWAPPED}


def pytest_configure(config):
    config._diffkern_swap = os.environ.get("DIFFKERN_SWAP") == "1"
    path = os.environ.get("DIFFKERN_SWAP_RECORD")
    if path:
        config.pluginmanager.register(_Recorder(path), "diffkern-swap-recorder")


def _swap_namespace(namespace, pairs):
    for key, value in list(namespace.items()):
        if isinstance(value, type) and value in pairs:
            namespace[key] = pairs[value]


def pytest_collection_modifyitems(session, config, items):
    if not config._diffkern_swap:
        return
    pairs = _pairs()
    done = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is None or module.__name__ in done:
            continue
        done.add(module.__name__)
        _swap_namespace(vars(module), pairs)
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == module.__name__:
                for attr, attr_value in list(vars(value).items()):
                    if isinstance(attr_value, type) and attr_value in pairs:
                        setattr(value, attr, pairs[attr_value])


class _Recorder:
    def __init__(self, path):
        self.path = path
        self.rows = {}

    def pytest_runtest_logreport(self, report):
        row = self.rows.setdefault(report.nodeid, {"outcome": "passed", "reason": ""})
        if report.skipped and row["outcome"] == "passed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            row.update(outcome="skipped", reason=str(reason)[:300])
        elif report.failed:
            row.update(outcome="failed", reason=_reason(report))

    def pytest_sessionfinish(self, session):
        Path(self.path).write_text(json.dumps(self.rows, indent=1))


def _reason(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return f"{crash.message.splitlines()[0][:300]}"
    return str(report.longrepr).strip().splitlines()[-1][:300]


# ------------------------------------------------------------------------------------------------
# The runner


def _run_pass(tests, files, swap, record, extra_path, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE)] + extra_path + [os.environ.get("PYTHONPATH", "")]),
               DIFFKERN_SWAP="1" if swap else "0", DIFFKERN_SWAP_RECORD=str(record), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-p", "swap_models", "-p", "no:cacheprovider", "-q",
           f"--timeout={timeout}", *files]
    start = time.time()
    subprocess.run(cmd, cwd=tests.parent, env=env, check=False)
    return json.loads(Path(record).read_text()), time.time() - start


def _counts(rows):
    out = {"passed": 0, "failed": 0, "skipped": 0}
    for row in rows.values():
        out[row["outcome"]] += 1
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=Path, default=Path(os.environ.get(
        "DIFFUSERS_TESTS", "/work/ext/huggingface+diffusers/tests")), help="diffusers' tests/ folder")
    parser.add_argument("--files", nargs="*", default=list(TEST_FILES), help="test files, relative to --tests")
    parser.add_argument("--extra-path", action="append", default=[],
                        help="a folder put on PYTHONPATH (e.g. where accelerate / psutil / requests_mock were "
                             "installed with pip install --target, if the venv lacks them)")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/conformance-models.md")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the markdown from the JSON of the last run (no tests run)")
    args = parser.parse_args(argv)
    tests = args.tests.resolve()
    files = [str(Path(tests.name) / f) for f in args.files]
    records = args.out.parent / (args.out.stem + ".json")
    if args.report_only:
        saved = json.loads(records.read_text())
        theirs, ours = saved["diffusers"], saved["diffkern"]
        t_theirs, t_ours = saved.get("wall_s", {}).get("diffusers", 0), saved.get("wall_s", {}).get("diffkern", 0)
    else:
        theirs, t_theirs = _run_pass(tests, files, False, "/tmp/swap_models-diffusers.json", args.extra_path,
                                     args.timeout)
        ours, t_ours = _run_pass(tests, files, True, "/tmp/swap_models-diffkern.json", args.extra_path,
                                 args.timeout)
        records.write_text(json.dumps({"diffusers": theirs, "diffkern": ours,
                                       "wall_s": {"diffusers": t_theirs, "diffkern": t_ours}},
                                      indent=1, sort_keys=True))

    import diffusers
    import torch

    lost = {k: ours.get(k, {"outcome": "missing", "reason": "not run"}) for k, v in theirs.items()
            if v["outcome"] == "passed" and ours.get(k, {}).get("outcome") != "passed"}
    gained = [k for k, v in ours.items() if v["outcome"] == "passed" and theirs.get(k, {}).get("outcome") != "passed"]
    c_theirs, c_ours = _counts(theirs), _counts(ours)
    command = ("python benchmarks/conformance/swap_models.py " + " ".join(
        (["--tests", str(args.tests)] + sum((["--extra-path", p] for p in args.extra_path), []))))
    lines = [
        "# diffusers' own model tests: diffusers' classes vs diffkern's swapped in",
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"diffusers {diffusers.__version__} (installed; the tests are diffusers' source tree at {tests}), "
        f"torch {torch.__version__}, CPU. Files: " + ", ".join(f"`{f}`" for f in args.files) + ".",
        "Each test runs twice in separate processes: once as written, once with diffkern's "
        + ", ".join(SWAPPED) + " in place of diffusers' (the names the test modules import). Hub tests "
        "(no network here) run with HF_HUB_OFFLINE=1 and fail for both. diffusers' test helpers need accelerate, "
        "psutil and requests_mock, which the project's venv does not carry: "
        "`pip install --no-deps --target DIR accelerate psutil requests_mock`, then `--extra-path DIR`.",
        "",
        "| classes | passed | failed | skipped | wall s |",
        "|---|---|---|---|---|",
        f"| diffusers | {c_theirs['passed']} | {c_theirs['failed']} | {c_theirs['skipped']} | {t_theirs:.0f} |",
        f"| diffkern | {c_ours['passed']} | {c_ours['failed']} | {c_ours['skipped']} | {t_ours:.0f} |",
        "",
        f"Pass with diffusers' class and not with diffkern's: {len(lost)} (of {c_theirs['passed']}), by cause:",
        "",
        "| tests | cause (the error diffkern's class raises) |",
        "|---|---|",
    ]
    causes = {}
    for row in lost.values():
        reason = row["reason"]
        cause = reason.split(" is not supported")[0] if " is not supported" in reason \
            else ":".join(reason.split(":")[:2])
        causes[cause] = causes.get(cause, 0) + 1
    lines += [f"| {n} | {cause.replace('|', '/')} |" for cause, n in sorted(causes.items(), key=lambda c: -c[1])]
    lines += [
        "",
        "Not covered by diffkern's classes, each raising an error that names the option: the NCSN++ (score SDE) "
        "layout of UNet2DModel (time_embedding_type='fourier', Skip*Block2D blocks, norm_num_groups=None: "
        "ValueError), and diffusers' attention-processor API on every model (attn_processors, set_attn_processor, "
        "set_default_attn_processor, set_attention_slice, xFormers, set_attention_backend, fuse_qkv_projections, "
        "and with them IP-Adapter / custom-diffusion processors: NotImplementedError, since the attention runs on "
        "diffkern.ops.attention).",
        "",
        "Each of them:",
        "",
        "| test | diffkern outcome | reason |",
        "|---|---|---|",
    ]
    for k, row in sorted(lost.items()):
        reason = row["reason"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{k.split('/')[-1]}` | {row['outcome']} | {reason} |")
    if gained:
        lines += ["", "Pass with diffkern's class and not with diffusers': " + ", ".join(f"`{k}`" for k in gained)]
    lines += ["", f"Per-test outcomes of both runs: `{records.relative_to(ROOT) if records.is_relative_to(ROOT) else records}`.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[:16]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
