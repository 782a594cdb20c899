"""The Triton group_norm launcher's two plans (fused; stats + apply over split chunks)."""

import pytest
import torch

from diffkern.kernels import reference
from tests.conftest import TOL, backend_device

pytest.importorskip("triton")


PLANS = [("groups", False, dict(splits=1)), ("groups", False, dict(splits=2)), ("groups", False, dict(splits=5)),
         ("groups", True, dict(splits=1)), ("groups", True, dict(splits=3)),
         ("rows", True, dict(rows=None)), ("rows", True, dict(rows=40)), ("rows", True, dict(rows=1))]


@pytest.mark.parametrize("plan,channels_last,chunking", PLANS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_plan_matches_float64(plan, channels_last, chunking, dtype):
    from diffkern.kernels.triton import group_norm as tgn

    device = backend_device("triton")
    N, C, H, W, G = 2, 12, 13, 11, 3
    x = (1000 * (dtype == torch.float32) + torch.randn(N, C, H, W, device=device)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, device=device, dtype=dtype), torch.randn(C, device=device, dtype=dtype)
    sc, sh = torch.randn(N, C, device=device, dtype=dtype), torch.randn(N, C, device=device, dtype=dtype)
    y = torch.full_like(x, float("nan"))
    view = (lambda t: t.view(N, C, -1)) if not channels_last else (lambda t: t.permute(0, 2, 3, 1).reshape(N, -1, C).transpose(1, 2))
    y3 = view(y)
    assert y3.data_ptr() == y.data_ptr() and y3.stride() == view(x).stride()
    mean, rstd = tgn.group_norm_forward(view(x), G, w, b, sc, sh, 1e-5, True, y3, plan=plan, **chunking)
    ref = reference.group_norm(x, G, w, b, scale=sc, shift=sh, activation="silu", upcast=True)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    xg = x.double().reshape(N, G, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4, atol=0)
