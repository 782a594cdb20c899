"""dynamic_threshold: every combination of percentile (ends and interior) x max_value x memory
layout x elements per sample, on every backend, against a float64 oracle by full sort.

The combinations come from ONE table (COMBOS, an itertools.product of AXES), not hand-listed.
"""

import itertools

import pytest
import torch

import diffkern
from tests.conftest import TOL, backend_device
from tests.ops.test_guided_step_combinations import sort_quantile

AXES = dict(
    percentile=(0.0, 0.37, 0.995, 1.0),
    max_value=(None, 1.0, 2.5),
    layout=("contiguous", "transposed", "strided"),
    shape=((3, 1), (2, 3, 37)),
)
COMBOS = [dict(zip(AXES, v)) for v in itertools.product(*AXES.values())]
# The Triton interpreter costs ~0.25 s a call here: the host reads any layout through one
# contiguous copy before the kernel (the same code for every backend, covered by "cpu"), so Triton
# runs every percentile x max_value x shape on contiguous input.
TRITON_COMBOS = [c for c in COMBOS if c["layout"] == "contiguous"]


def _id(c):
    return "-".join(f"{k}={v}" for k, v in c.items()).replace(" ", "")


def _cases():
    for backend, combos, marks in (("reference", COMBOS, ()), ("cpu", COMBOS, ()), ("triton", TRITON_COMBOS, ()),
                                   ("cuda", COMBOS, (pytest.mark.cuda,))):
        for c in combos:
            yield pytest.param(backend, c, id=f"{backend}-{_id(c)}", marks=marks)


def _require(name):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name == "triton":
        pytest.importorskip("triton")
    why = diffkern.ops.unavailable_reasons("dynamic_threshold").get(name)
    if why:
        pytest.fail(f"backend {name} unavailable: {why}")


def oracle(x, percentile, max_value):
    """Per sample: s = clamp(quantile(|x_b|), 1, max_value); clamp(x_b, -s, s) / s, in float64."""
    out = []
    for xb in x.double():
        s = max(sort_quantile(xb.abs().flatten(), percentile).item(), 1.0)
        if max_value is not None:
            s = min(s, max_value)
        out.append(xb.clamp(-s, s) / s)
    return torch.stack(out)


def make_input(c, dtype, device):
    """3 * randn in the combination's layout (values on both sides of the clamp at 1)."""
    shape = c["shape"]
    base = 3 * torch.randn(shape, dtype=torch.float64)
    if c["layout"] == "transposed":  # same values, a non-contiguous permutation of the last two dims
        return base.transpose(-1, -2).contiguous().transpose(-1, -2).to(dtype).to(device)
    if c["layout"] == "strided":
        wide = torch.full(shape[:-1] + (2 * shape[-1],), float("nan"), dtype=dtype, device=device)
        wide[..., ::2] = base.to(dtype)
        return wide[..., ::2]
    return base.to(dtype).to(device)


@pytest.mark.parametrize("backend,combo", list(_cases()))
def test_combination_matches_oracle(backend, combo):
    _require(backend)
    device = backend_device(backend)
    dtype = torch.float64 if backend == "reference" else torch.float32
    x = make_input(combo, dtype, device)
    before = x.clone()
    y = diffkern.ops.dynamic_threshold(x, combo["percentile"], combo["max_value"], backend=backend)
    want = oracle(x.cpu(), combo["percentile"], combo["max_value"])
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    atol, rtol = (1e-12, 1e-12) if dtype == torch.float64 else TOL[dtype]
    torch.testing.assert_close(y.cpu().double(), want, atol=atol, rtol=rtol)
    assert torch.equal(x, before), "input was modified"
