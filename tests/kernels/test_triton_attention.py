"""The Triton FlashAttention launchers (forward and backward) against float64 autograd.

Criterion (the repo's rule for attention): for every output and gradient, the kernel's max error vs the
float64 reference is at most 2x the error of the same formula computed by plain PyTorch in the input
dtype, plus a small epsilon. Shapes are tiny: on CPU the kernels run in Triton's interpreter.
"""

import pytest
import torch

from tests.conftest import backend_device

pytest.importorskip("triton")

# Epsilon per dtype, relative to max(1, max |reference|): half an ulp at 1 for fp16 (2^-11) and bf16
# (2^-8); 1e-5 for fp32, whose PyTorch error (~1e-7) is below the kernel's reordered sums.
EPS = {torch.float32: 1e-5, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
NAMES = ("out", "lse", "dq", "dk", "dv", "dkp", "dvp", "dbias")


def math_attention(q, k, v, kp, vp, bias, causal, scale):
    """Plain PyTorch attention in the inputs' dtype: (out, lse); rows with every key hidden give 0, -inf."""
    Sp = 0 if kp is None else kp.shape[2]
    if kp is not None:
        k, v = torch.cat([kp, k], 2), torch.cat([vp, v], 2)
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if causal:
        Sq, L = s.shape[-2:]
        i = torch.arange(Sq, device=s.device)[:, None]
        j = torch.arange(L, device=s.device)[None, :] - Sp
        s = s.masked_fill((j >= 0) & (j > i), float("-inf"))
    dead = torch.isneginf(s).all(-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    lse = torch.logsumexp(s, -1).masked_fill(dead[..., 0], float("-inf"))
    p = torch.softmax(s, -1).masked_fill(dead, 0.0)
    return p @ v, lse


def delta_allowance(q, k, v, kp, vp, bias, causal, scale, do, out, ref_out):
    """Extra gradient error inherent to FlashAttention-2 (and PyTorch's own flash backends): delta =
    rowsum(dO * O) uses the O rounded to the input dtype, which shifts dS by P * rowsum(dO * (O - O_exact)).
    Autograd has no such term, and with very few keys PyTorch's own error is tiny, so the criterion adds it:
    the float64 propagation of that dS shift to (dq, dk, dkp, dbias)."""
    up = [None if t is None else t.double() for t in (q, k, v, kp, vp)]
    _, lse = math_attention(*up, None if bias is None else bias.double(), causal, scale)
    kk = up[1] if kp is None else torch.cat([up[3], up[1]], 2)
    s = (up[0] @ kk.transpose(-1, -2)) * scale + (0 if bias is None else bias.double())
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])  # hidden keys: exp(-inf) = 0
    if causal:
        Sp = 0 if kp is None else kp.shape[2]
        i = torch.arange(s.shape[-2], device=s.device)[:, None]
        j = torch.arange(s.shape[-1], device=s.device)[None, :] - Sp
        p = p.masked_fill((j >= 0) & (j > i), 0.0)
    shift = (do.double() * (out.double() - ref_out)).sum(-1)
    dds = (p * shift[..., None]).abs()  # upper bounds via |.|: the shift's sign pattern is arbitrary
    dq = scale * dds @ kk.abs()
    dk_all = scale * dds.transpose(-1, -2) @ up[0].abs()
    Sp = 0 if kp is None else kp.shape[2]
    dkp = None if kp is None else dk_all[:, :, :Sp]
    return dict(dq=dq, dk=dk_all[:, :, Sp:], dkp=dkp, dbias=dds)


def make_bias(kind, B, H, Sq, L, Sp, dtype, device):
    if kind is None:
        return None
    if kind == "heads":  # one float32 bias shared by the heads (stride 0 over H), whatever q's dtype
        return torch.randn(B, 1, Sq, L, device=device).expand(B, H, Sq, L)
    if kind == "padding":  # key-padding mask: -inf columns, strides 0 over H and Sq
        m = torch.zeros(B, 1, 1, L, device=device, dtype=dtype)
        m[0, ..., L - 3:] = float("-inf")
        m[-1, ..., Sp] = float("-inf")
        return m.expand(B, H, Sq, L)
    if kind == "full":  # a transposed (non-contiguous) full bias
        return torch.randn(B, H, L, Sq, device=device).to(dtype).transpose(-1, -2)
    raise ValueError(kind)


def make_inputs(B, H, Sq, Sk, Sp, D, dtype, layout, device):
    def bshd(S):  # (B, S, H, D) memory viewed as (B, H, S, D)
        return torch.randn(B, S, H, D, device=device).to(dtype).transpose(1, 2)

    if layout == "fused":  # slices of fused qkv / prefix kv tensors
        assert Sq == Sk
        qkv = torch.randn(B, Sq, 3 * H * D, device=device).to(dtype).view(B, Sq, 3, H, D)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        kv = torch.randn(B, Sp, 2 * H * D, device=device).to(dtype).view(B, Sp, 2, H, D)
        kp, vp = (kv[:, :, i].transpose(1, 2) for i in range(2))
    elif layout == "bshd":
        q, k, v, kp, vp = bshd(Sq), bshd(Sk), bshd(Sk), bshd(Sp), bshd(Sp)
    else:
        q, k, v, kp, vp = (torch.randn(B, H, S, D, device=device).to(dtype) for S in (Sq, Sk, Sk, Sp, Sp))
    if Sp == 0:
        kp = vp = None
    return q, k, v, kp, vp


