"""sampler_update: every backend against the float64 reference, over history sizes, aux, clip
modes, guidance, noise and dtypes; poisoned outputs; bad input."""

import importlib

import pytest
import torch

from diffkern.kernels import reference_multistep as reference
from diffkern.ops.sampler_update import layout, sampler_update, sampler_update_backend

su_mod = importlib.import_module("diffkern.ops.sampler_update")  # the module (diffkern.ops exports the function)

from ..conftest import TOL, backend_device, require_backend

BACKENDS = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.cuda)]


def _inputs(shape, H, aux, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    K, _ = layout(H, aux)
    coeffs = torch.randn(shape[0], K, generator=g).to(device)
    if H:
        coeffs[0, 4] = 0.0  # a zero coefficient drops its term
    return mk(), mk(), mk(), mk(), [mk() for _ in range(H)], coeffs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,aux", [(0, False), (1, True), (3, False), (6, True)])
@pytest.mark.parametrize("clip", ["none", "static", "dynamic"])
@pytest.mark.parametrize("guided", [False, True])
def test_matches_float64_reference(backend, H, aux, clip, guided):
    require_backend(backend)
    dev = backend_device(backend)
    x, m, u, z, hs, c = _inputs((3, 4, 5, 7), H, aux, torch.float32, dev, seed=H)
    kw = dict(uncond_output=u if guided else None, guidance_scale=3.5, clip=clip, clip_range=0.8, noise=z,
              aux=aux, dynamic_percentile=0.9, dynamic_max_value=1.6)
    got = sampler_update(x, m, c, hs, backend=backend, **kw)
    want = reference.sampler_update(x, m, c, hs, upcast=True, **kw)
    assert len(got) == (3 if aux else 2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, dtype):
    require_backend(backend)
    dev = backend_device(backend)
    x, m, u, z, hs, c = _inputs((2, 3, 37), 2, True, dtype, dev)
    got = sampler_update(x, m, c, hs, uncond_output=u, guidance_scale=2.0, noise=z, aux=True, backend=backend)
    want = reference.sampler_update(x, m, c, hs, uncond_output=u, guidance_scale=2.0, noise=z, aux=True,
                                    upcast=True)
    atol, rtol = TOL[dtype]
    for a, b in zip(got, want):
        assert a.dtype == dtype
        # the inputs' own rounding times coefficients up to ~3: a few output ulps
        torch.testing.assert_close(a.double(), b, atol=4 * atol, rtol=4 * rtol)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_element_written_and_inputs_untouched(backend):
    require_backend(backend)
    x, m, u, z, hs, c = _inputs((2, 113), 2, True, torch.float32, torch.device("cpu"))
    before = [t.clone() for t in (x, m, *hs)]
    outs = tuple(torch.full_like(x, float("nan")) for _ in range(3))
    call = su_mod._check(x, m, c, hs, None, 1.0, "static", 1.0, 0.995, 1.0, z, True)
    su_mod._kernel_runner(su_mod.LAUNCHERS[backend])(call, outs)
    for o in outs:
        assert torch.isfinite(o).all()
    for a, b in zip(before, (x, m, *hs)):
        assert torch.equal(a, b)


def test_non_contiguous_and_auto_backend():
    x, m, u, z, hs, c = _inputs((2, 6, 8), 1, False, torch.float32, torch.device("cpu"))
    xt = x.transpose(1, 2)
    mt, ht = m.transpose(1, 2), hs[0].transpose(1, 2)
    assert sampler_update_backend(xt, mt, c, [ht]) == "cpu"
    got = sampler_update(xt, mt, c, [ht])
    want = reference.sampler_update(xt, mt, c, [ht])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_float64_reference_only():
    x, m, u, z, hs, c = _inputs((2, 5), 0, False, torch.float64, torch.device("cpu"))
    assert sampler_update_backend(x, m, c) == "reference"
    with pytest.raises(Exception, match="float64|dtype"):
        sampler_update(x, m, c, backend="cpu")


@pytest.mark.parametrize("bad,match", [
    (dict(coeffs=torch.zeros(2, 4)), "coeffs must have shape"),
    (dict(history=[torch.zeros(2, 3)]), "history\\[0\\] must have sample's shape"),
    (dict(history=[torch.zeros(2, 5)] * 7), "at most 6"),
    (dict(clip="soft"), "clip must be one of"),
    (dict(model_output=torch.zeros(2, 5, dtype=torch.float64)), "model_output must have sample's dtype"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(aux=1), "aux must be a bool"),
])
def test_bad_input(bad, match):
    args = dict(sample=torch.zeros(2, 5), model_output=torch.zeros(2, 5), coeffs=torch.zeros(2, 5), history=())
    args.update(bad)
    if "history" in bad and "coeffs" not in bad and len(bad["history"]) <= 6:
        args["coeffs"] = torch.zeros(2, layout(len(bad["history"]))[0])
    with pytest.raises((ValueError, TypeError), match=match):
        sampler_update(**args)
