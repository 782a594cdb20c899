"""group_norm: every combination of its optional arguments, memory formats and of which inputs
require grad, forward and backward, on every backend, against an independent float64 oracle.

The combinations come from ONE table (COMBOS, an itertools.product of AXES), not hand-listed.
The oracle below is written out from the definition (mean and biased variance per (n, group)),
not through F.group_norm, so the reference backend is checked against something other than itself.
"""

import itertools

import pytest
import torch

import diffkern
from tests.conftest import TOL, backend_device, require_backend

SHAPE, GROUPS = (2, 6, 5, 3), 3  # 2 channels per group, odd spatial sizes
EPS = 1e-5

AXES = dict(
    affine=(False, True),
    scale_shift=(False, True),
    activation=(None, "silu", "gelu", "gelu_tanh"),
    layout=("contiguous", "channels_last", "strided"),
    grad=("none", "x", "weight", "bias", "scale", "shift", "all"),
)


def _valid(c):
    """A grad on weight/bias needs affine, on scale/shift needs scale-shift."""
    return not ((c["grad"] in ("weight", "bias") and not c["affine"])
                or (c["grad"] in ("scale", "shift") and not c["scale_shift"]))


COMBOS = [c for c in (dict(zip(AXES, v)) for v in itertools.product(*AXES.values())) if _valid(c)]
# The Triton interpreter costs ~0.1 s a call here. Which inputs require grad only changes the
# PyTorch backward that every kernel backend shares (covered in full by "cpu"), so Triton runs
# every forward option with no grad and with every grad.
TRITON_COMBOS = [c for c in COMBOS if c["grad"] in ("none", "all")]


def _id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def _cases():
    for backend, combos, marks in (("reference", COMBOS, ()), ("cpu", COMBOS, ()), ("triton", TRITON_COMBOS, ()),
                                   ("cuda", COMBOS, (pytest.mark.cuda,))):
        for c in combos:
            yield pytest.param(backend, c, id=f"{backend}-{_id(c)}", marks=marks)


def oracle(x, groups, weight, bias, scale, shift, activation, eps=EPS):
    """act((x - mean) / sqrt(var + eps) * w + b) * (1 + scale) + shift), float64, by definition;
    act: None, "silu", "gelu" (erf) or "gelu_tanh"."""
    N, C = x.shape[:2]
    xg = x.double().reshape(N, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    per_c = (1, C) + (1,) * (x.dim() - 2)
    per_nc = (N, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(per_c) + bias.double().reshape(per_c)
    if scale is not None:
        y = y * (1 + scale.double().reshape(per_nc)) + shift.double().reshape(per_nc)
    if activation == "silu":
        y = y * torch.sigmoid(y)
    elif activation == "gelu":  # v Phi(v), by definition (not through F.gelu)
        y = y * 0.5 * (1 + torch.erf(y / 2 ** 0.5))
    elif activation == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))
    else:
        assert activation is None, activation
    return y


def layout(x, kind):
    """x in the given memory format: contiguous, channels_last, or a non-dense strided view."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # every other element of a wider last dim
        wide = torch.full(x.shape[:-1] + (2 * x.shape[-1],), float("nan"), dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def inputs(c, dtype, device):
    """(x, weight, bias, scale, shift) for combination c; None where the option is off."""
    N, C = SHAPE[:2]
    x = layout((2 * torch.randn(SHAPE) + 0.5).to(dtype).to(device), c["layout"])
    w = b = sc = sh = None
    if c["affine"]:
        w = (1 + 0.5 * torch.randn(C)).to(dtype).to(device)
        b = torch.randn(C).to(dtype).to(device)
    if c["scale_shift"]:
        sc = (0.5 * torch.randn(N, C)).to(dtype).to(device)
        sh = torch.randn(N, C).to(dtype).to(device)
    return x, w, b, sc, sh


NAMES = ("x", "weight", "bias", "scale", "shift")


@pytest.mark.parametrize("backend,combo", list(_cases()))
def test_combination_forward_backward(backend, combo):
    require_backend(backend)
    device = backend_device(backend)
    # the reference backend is the only one that takes float64: test it there, exactly
    dtype = torch.float64 if backend == "reference" else torch.float32
    tensors = dict(zip(NAMES, inputs(combo, dtype, device)))
    want_grad = [n for n in NAMES if tensors[n] is not None and combo["grad"] in (n, "all")]
    for n in want_grad:
        tensors[n].requires_grad_(True)
    before = {n: t.detach().clone() for n, t in tensors.items() if t is not None}

    y = diffkern.ops.group_norm(tensors["x"], GROUPS, tensors["weight"], tensors["bias"], EPS,
                                scale=tensors["scale"], shift=tensors["shift"], activation=combo["activation"],
                                backend=backend)
    leaves = {n: None if t is None else t.detach().cpu().double().requires_grad_(n in want_grad)
              for n, t in tensors.items()}
    ref = oracle(leaves["x"], GROUPS, leaves["weight"], leaves["bias"], leaves["scale"], leaves["shift"],
                 combo["activation"])
    assert y.shape == tensors["x"].shape and y.dtype == dtype and y.device.type == device.type
    assert y.requires_grad == bool(want_grad)
    if combo["layout"] == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), "output lost the channels_last format"
    atol, rtol = (1e-12, 1e-12) if dtype == torch.float64 else TOL[dtype]
    torch.testing.assert_close(y.detach().cpu().double(), ref.detach(), atol=atol, rtol=rtol)

    if want_grad:
        dy = torch.randn(SHAPE, dtype=torch.float64)
        got = torch.autograd.grad(y, [tensors[n] for n in want_grad], dy.to(dtype).to(device))
        exp = torch.autograd.grad(ref, [leaves[n] for n in want_grad], dy)
        for n, g, e in zip(want_grad, got, exp):
            assert g.shape == e.shape and g.dtype == dtype, n
            # float32 statistics against float64: the error scales with the gradient's size
            tol = 1e-10 if dtype == torch.float64 else 2e-4 * max(1.0, e.abs().max().item())
            torch.testing.assert_close(g.cpu().double(), e, atol=tol, rtol=tol, msg=lambda m, n=n: f"grad {n}: {m}")
    for n, t in before.items():
        assert torch.equal(tensors[n].detach(), t), f"{n} was modified"