def autograd_results(q, k, v, kp, vp, bias, causal, scale, do, upcast):
    """(out, lse, dq, dk, dv, dkp, dvp, dbias) of math_attention, in float64 or in the inputs' dtype."""
    cast = (lambda t: t.double()) if upcast else (lambda t: t)
    leaves = [None if t is None else cast(t).detach().clone().requires_grad_() for t in (q, k, v, kp, vp)]
    # the bias as a full-shape leaf: its gradient is dL/d(bias) elementwise
    b = None if bias is None else cast(bias).detach().clone().requires_grad_()
    out, lse = math_attention(*leaves, b, causal, scale)
    out.backward(cast(do))
    grads = [None if t is None else t.grad for t in leaves + [b]]
    return [out.detach(), lse.detach()] + grads


def check(got, ref, low, dtype, errors, allowance):
    for name, g, r, lo in zip(NAMES, got, ref, low):
        if r is None:
            assert g is None, name
            continue
        assert g.shape == r.shape, name
        g, r, lo = g.double(), r, lo.double()
        extra = allowance.get(name)
        inf = torch.isinf(r)
        assert torch.equal(torch.isinf(g), inf) and torch.equal(g[inf], r[inf]), f"{name}: infinities differ"
        g, r, lo = g[~inf], r[~inf], lo[~inf]
        if r.numel() == 0:
            continue
        raw = err = (g - r).abs().max().item()
        base = (lo - r).abs().max().item()
        if extra is not None:  # element-wise: |kernel - ref| - allowance
            err = ((g - r).abs() - extra[~inf]).clamp_min(0).max().item()
        bound = 2 * base + EPS[dtype] * max(1.0, r.abs().max().item())
        errors[name] = (raw, err, base)
        assert err <= bound, f"{name}: kernel error {err:.3g} > 2 x torch error {base:.3g} + eps"


CASES = [  # B, H, Sq, Sk, Sp, D, dtype, causal, bias, layout
    (1, 2, 33, 33, 0, 64, torch.float32, False, None, "contiguous"),
    (1, 2, 17, 33, 0, 64, torch.float16, True, None, "bshd"),            # causal, Sq < Sk
    (2, 1, 33, 17, 0, 40, torch.bfloat16, True, None, "bshd"),           # causal, Sq > Sk
    (2, 2, 1, 77, 0, 8, torch.float32, False, "padding", "contiguous"),  # one query, 77 keys
    (1, 2, 17, 33, 5, 80, torch.float16, False, "heads", "bshd"),        # prefix, bias shared by heads
    (1, 2, 17, 17, 3, 160, torch.bfloat16, True, "padding", "contiguous"),  # prefix + causal + padding
    (1, 1, 9, 12, 4, 256, torch.float32, True, "full", "bshd"),
    (2, 2, 33, 33, 4, 40, torch.float16, True, "padding", "fused"),     # slices of fused qkv / kv
    (1, 2, 20, 40, 0, 128, torch.bfloat16, False, "full", "contiguous"),
    (2, 1, 1, 1, 1, 72, torch.float16, True, "full", "bshd"),             # Sq = Sk = Sp = 1
    (1, 1, 40, 40, 0, 8, torch.float32, True, "heads", "fused"),
    (1, 2, 33, 33, 19, 256, torch.float16, True, "full", "fused"),      # prefix spanning two key blocks
    (1, 1, 17, 77, 21, 64, torch.bfloat16, True, "padding", "bshd"),
    (2, 2, 40, 24, 33, 160, torch.float32, False, "heads", "contiguous"),
]


