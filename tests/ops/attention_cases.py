"""Shared by the attention combination and NaN/Inf tests: the backends to run (here and under the
cuda marker) and a pairwise cover of a product of options for the slow Triton interpreter."""

import pytest

from tests.conftest import HAS_CUDA

# (backend, device). Triton runs on the GPU when there is one, else in its CPU interpreter.
BACKENDS = [("reference", "cpu"), ("sdpa", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu"),
            ("sdpa", "cuda"), ("xformers", "cuda")]


def interpreted(backend, device):
    """True for the Triton interpreter, where one call takes ~0.1 s: it gets a pairwise cover."""
    return backend == "triton" and device == "cpu"


def backend_param(backend, device, value, id_):
    """pytest.param of value, cuda-marked when the backend runs on the GPU."""
    marks = [pytest.mark.cuda] if device == "cuda" else []
    return pytest.param(value, marks=marks, id=f"{backend}-{device}-{id_}")


def _pairs(case):
    return {(a, case[a], b, case[b]) for a in range(len(case)) for b in range(a + 1, len(case))}


def pairwise(cases):
    """A subset of `cases` (tuples, one value per axis) holding every pair of axis values that some case
    holds: each option value meets every value of every other axis at least once. Greedy (the case
    covering most missing pairs first, ties by order), so the subset is the same on every run."""
    missing = set().union(*(_pairs(c) for c in cases))
    chosen = []
    while missing:
        best = max(cases, key=lambda c: len(_pairs(c) & missing))
        chosen.append(best)
        missing -= _pairs(best)
    return chosen
