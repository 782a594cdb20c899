"""NaN / Inf semantics of diffkern.ops.attention (its docstring), on every backend, from one table.

The rule, checked element by element: a non-finite value reaches every output element it feeds
(q row i -> output row i; key j -> every row that sees key j; value (j, d) -> column d of every row
that sees key j; a visible bias entry (i, j) -> row i); a fully masked row is exactly 0 whatever
its masked keys hold; everything else is finite and unchanged. Backends may also spread a
non-finite k or v to rows that MASK that key (0 * NaN in the probabilities x values product, as
every fused kernel does), so those elements are not checked.
"""

import itertools

import pytest
import torch

import diffkern
from tests.ops.attention_cases import BACKENDS, backend_param, interpreted, pairwise
from tests.ops.test_attention import _require

# the Triton interpreter evaluates NaN and Inf arithmetic in numpy, which warns about it
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

B, H, SQ, SK, SP, D = 1, 2, 6, 7, 3, 8
HEAD, COL = 1, 5            # poison lands in head 1 (head 0 must stay clean), column 5
KEY = 3                     # main key 3: masked for rows 0-2 by causal and for rows 0-1 by the mask
PREFIX_KEY = 1              # prefix key 1: masked for rows 0-2 by the mask
Q_ROWS = (2, 4)             # row 4 is the fully masked row of the "bool" and "neg_inf" masks
DEAD_ROW = 4

TARGETS = ["q", "k", "v", "kp", "vp", "bias"]
VALUES = {"nan": float("nan"), "inf": float("inf")}
MASKS = ["none", "causal", "bool", "neg_inf"]
PREFIX = [False, True]


def _valid(target, value, mask, prefix):
    if target in ("kp", "vp") and not prefix:
        return False
    return not (target == "bias" and mask == "bool")   # a bool mask cannot hold a NaN


CASES = [c for c in itertools.product(TARGETS, VALUES, MASKS, PREFIX) if _valid(*c)]
COVER = pairwise(CASES)   # for the Triton interpreter: every pair of (target, value, mask, prefix) values


def _params():
    out = []
    for backend, device in BACKENDS:
        for case in (COVER if interpreted(backend, device) else CASES):
            out.append(backend_param(backend, device, (backend, device, case), "-".join(map(str, case))))
    return out


