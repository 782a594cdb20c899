"""Shared fixtures: which backends run here, on which device, and the tolerance table."""

import os
import re

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Without a GPU the Triton kernels run in Triton's CPU interpreter (slow: keep shapes small).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import diffkern  # noqa: E402  (after TRITON_INTERPRET is settled)

# Absolute and relative tolerance per dtype against a float64 reference. A kernel computes in
# float32 and rounds once at the end, so the dominant error is that final rounding:
#  float32: 1e-5 covers float32 statistics over up to ~1e5 elements;
#  float16: 2^-11 relative rounding of the output, x2 for the rounding of the inputs' effect;
#  bfloat16: 2^-8 relative rounding of the output, x2 likewise.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def backend_device(name):
    """The device a backend's tests use: the GPU for cuda (and triton when there is one)."""
    if name == "cuda" or (name == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


def require_backend(name):
    """Skip when a backend is legitimately absent here (no GPU, no Triton); the C++ CPU backend
    must always be built, so its absence fails instead of skipping."""
    from diffkern import _ext

    if name == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if name == "cpu" and _ext.extension() is None:
        pytest.fail(f"the C++ extension is not built: {_ext.extension_error()}")
    if name == "triton":
        pytest.importorskip("triton")
    why = diffkern.ops.unavailable_reasons("group_norm").get(name)
    if why:
        pytest.fail(f"backend {name} unavailable: {why}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


# Oracles that `make test` installs: when DIFFKERN_REQUIRE_ORACLES=1 (the Makefile's test target sets
# it), a test or module that skips because one of them cannot be imported FAILS instead, so a broken
# install cannot pass as "skipped". Outside make (a bare pytest on a partial environment) they skip.
REQUIRED_ORACLES = ("diffusers", "transformers", "safetensors", "triton", "PIL", "tqdm")
_MISSING = re.compile(r"could not import '([\w.]+)'")


def _missing_oracle(report):
    if os.environ.get("DIFFKERN_REQUIRE_ORACLES") != "1" or not report.skipped:
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    match = _MISSING.search(reason)
    if match and match.group(1).split(".")[0] in REQUIRED_ORACLES:
        return reason
    return None


def _fail_missing_oracle(report):
    reason = _missing_oracle(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = f"required test oracle missing (DIFFKERN_REQUIRE_ORACLES=1): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_oracle(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_oracle(outcome.get_result())
