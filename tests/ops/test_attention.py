"""attention on every backend against float64, with the relative criterion of ARCHITECTURE.md:
a backend's error is at most 2x the error of plain PyTorch math in the same dtype, plus epsilon."""

import pytest
import torch

import diffkern
from diffkern.kernels import reference
from tests.conftest import HAS_CUDA

BACKENDS = ["reference", "sdpa", "triton", pytest.param("xformers", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# epsilon of the relative criterion, per dtype: a few units of the dtype's rounding of O(1) outputs
EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _device(backend):
    return torch.device("cuda") if (HAS_CUDA and backend != "reference") or backend == "xformers" else \
        torch.device("cpu")


def _require(backend):
    if backend == "xformers" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend == "triton":
        pytest.importorskip("triton")
    why = diffkern.ops.unavailable_reasons("attention").get(backend)
    if why:
        if backend == "xformers":
            pytest.skip(why)
        pytest.fail(f"backend {backend} unavailable: {why}")


def _plain(q, k, v, attn_bias=None, causal=False, scale=None, kv_prefix=None):
    """Plain PyTorch math in q's dtype: the error budget a backend is measured against."""
    if kv_prefix is not None:
        k, v = torch.cat([kv_prefix[0], k], 2), torch.cat([kv_prefix[1], v], 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    sp = 0 if kv_prefix is None else kv_prefix[0].shape[2]
    keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(s.shape[-2], device=q.device)[:, None]
        j = torch.arange(s.shape[-1], device=q.device)[None, :]
        keep = (j < sp) | (j - sp <= i)
    if attn_bias is not None:
        keep = keep & attn_bias if attn_bias.dtype == torch.bool else keep
        s = s + attn_bias.to(s.dtype) if attn_bias.dtype != torch.bool else s
    s = s.masked_fill(~keep, float("-inf"))
    dead = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0), -1).masked_fill(dead, 0)
    return p @ v


def _check(out, args, kwargs):
    ref = reference.attention(*args, **kwargs, upcast=True)
    plain = _plain(*args, **kwargs)
    err = (out.double() - ref).abs().max().item()
    budget = 2 * (plain.double() - ref).abs().max().item() + EPS[out.dtype]
    assert not torch.isnan(out).any()
    assert err <= budget, f"error {err:.3g} > 2 x plain PyTorch's {budget - EPS[out.dtype]:.3g} / 2 + eps"


def _qkv(B, H, Sq, Sk, D, dtype, device, Sp=0):
    t = lambda S: torch.randn(B, H, S, D, device=device).to(dtype)  # noqa: E731
    q, k, v = t(Sq), t(Sk), t(Sk)
    prefix = (t(Sp), t(Sp)) if Sp else None
    return q, k, v, prefix


CASES = [
    # (B, H, Sq, Sk, D, Sp, causal)
    (1, 2, 17, 33, 40, 0, False),
    (2, 1, 33, 17, 64, 0, True),
    (1, 2, 1, 77, 80, 0, False),
    (1, 1, 16, 16, 8, 0, True),
    (1, 1, 13, 13, 72, 5, True),
    (1, 2, 17, 9, 160, 7, False),
    (1, 1, 9, 20, 256, 3, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward(backend, dtype, case):
    _require(backend)
    B, H, Sq, Sk, D, Sp, causal = case
    q, k, v, prefix = _qkv(B, H, Sq, Sk, D, dtype, _device(backend), Sp)
    out = diffkern.ops.attention(q, k, v, causal=causal, kv_prefix=prefix, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    _check(out, (q, k, v), dict(causal=causal, kv_prefix=prefix))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_masks_and_dead_rows(backend, dtype):
    _require(backend)
    dev = _device(backend)
    B, H, Sq, Sk, D, Sp = 2, 2, 11, 19, 40, 4
    q, k, v, prefix = _qkv(B, H, Sq, Sk, D, dtype, dev, Sp)
    bias = torch.randn(1, H, Sq, Sp + Sk, device=dev)                      # relative-position style
    pad = torch.ones(B, 1, 1, Sp + Sk, dtype=torch.bool, device=dev)       # key padding
    pad[1, ..., -5:] = False
    dead = torch.ones(Sq, Sp + Sk, dtype=torch.bool, device=dev)           # row 3 sees nothing
    dead[3] = False
    for kw in (dict(attn_bias=bias), dict(attn_bias=pad), dict(attn_bias=dead),
               dict(attn_bias=bias, causal=True), dict(attn_bias=pad, causal=True)):
        out = diffkern.ops.attention(q, k, v, kv_prefix=prefix, backend=backend, **kw)
        _check(out, (q, k, v), dict(kv_prefix=prefix, **kw))
        if kw["attn_bias"] is dead:
            assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3])), "a fully masked row must be 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_of_a_fused_projection(backend):
    _require(backend)
    dev = _device(backend)
    B, S, H, D = 2, 21, 3, 40
    qkv = torch.randn(B, S, 3, H, D, device=dev, dtype=torch.float16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))           # (B, H, S, D) views
    assert not q.is_contiguous()
    out = diffkern.ops.attention(q, k, v, backend=backend)
    _check(out, (q, k, v), {})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients(backend, causal):
    _require(backend)
    dev = _device(backend)
    B, H, Sq, Sk, D, Sp = 1, 2, 9, 13, 24, 3
    q, k, v, (kp, vp) = _qkv(B, H, Sq, Sk, D, torch.float32, dev, Sp)
    bias = torch.randn(1, H, Sq, Sp + Sk, device=dev)
    leaves = [q, k, v, kp, vp, bias]
    for t in leaves:
        t.requires_grad_(True)
    out = diffkern.ops.attention(q, k, v, kv_prefix=(kp, vp), attn_bias=bias, causal=causal, backend=backend)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = reference.attention(l64[0], l64[1], l64[2], kv_prefix=(l64[3], l64[4]), attn_bias=l64[5], causal=causal)
    refs = torch.autograd.grad(ref, l64, do.double())
    for name, g, r in zip(["q", "k", "v", "kp", "vp", "attn_bias"], grads, refs):
        assert g.shape == r.shape, name
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


