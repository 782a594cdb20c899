"""diffkern.nn.Attention: projections + op + output projection, diffusers-compatible names."""

import pytest
import torch

import diffkern
from diffkern.kernels import reference


def _manual(m, x, context=None, prefix=None, causal=False):
    B, N, _ = x.shape
    src = x if context is None else context
    if hasattr(m, "to_qkv"):
        q, k, v = m.to_qkv(x).chunk(3, -1)
    else:
        q, k, v = m.to_q(x), m.to_k(src), m.to_v(src)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], m.heads, m.dim_head).transpose(1, 2)  # noqa: E731
    kv = None
    if prefix is not None:
        kp, vp = m.to_prefix_kv(prefix).chunk(2, -1)
        kv = (split(kp), split(vp))
    o = reference.attention(split(q), split(k), split(v), causal=causal, kv_prefix=kv)
    return m.to_out[0](o.transpose(1, 2).reshape(B, N, -1))


def test_self_cross_prefix_and_fused():
    torch.manual_seed(0)
    x, ctx, pre = torch.randn(2, 10, 32), torch.randn(2, 7, 24), torch.randn(2, 5, 16)
    cases = [
        (diffkern.nn.Attention(32, heads=4), {}),
        (diffkern.nn.Attention(32, context_dim=24, heads=2, dim_head=20), {"context": ctx}),
        (diffkern.nn.Attention(32, heads=4, fused_qkv=True, prefix_dim=16, qkv_bias=True), {"prefix": pre}),
        (diffkern.nn.Attention(32, heads=4), {"causal": True}),
    ]
    for m, kw in cases:
        with torch.no_grad():
            torch.testing.assert_close(m(x, **kw), _manual(m, x, **kw), atol=1e-5, rtol=1e-5)


def test_diffusers_state_dict_names():
    m = diffkern.nn.Attention(320, context_dim=768, heads=8, dim_head=40)
    assert set(m.state_dict()) == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
    assert m.to_k.weight.shape == (320, 768)


def test_backward_and_errors():
    m = diffkern.nn.Attention(16, heads=2)
    x = torch.randn(1, 6, 16, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m.to_q.weight.grad is not None
    with pytest.raises(ValueError, match="fused_qkv"):
        diffkern.nn.Attention(16, context_dim=8, fused_qkv=True)
    with pytest.raises(ValueError, match="context"):
        diffkern.nn.Attention(16, context_dim=8)(x)
    with pytest.raises(ValueError, match="prefix"):
        m(x, prefix=torch.randn(1, 2, 4))


def test_nan_token_reaches_its_output_row():
    """NaN semantics of diffkern.ops.attention through the module, on the default backend (issue 11:
    torch's CPU SDPA returned 0 for a NaN query row, and to_out's bias then hid it as a finite row)."""
    torch.manual_seed(0)
    m = diffkern.nn.Attention(32, context_dim=24, heads=2, dim_head=20)
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    x[0, 3, 5] = float("nan")
    with torch.no_grad():
        out = m(x, context=ctx)
    assert torch.isnan(out[0, 3]).all()
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 3] = False
    assert torch.isfinite(out[keep]).all()
    ctx[1, 2, 0] = float("nan")   # a NaN context token reaches every query of its sample
    with torch.no_grad():
        out = m(x, context=ctx)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0][keep[0]]).all()