@pytest.mark.parametrize("B,H,Sq,Sk,Sp,D,dtype,causal,bias_kind,layout", CASES, ids=str)
def test_matches_float64_autograd(B, H, Sq, Sk, Sp, D, dtype, causal, bias_kind, layout):
    from diffkern.kernels.triton import attention as tat

    device = backend_device("triton")
    torch.manual_seed(Sq * 1000 + Sk * 10 + D)
    q, k, v, kp, vp = make_inputs(B, H, Sq, Sk, Sp, D, dtype, layout, device)
    bias = make_bias(bias_kind, B, H, Sq, Sp + Sk, Sp, dtype, device)
    scale = D ** -0.5
    out, lse = tat.attention_forward(q, k, v, kp, vp, bias, causal, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
    do = torch.randn(B, Sq, H, D, device=device).to(dtype).transpose(1, 2)  # strided upstream gradient
    grads = tat.attention_backward(do, q, k, v, kp, vp, bias, causal, scale, out, lse,
                                   need_dbias=bias is not None)
    for g, t in zip(grads[:5], (q, k, v, kp, vp)):
        assert (g is None) == (t is None) and (g is None or g.dtype == dtype)
    ref = autograd_results(q, k, v, kp, vp, bias, causal, scale, do, upcast=True)
    low = autograd_results(q, k, v, kp, vp, bias, causal, scale, do, upcast=False)
    errors = {}
    allowance = delta_allowance(q, k, v, kp, vp, bias, causal, scale, do, out, ref[0])
    check([out, lse, *grads], ref, low, dtype, errors, allowance)
    print(" ".join(f"{n}={e:.2g}/{b:.2g}" for n, (e, _, b) in errors.items()))  # kernel / torch error (-s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fully_masked_rows_are_zero(dtype):
    from diffkern.kernels.triton import attention as tat

    device = backend_device("triton")
    torch.manual_seed(0)
    B, H, Sq, Sk, Sp, D = 1, 2, 19, 21, 2, 40
    q, k, v, kp, vp = make_inputs(B, H, Sq, Sk, Sp, D, dtype, "bshd", device)
    bias = torch.randn(B, H, Sq, Sp + Sk, device=device).to(dtype)
    bias[:, :, 5] = float("-inf")           # row 5: every key masked
    bias[:, 1, 17:] = float("-inf")         # rows 17, 18 of head 1 (past the first query block)
    bias[:, 0, 0, :Sp] = float("-inf")      # query 0 of head 0 keeps only main key 0 (causal)
    out, lse = tat.attention_forward(q, k, v, kp, vp, bias, True, D ** -0.5)
    dead = torch.zeros(B, H, Sq, dtype=torch.bool, device=device)
    dead[:, :, 5] = True
    dead[:, 1, 17:] = True
    assert torch.isneginf(lse[dead]).all() and torch.isfinite(lse[~dead]).all()
    assert (out[dead] == 0).all() and torch.isfinite(out).all()
    do = torch.randn_like(out)
    grads = tat.attention_backward(do, q, k, v, kp, vp, bias, True, D ** -0.5, out, lse, need_dbias=True)
    dq, dbias = grads[0], grads[5]
    assert (dq[dead] == 0).all() and (dbias[dead] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)
    ref = autograd_results(q, k, v, kp, vp, bias, True, D ** -0.5, do, upcast=True)
    low = autograd_results(q, k, v, kp, vp, bias, True, D ** -0.5, do, upcast=False)
    allowance = delta_allowance(q, k, v, kp, vp, bias, True, D ** -0.5, do, out, ref[0])
    check([out, lse, *grads], ref, low, dtype, {}, allowance)


def test_no_bias_gradient_unless_asked():
    from diffkern.kernels.triton import attention as tat

    device = backend_device("triton")
    q, k, v, _, _ = make_inputs(1, 1, 5, 7, 0, 16, torch.float32, "contiguous", device)
    bias = torch.randn(1, 1, 5, 7, device=device)
    out, lse = tat.attention_forward(q, k, v, None, None, bias, False, 0.25)
    grads = tat.attention_backward(torch.ones_like(out), q, k, v, None, None, bias, False, 0.25, out, lse)
    assert grads[3] is None and grads[4] is None and grads[5] is None


def test_nan_rows_and_masked_nan_values():
    """lse carries the NaN rule of diffkern.ops.attention: a NaN query row gives NaN out and lse (so the
    backward does not mistake it for a fully masked row, lse = -inf); a fully masked row stays 0 / -inf
    even when a value it masks is NaN (acc catches 0 * NaN there); a -inf bias entry masks a NaN score."""
    from diffkern.kernels.triton import attention as tat

    device = backend_device("triton")
    q, k, v, _, _ = make_inputs(1, 1, 6, 7, 0, 16, torch.float32, "contiguous", device)
    bias = torch.zeros(1, 1, 6, 7, device=device)
    bias[..., 4, :] = float("-inf")          # row 4: fully masked
    bias[..., :2, 3] = float("-inf")         # key 3 hidden from rows 0, 1
    q[..., 2, 0] = float("nan")
    q[..., 4, 0] = float("nan")              # a NaN query in the fully masked row
    v[..., 3, 1] = float("nan")
    k[..., 5, 2] = float("nan")
    bias[..., 0, 5] = float("-inf")          # key 5 (NaN) hidden from row 0 by the bias
    bias[..., 1, 5] = float("-inf")
    out, lse = tat.attention_forward(q, k, v, None, None, bias, False, 0.25)
    out, lse = out[0, 0].cpu(), lse[0, 0].cpu()
    assert torch.isnan(out[2]).all() and torch.isnan(lse[2])
    assert (out[4] == 0).all() and torch.isneginf(lse[4])
    assert torch.isnan(out[3]).all() and torch.isnan(out[5]).all()    # they see NaN key 5
    assert torch.isfinite(out[:2, [0] + list(range(2, 16))]).all() and torch.isfinite(lse[:2]).all()