BAD = [
    ("rank", lambda q, k, v: dict(q=q[0], k=k, v=v), ValueError, "q must have rank 4"),
    ("heads", lambda q, k, v: dict(q=q, k=k[:, :1], v=v), ValueError, "k must be"),
    ("head dim", lambda q, k, v: dict(q=q, k=k, v=v[..., :4]), ValueError, "v must be"),
    ("lengths", lambda q, k, v: dict(q=q, k=k, v=v[:, :, :3]), ValueError, "same length"),
    ("dtype", lambda q, k, v: dict(q=q, k=k.double(), v=v), TypeError, "k must have q's dtype"),
    ("bias shape", lambda q, k, v: dict(q=q, k=k, v=v, attn_bias=torch.zeros(3, 7)), ValueError, "attn_bias"),
    ("bias dtype", lambda q, k, v: dict(q=q, k=k, v=v, attn_bias=torch.zeros(1, dtype=torch.int64)), TypeError,
     "attn_bias"),
    ("prefix", lambda q, k, v: dict(q=q, k=k, v=v, kv_prefix=(k,)), TypeError, "kv_prefix"),
    ("prefix dim", lambda q, k, v: dict(q=q, k=k, v=v, kv_prefix=(k[..., :4], v[..., :4])), ValueError,
     r"kv_prefix\[0\]"),
    ("causal", lambda q, k, v: dict(q=q, k=k, v=v, causal=1), TypeError, "causal"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(case):
    _, build, exc, text = case
    q, k, v, _ = _qkv(1, 2, 5, 6, 8, torch.float32, "cpu")
    with pytest.raises(exc, match=text):
        diffkern.ops.attention(**build(q, k, v))


def test_dispatch_defaults_and_head_dim_limit():
    q, k, v, _ = _qkv(1, 1, 4, 4, 8, torch.float32, "cpu")
    assert diffkern.ops.attention_backend(q, k, v) == "sdpa"
    big = torch.randn(1, 1, 2, 264)
    with pytest.raises(ValueError, match="head dim 264"):
        diffkern.ops.attention(big, big, big, backend="triton")


@pytest.mark.parametrize("with_prefix", [True, False], ids=["prefix", "plain"])
def test_triton_backend_compiles_without_graph_breaks(with_prefix):
    """The Triton path is a torch.library custom op with a fake implementation: dynamo traces the
    whole function (fullgraph=True), AOT autograd runs the fake shapes, forward and backward match.
    The plain case (no prefix: placeholder gradients) is the one issue 11 found broken."""
    _require("triton")
    dev = _device("triton")
    q, k, v, prefix = _qkv(1, 2, 9, 11, 16, torch.float32, dev, 3 if with_prefix else 0)
    for t in (q, k, v):
        t.requires_grad_(True)

    def f(q, k, v):
        return diffkern.ops.attention(q, k, v, kv_prefix=prefix, causal=True, backend="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_gradients_without_prefix_or_bias(backend):
    """The most common training call (no prefix, no bias): issue 11, defect 1. The Triton custom op's
    backward used to return one empty placeholder for dkp, dvp and dbias, which torch.library refuses
    as aliased outputs ("may not alias any inputs to this custom operator or other returns")."""
    _require(backend)
    dev = _device(backend)
    q, k, v = (torch.randn(1, 2, 37, 40, device=dev, requires_grad=True) for _ in range(3))
    out = diffkern.ops.attention(q, k, v, backend=backend)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    l64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    refs = torch.autograd.grad(reference.attention(*l64), l64, do.double())
    for name, g, r in zip("qkv", grads, refs):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")
