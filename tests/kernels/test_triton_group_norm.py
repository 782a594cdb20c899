"""The Triton group_norm launcher's plans (resident; split stats + merge-in-apply; looped; channels_last
rows), each forced on the CPU interpreter with chunkings that reach every merge, and the launch
configuration chosen for the SD / GLIDE / IF shapes on an H100."""

import pytest
import torch

from diffkern.kernels import reference
from tests.conftest import TOL, backend_device

pytest.importorskip("triton")

ACTS = (None, "silu", "gelu", "gelu_tanh")
# (plan, channels_last, forced chunking); the activation cycles over ACTS along the table. Small forced
# tiles make several tiles per chunk (the Chan merges); the interpreter's cost grows with the tile count.
PLANS = [("resident", False, {}), ("resident", True, {}),
         ("split", False, dict(splits=2)), ("split", False, dict(splits=5, tile=256)),
         ("split", True, dict(splits=3, tile=128)),
         ("looped", False, dict(tile=256)), ("looped", True, dict(tile=64)), ("looped", False, {}),
         ("rows", True, dict(rows=None)), ("rows", True, dict(rows=40, tile=256)), ("rows", True, dict(rows=1))]
# float32 (x = 1000 + randn) everywhere; bfloat16 on the plans' default tilings
CASES = [pytest.param(*p, ACTS[i % len(ACTS)], dt, id=f"{p[0]}-{'cl' if p[1] else 'contig'}-{p[2]}-{ACTS[i % 4]}-{dt}")
         for i, p in enumerate(PLANS) for dt in (torch.float32, torch.bfloat16)
         if dt == torch.float32 or not p[2] or p[2] == dict(splits=2)]


@pytest.mark.parametrize("plan,channels_last,chunking,act,dtype", CASES)
def test_every_plan_matches_float64(plan, channels_last, chunking, act, dtype):
    from diffkern.kernels.triton import group_norm as tgn
    from diffkern.ops._group_norm_kernels import activation_code

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
    cfg = tgn.launch_config(N, C, H * W, G, x.element_size(), channels_last, None, plan=plan, **chunking)
    assert cfg["plan"] == plan
    if plan == "split":
        assert cfg["splits"] > 1
    mean, rstd = tgn.group_norm_forward(view(x), G, w, b, sc, sh, 1e-5, activation_code(act), y3, plan=plan,
                                        **chunking)
    ref = reference.group_norm(x, G, w, b, scale=sc, shift=sh, activation=act, upcast=True)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    xg = x.double().reshape(N, G, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4, atol=0)


SD15 = [(320, 4096), (640, 1024), (1280, 256), (1280, 64)]
GLIDE = [(192, 4096), (384, 1024), (576, 256), (768, 64)]
IF_I_XL = [(704, 4096), (1408, 1024), (2112, 256), (2816, 64)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("N", [1, 2, 32])
def test_h100_configs_fill_the_gpu(N, channels_last):
    """The plan chosen for 132 SMs: at least one program per SM for every tensor of >= 2 MB (batch 1
    included), a register tile within RESIDENT_MAX, and one read of x whenever a group fits a tile
    and there is a group per SM."""
    from diffkern.kernels.triton import group_norm as tgn

    for C, S in SD15 + GLIDE + IF_I_XL:
        cfg = tgn.launch_config(N, C, S, 32, 2, channels_last, 132)
        programs = 1
        for g in cfg["grid"]:
            programs *= g
        if N * C * S * 2 >= 2 << 20:
            assert programs >= 132, (N, C, S, cfg)
        tile = cfg["block_c"] * cfg.get("block_s", cfg.get("block_r"))
        assert tile <= tgn.RESIDENT_MAX, cfg
        fits = tgn._p2(C // 32) * tgn._p2(S) <= tgn.RESIDENT_MAX
        if fits and N * 32 >= 132:
            assert cfg["plan"] == "resident", (N, C, S, cfg)