def _keep(mask, prefix, device):
    """(SQ, L) visible keys (prefix keys first), built here independently of the code under test."""
    sp = SP if prefix else 0
    L = sp + SK
    i = torch.arange(SQ, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    keep = torch.ones(SQ, L, dtype=torch.bool, device=device)
    if mask == "causal":
        keep = (j < sp) | (j - sp <= i)
    elif mask in ("bool", "neg_inf"):
        keep[:2, sp + KEY] = False
        if prefix:
            keep[:3, PREFIX_KEY] = False
        keep[DEAD_ROW] = False
    return keep


def _inputs(target, value, mask, prefix, device):
    g = torch.Generator().manual_seed(hash((target, value, mask, prefix)) % 2 ** 31)
    t = lambda S: torch.randn(B, H, S, D, generator=g).to(device)  # noqa: E731
    q, k, v, kp, vp = t(SQ), t(SK), t(SK), t(SP), t(SP)
    if value == "inf":  # make the partner column positive, so an Inf gives +Inf scores (NaN rows)
        if target == "q":
            k[..., COL], kp[..., COL] = k[..., COL].abs() + 0.1, kp[..., COL].abs() + 0.1
        elif target in ("k", "kp"):
            q[..., COL] = q[..., COL].abs() + 0.1
    keep = _keep(mask, prefix, device)
    L = keep.shape[1]
    bias = None
    if mask == "bool":
        bias = keep
    elif mask == "neg_inf":
        bias = torch.randn(SQ, L, generator=g).to(device).masked_fill(~keep, float("-inf"))
    elif target == "bias":
        bias = torch.randn(SQ, L, generator=g).to(device)
    if bias is not None and bias.dtype != torch.bool:
        bias = bias.expand(B, H, SQ, L).clone()
    return dict(q=q, k=k, v=v, kp=kp if prefix else None, vp=vp if prefix else None, bias=bias), keep


def _poison(x, target, value, mask, prefix):
    """Poison a copy of the inputs; -> (inputs, bad) where bad[i, d] says output (HEAD, i, d) must be
    non-finite and may[i, d] that it may be (a masked key's k or v)."""
    x = dict(x)
    val = VALUES[value]
    sp = SP if prefix else 0
    keep = _keep(mask, prefix, x["q"].device).cpu()
    dead = ~keep.any(1)
    L = keep.shape[1]
    bad = torch.zeros(SQ, D, dtype=torch.bool)
    may = torch.zeros(SQ, D, dtype=torch.bool)
    t = x[target].clone()
    if target == "q":
        for r in Q_ROWS:
            t[0, HEAD, r, COL] = val
            bad[r] = not dead[r]
    elif target in ("k", "v", "kp", "vp"):
        j = KEY if target in ("k", "v") else PREFIX_KEY
        col = j + (sp if target in ("k", "v") else 0)
        t[0, HEAD, j, COL] = val
        sees, masks = keep[:, col], ~keep[:, col] & ~dead
        cols = slice(None) if target in ("k", "kp") else slice(COL, COL + 1)
        bad[sees, cols] = True
        may[masks, cols] = True
    else:  # bias: one visible entry, and under causal one entry the causal mask hides
        spots = [(2, sp + 1)] + ([(0, L - 1)] if mask == "causal" else [])
        for i, j in spots:
            t[0, HEAD, i, j] = val
            bad[i] |= bool(keep[i, j])
    x[target] = t
    return x, bad, may


def _run(x, mask, backend):
    prefix = None if x["kp"] is None else (x["kp"], x["vp"])
    return diffkern.ops.attention(x["q"], x["k"], x["v"], attn_bias=x["bias"], causal=mask == "causal",
                                  kv_prefix=prefix, backend=backend)


@pytest.mark.parametrize("combo", _params())
def test_non_finite_inputs(combo):
    backend, device, (target, value, mask, prefix) = combo
    _require(backend)
    clean, keep = _inputs(target, value, mask, prefix, torch.device(device))
    poisoned, bad, may = _poison(clean, target, value, mask, prefix)
    out = _run(poisoned, mask, backend).cpu()
    ref = _run(clean, mask, "reference").cpu()   # the finite answer for the elements nothing bad feeds
    head = out[0, HEAD]
    dead = ~keep.cpu().any(1)
    assert torch.equal(head[dead], torch.zeros_like(head[dead])), "a fully masked row must be exactly 0"
    want = torch.isnan if value == "nan" else (lambda z: ~torch.isfinite(z))
    rows = bad.any(1).nonzero().flatten().tolist()
    assert want(head[bad]).all(), f"{value} did not reach every output it feeds (rows {rows})"
    fine = ~bad & ~may
    assert torch.isfinite(head[fine]).all(), "a non-finite value reached an output it does not feed"
    torch.testing.assert_close(head[fine], ref[0, HEAD][fine], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 0], ref[0, 0], atol=1e-5, rtol=1e-5)   # the clean head is untouched


@pytest.mark.parametrize("backend_device", [backend_param(b, d, (b, d), "causal") for b, d in BACKENDS])
def test_every_key_non_finite_in_a_causal_row(backend_device):
    """Causal row 0 sees only key 0: a NaN there makes every score of the row NaN, the case torch's
    CPU SDPA turns into a zero row (it takes an all-NaN row for a fully masked one)."""
    backend, device = backend_device
    _require(backend)
    q, k, v = (torch.randn(B, H, S, D, device=device) for S in (SQ, SK, SK))
    k[0, HEAD, 0, COL] = float("nan")
    out = diffkern.ops.attention(q, k, v, causal=True, backend=backend).cpu()
    assert torch.isnan(out[0, HEAD]).all(1).all(), "every row sees key 0"
    assert torch.isfinite(out[0, 0]).all()


def test_sdpa_nan_rows_under_compile():
    """Compiled, the sdpa backend's NaN row fix is traced without a data-dependent branch: one graph, and
    a NaN query row still comes out NaN (torch's CPU SDPA alone returns 0 at this shape)."""
    q, k, v = (torch.randn(B, H, S, D) for S in (SQ, SK, SK))
    q[0, HEAD, 2, COL] = float("nan")

    def f(q, k, v):
        return diffkern.ops.attention(q, k, v, backend="sdpa")

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.isnan(out[0, HEAD, 2]).all()
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, HEAD, :2]).all()
