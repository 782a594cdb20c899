"""pytest-benchmark view of the group_norm suite (same cases as `python -m diffkern.bench`).

    python -m pytest benchmarks --benchmark-only [--benchmark-json out.json]

CPU timings here run without the pinned allocator of the main harness unless the environment pins it.
"""

import pytest
import torch

from diffkern.bench import group_norm as suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = suite.cases(DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-{'x'.join(map(str, c.shape))}-{str(c.dtype)[6:]}-{c.layout}")
@pytest.mark.parametrize("candidate", ["reference", "torch.compile", "cpu", "cuda", "triton"])
def test_group_norm(benchmark, case, candidate):
    with torch.no_grad():
        cands, nbytes = suite.candidates(case, DEVICE, compile_reference=candidate == "torch.compile")
        fns = {name: fn for name, fn, _ in cands}
        if fns.get(candidate) is None:
            pytest.skip(f"{candidate} not usable for this case here")
        fn = fns[candidate]
        benchmark.group = f"{case.name} {case.shape} {str(case.dtype)[6:]} {case.layout}"
        benchmark.extra_info["bytes"] = nbytes
        benchmark(lambda: (fn(), _sync()))
