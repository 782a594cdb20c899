"""guided_step on every backend against the float64 reference, and the reference against
diffusers' DDPM/DDIM step math written out."""

import importlib
import math

import pytest
import torch

import diffkern
from diffkern.kernels import reference
from tests.conftest import TOL, backend_device

G = importlib.import_module("diffkern.ops.guided_step")  # the module (diffkern.ops.guided_step is the op)

BACKENDS = ["reference", "cpu", "triton", pytest.param("cuda", marks=pytest.mark.cuda)]
KERNEL_BACKENDS = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PREDS = ["epsilon", "sample", "v_prediction"]
CLIPS = ["none", "static", "dynamic"]


def _require(name):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name == "triton":
        pytest.importorskip("triton")
    why = diffkern.ops.unavailable_reasons("guided_step").get(name)
    if why:
        pytest.fail(f"backend {name} unavailable: {why}")


def _coeffs(B, learned, device):
    a = 0.05 + 0.9 * torch.rand(B, dtype=torch.float64)
    c = [a.sqrt(), (1 - a).sqrt(), torch.randn(B), torch.randn(B), torch.randn(B), torch.rand(B)]
    if learned:
        min_log = -6 + torch.rand(B, dtype=torch.float64)
        c += [min_log, min_log + 2 * torch.rand(B, dtype=torch.float64)]
    return torch.stack([t.double() for t in c], 1).float().to(device)


def _inputs(shape, dtype, device, learned, uncond, noise):
    B, C = shape[:2]
    m_shape = (B, 2 * C if learned else C) + tuple(shape[2:])

    def model_out():
        m = 2 * torch.randn(m_shape)
        if learned:
            m[:, C:] = torch.rand(m[:, C:].shape) * 2 - 1
        return m.to(dtype).to(device)

    x = (2 * torch.randn(shape)).to(dtype).to(device)
    return dict(sample=x, model_output=model_out(), coeffs=_coeffs(B, learned, device),
                uncond_output=model_out() if uncond else None,
                noise=torch.randn(shape).to(dtype).to(device) if noise else None)


def _assert_close(y, ref, dtype, what):
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == ref.shape and y.is_contiguous(), what
    assert not torch.isnan(y).any(), f"{what}: NaN (unwritten element?)"
    err = (y.double().cpu() - ref.cpu()).abs()
    # the outputs are sums of several O(1) terms: measure the error against 1 + |ref|
    bound = atol + rtol * (1 + ref.abs().cpu())
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g} (atol={atol}, rtol={rtol})"


def _check_against_reference(backend, dtype, shape, pred, clip, variance, uncond, noise, out=None):
    device = backend_device(backend)
    learned = variance == "learned_range"
    inp = _inputs(shape, dtype, device, learned, uncond, noise)
    before = {k: v.clone() for k, v in inp.items() if v is not None}
    kw = dict(uncond_output=inp["uncond_output"], guidance_scale=3.5, prediction_type=pred, clip=clip,
              clip_range=1.2, dynamic_percentile=0.9, dynamic_max_value=1.5, variance=variance,
              noise=inp["noise"])
    if out is None:
        prev, x0 = diffkern.ops.guided_step(inp["sample"], inp["model_output"], inp["coeffs"],
                                            backend=backend, **kw)
    else:  # one kernel run into NaN-poisoned outputs
        call = G._check(inp["sample"], inp["model_output"], inp["coeffs"], kw["uncond_output"], 3.5, pred,
                        clip, 1.2, 0.9, 1.5, variance, kw["noise"])
        out = tuple(torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(2))
        prev, x0 = G._kernel_runner(G.LAUNCHERS[backend])(call, out=out)
    ref_prev, ref_x0 = reference.guided_step(inp["sample"], inp["model_output"], inp["coeffs"],
                                             upcast=True, **kw)
    _assert_close(x0, ref_x0, dtype, "pred_original_sample")
    _assert_close(prev, ref_prev, dtype, "prev_sample")
    for k, v in before.items():
        assert torch.equal(inp[k], v), f"{k} was modified"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("variance", ["fixed", "learned_range"])
@pytest.mark.parametrize("uncond,noise", [(False, False), (True, True), (True, False)],
                         ids=["plain", "cfg-noise", "cfg"])
def test_matches_float64(backend, dtype, pred, clip, variance, uncond, noise):
    _require(backend)
    _check_against_reference(backend, dtype, (2, 3, 7, 5), pred, clip, variance, uncond, noise)


# odd sizes, 0 to 3 spatial dims, one sample larger than the CPU kernel's 4096-element chunk
SHAPES = [(1, 1), (3, 4, 37), (2, 3, 5, 4, 3), (1, 1, 1, 1), (2, 4, 33, 35)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("clip", ["none", "dynamic"])
def test_shapes_poisoned_outputs(backend, shape, clip):
    _require(backend)
    for variance in ("fixed", "learned_range"):
        _check_against_reference(backend, torch.float32, shape, "epsilon", clip, variance, True, True,
                                 out=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs_and_float64(backend):
    _require(backend)
    x = torch.randn(2, 5, 3, 4).transpose(2, 3)  # (2, 5, 4, 3), not contiguous
    m = torch.randn(2, 5, 4, 3)
    c = _coeffs(2, False, "cpu")
    prev, x0 = diffkern.ops.guided_step(x, m, c, clip="dynamic", dynamic_max_value=2.0, backend=backend)
    ref_prev, ref_x0 = reference.guided_step(x, m, c, clip="dynamic", dynamic_max_value=2.0, upcast=True)
    _assert_close(prev, ref_prev, torch.float32, "prev_sample")
    _assert_close(x0, ref_x0, torch.float32, "pred_original_sample")
    if backend == "reference":
        prev64, _ = diffkern.ops.guided_step(x.double(), m.double(), c, clip="dynamic", backend=backend)
        assert prev64.dtype == torch.float64


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 0.995, 1.0])
def test_dynamic_threshold_matches_torch_quantile(n, p):
    a = torch.randn(3, n).abs() * 3
    want = torch.quantile(a, p, dim=1).clamp(min=1, max=2.5)
    torch.testing.assert_close(G.thresholds_by_selection(a, p, 2.5), want, rtol=1e-6, atol=1e-6)


def test_automatic_choice_on_cpu_is_the_cpu_kernel():
    x = torch.randn(2, 3, 4)
    assert diffkern.ops.guided_step_backend(x, x.clone(), torch.rand(2, 6) + 0.1) == "cpu"
    assert diffkern.ops.guided_step_backend(x.double(), x.double(), torch.rand(2, 6) + 0.1) == "reference"


def test_empty_batch():
    prev, x0 = diffkern.ops.guided_step(torch.randn(0, 3, 4), torch.randn(0, 3, 4), torch.rand(0, 6))
    assert prev.shape == x0.shape == (0, 3, 4)


# ---------------------------------------------------------------------------------------------
# external truth: diffusers' DDPMScheduler.step / DDIMScheduler.step, written out

def _ddpm_step(model_output, t, sample, acp, noise, variance_type, clip):
    """diffusers DDPMScheduler.step (prediction_type="epsilon", clip_sample=clip, range 1)."""
    if model_output.shape[1] == sample.shape[1] * 2 and variance_type == "learned_range":
        model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
    a_t, a_prev = acp[t], acp[t - 1]
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    x0 = (sample - b_t ** 0.5 * model_output) / a_t ** 0.5
    if clip:
        x0 = x0.clamp(-1, 1)
    prev = (a_prev ** 0.5 * cur_beta) / b_t * x0 + cur_alpha ** 0.5 * b_prev / b_t * sample
    variance = torch.clamp(b_prev / b_t * cur_beta, min=1e-20)
    if variance_type == "fixed_small":
        prev = prev + variance ** 0.5 * noise
    else:  # learned_range
        min_log, max_log = torch.log(variance), torch.log(cur_beta)
        frac = (predicted_variance + 1) / 2
        prev = prev + torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log)) * noise
    return prev, x0


def _threshold_sample(sample, ratio, max_value):
    """diffusers' _threshold_sample."""
    b = sample.shape[0]
    abs_sample = sample.reshape(b, -1).abs()
    s = torch.quantile(abs_sample, ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(sample.reshape(b, -1), -s, s) / s).reshape(sample.shape)


def _ddim_step(model_output, t, t_prev, sample, acp, eta, noise, prediction_type, thresholding):
    """diffusers DDIMScheduler.step (use_clipped_model_output=True)."""
    a_t, a_prev = acp[t], acp[t_prev]
    b_t = 1 - a_t
    if prediction_type == "v_prediction":
        x0 = a_t ** 0.5 * sample - b_t ** 0.5 * model_output
        eps = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
    else:
        x0 = (sample - b_t ** 0.5 * model_output) / a_t ** 0.5
        eps = model_output
    if thresholding:
        x0 = _threshold_sample(x0, 0.995, 1.5)
        eps = (sample - a_t ** 0.5 * x0) / b_t ** 0.5
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance ** 0.5
    prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps + std * noise
    return prev, x0


def _acp():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_step_matches_diffusers_math(backend, variance):
    _require(backend)
    acp, t, B, C = _acp(), 500, 2, 3
    learned = variance == "learned_range"
    x = torch.randn(B, C, 6, 5, dtype=torch.float64)
    m = torch.randn(B, 2 * C if learned else C, 6, 5, dtype=torch.float64)
    if learned:
        m[:, C:] = torch.rand(B, C, 6, 5) * 2 - 1
    noise = torch.randn_like(x)
    want_prev, want_x0 = _ddpm_step(m, t, x, acp, noise, variance, clip=True)
    a_t, a_prev = acp[t], acp[t - 1]
    cur_alpha = a_t / a_prev
    var = torch.clamp((1 - a_prev) / (1 - a_t) * (1 - cur_alpha), min=1e-20)
    row = [a_t.sqrt(), (1 - a_t).sqrt(), a_prev.sqrt() * (1 - cur_alpha) / (1 - a_t),
           cur_alpha.sqrt() * (1 - a_prev) / (1 - a_t), 0.0, var.sqrt()]
    if learned:
        row += [var.log(), (1 - cur_alpha).log()]
    coeffs = torch.tensor([[float(v) for v in row]] * B, dtype=torch.float32)
    prev, x0 = diffkern.ops.guided_step(x.float(), m.float(), coeffs, clip="static", clip_range=1.0,
                                        variance="learned_range" if learned else "fixed", noise=noise.float(),
                                        backend=backend)
    torch.testing.assert_close(x0.double(), want_x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prev.double(), want_prev, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred,thresholding", [("epsilon", False), ("v_prediction", True)])
def test_ddim_step_with_guidance_matches_diffusers_math(backend, pred, thresholding):
    _require(backend)
    acp, t, t_prev, eta, B = _acp(), 700, 650, 0.7, 2
    x = torch.randn(B, 4, 5, 7, dtype=torch.float64)
    cond, uncond = torch.randn_like(x), torch.randn_like(x)
    noise = torch.randn_like(x)
    guided = uncond + 5.0 * (cond - uncond)  # what a diffusers pipeline does before step()
    want_prev, want_x0 = _ddim_step(guided, t, t_prev, x, acp, eta, noise, pred, thresholding)
    a_t, a_prev = acp[t], acp[t_prev]
    std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    row = [a_t.sqrt(), (1 - a_t).sqrt(), a_prev.sqrt(), 0.0, math.sqrt(1 - a_prev - std ** 2), std]
    coeffs = torch.tensor([[float(v) for v in row]] * B, dtype=torch.float32)
    prev, x0 = diffkern.ops.guided_step(x.float(), cond.float(), coeffs, uncond_output=uncond.float(),
                                        guidance_scale=5.0, prediction_type=pred,
                                        clip="dynamic" if thresholding else "none", dynamic_percentile=0.995,
                                        dynamic_max_value=1.5, noise=noise.float(), backend=backend)
    torch.testing.assert_close(x0.double(), want_x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prev.double(), want_prev, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# errors

def _ok():
    x = torch.randn(2, 3, 4, 4)
    return dict(sample=x, model_output=torch.randn(2, 3, 4, 4), coeffs=torch.rand(2, 6) + 0.1)


@pytest.mark.parametrize("change,exc,name", [
    (dict(model_output=torch.randn(2, 6, 4, 4)), ValueError, "model_output"),
    (dict(model_output=torch.randn(2, 3, 4, 5)), ValueError, "model_output"),
    (dict(model_output=torch.randn(2, 3, 4, 4).half()), TypeError, "model_output"),
    (dict(uncond_output=torch.randn(2, 3, 4)), ValueError, "uncond_output"),
    (dict(noise=torch.randn(1, 3, 4, 4)), ValueError, "noise"),
    (dict(coeffs=torch.rand(2, 8)), ValueError, "coeffs"),
    (dict(coeffs=torch.rand(3, 6)), ValueError, "coeffs"),
    (dict(coeffs=torch.ones(2, 6, dtype=torch.int32)), TypeError, "coeffs"),
    (dict(coeffs=torch.rand(2, 6).half()), TypeError, "coeffs"),
    (dict(sample=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "sample"),
    (dict(sample=torch.randn(2)), ValueError, "sample"),
    (dict(prediction_type="x0"), ValueError, "prediction_type"),
    (dict(clip="soft"), ValueError, "clip"),
    (dict(variance="learned"), ValueError, "variance"),
    (dict(clip="dynamic", dynamic_percentile=1.5), ValueError, "dynamic_percentile"),
    (dict(clip="dynamic", dynamic_percentile=-0.1), ValueError, "dynamic_percentile"),
    (dict(guidance_scale="3"), TypeError, "guidance_scale"),
    (dict(variance="learned_range"), ValueError, "model_output"),
])
def test_bad_input_names_the_argument(change, exc, name):
    kw = _ok()
    kw.update(change)
    with pytest.raises(exc, match=name):
        diffkern.ops.guided_step(kw.pop("sample"), kw.pop("model_output"), kw.pop("coeffs"), **kw)


def test_learned_range_needs_eight_coeffs():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="coeffs"):
        diffkern.ops.guided_step(x, torch.randn(2, 6, 4), torch.rand(2, 6), variance="learned_range")


def test_compiled_binding_checks_its_inputs():
    from diffkern import _ext

    x = torch.randn(2, 3, 4)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="coeffs"):
        _ext.extension().guided_step_forward(x, x, None, None, torch.rand(2, 5), out, out, None, None,
                                             0, 0, False, 1.0, 1.0)
    with pytest.raises(ValueError, match="thresholds"):
        _ext.extension().guided_step_forward(x, x, None, None, torch.rand(2, 6), out, out, None, None,
                                             0, 2, False, 1.0, 1.0)
    with pytest.raises(TypeError, match="model_output"):
        _ext.extension().guided_step_forward(x, x.half(), None, None, torch.rand(2, 6), out, out, None, None,
                                             0, 0, False, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# noise drawn in the kernel from a seed

def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    def words(c, k):
        t = [torch.tensor([v], dtype=torch.int64) for v in c + k]
        return [int(w) for w in reference.philox4x32_10(*t)]

    assert words([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_seeded_noise_is_standard_normal_and_positioned():
    z = reference.seeded_noise((1 << 20,), seed=7)
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3
    # 4-sigma tails of a normal: about 6.3e-5 of the mass
    assert 2e-5 < (z.abs() > 4).float().mean().item() < 2e-4
    assert torch.equal(reference.seeded_noise((100,), 7, offset=1000), z[1000:1100])
    assert not torch.equal(reference.seeded_noise((100,), 8), z[:100])


def _noise_only_coeffs(B, device):
    """prev = noise exactly: c_x0 = c_xt = c_eps = 0, sigma = 1."""
    c = torch.zeros(B, 6, device=device)
    c[:, 0], c[:, 1], c[:, 5] = 0.8, 0.6, 1.0
    return c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,offset", [(0, 0), (2 ** 40 + 17, 5), (123, 2 ** 32 - 100)],
                         ids=["zero", "wide-seed", "offset-crosses-2^32"])
def test_seeded_noise_same_on_every_backend(backend, seed, offset):
    _require(backend)
    device = backend_device(backend)
    shape = (3, 2, 9, 7)
    x = torch.randn(shape, device=device)
    prev, _ = diffkern.ops.guided_step(x, torch.randn(shape, device=device), _noise_only_coeffs(3, device),
                                       noise_seed=seed, noise_offset=offset, backend=backend)
    want = reference.seeded_noise(shape, seed, offset, dtype=torch.float64)
    # the integers are identical; log/cos/sqrt in float32 may differ by a few ulp
    assert (prev.double().cpu() - want).abs().max().item() < 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variance", ["fixed", "learned_range"])
def test_seeded_step_equals_step_with_that_noise(backend, dtype, variance):
    _require(backend)
    device = backend_device(backend)
    learned = variance == "learned_range"
    inp = _inputs((2, 3, 7, 5), dtype, device, learned, True, False)
    kw = dict(uncond_output=inp["uncond_output"], guidance_scale=2.0, clip="dynamic", dynamic_max_value=1.5,
              variance=variance)
    prev, x0 = diffkern.ops.guided_step(inp["sample"], inp["model_output"], inp["coeffs"], noise_seed=99,
                                        noise_offset=3, backend=backend, **kw)
    noise = reference.seeded_noise(inp["sample"].shape, 99, 3, device=device)
    ref_prev, ref_x0 = reference.guided_step(inp["sample"], inp["model_output"], inp["coeffs"], noise=noise,
                                             upcast=True, **kw)
    _assert_close(x0, ref_x0, dtype, "pred_original_sample")
    _assert_close(prev, ref_prev, dtype, "prev_sample")


@pytest.mark.parametrize("change,exc", [
    (dict(noise_seed=1, noise=torch.randn(2, 3, 4, 4)), ValueError),
    (dict(noise_seed=-1), ValueError),
    (dict(noise_seed=1 << 63), ValueError),
    (dict(noise_seed=True), TypeError),
    (dict(noise_seed=1.5), TypeError),
    (dict(noise_seed=1, noise_offset=-3), ValueError),
    (dict(eps_from_clipped=None), TypeError),
])
def test_bad_seed_names_the_argument(change, exc):
    kw = _ok()
    kw.update(change)
    with pytest.raises(exc, match="noise_seed|noise_offset|eps_from_clipped"):
        diffkern.ops.guided_step(kw.pop("sample"), kw.pop("model_output"), kw.pop("coeffs"), **kw)


def test_compiled_binding_checks_the_seed():
    from diffkern import _ext

    x = torch.randn(2, 3, 4)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="seed"):
        _ext.extension().guided_step_forward(x, x, None, x, torch.rand(2, 6), out, out, None, None,
                                             0, 0, False, 1.0, 1.0, 5, 0)
    with pytest.raises(ValueError, match="offset"):
        _ext.extension().guided_step_forward(x, x, None, None, torch.rand(2, 6), out, out, None, None,
                                             0, 0, False, 1.0, 1.0, 5, -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("clip", ["static", "dynamic"])
def test_eps_from_unclipped_prediction(backend, dtype, pred, clip):
    """eps_from_clipped=False (diffusers' DDIM default) on every backend, in the one pass."""
    _require(backend)
    device = backend_device(backend)
    inp = _inputs((2, 3, 7, 5), dtype, device, False, True, True)
    kw = dict(uncond_output=inp["uncond_output"], guidance_scale=2.5, prediction_type=pred, clip=clip,
              clip_range=0.8, dynamic_percentile=0.9, dynamic_max_value=1.5, noise=inp["noise"],
              eps_from_clipped=False)
    prev, x0 = diffkern.ops.guided_step(inp["sample"], inp["model_output"], inp["coeffs"], backend=backend, **kw)
    ref_prev, ref_x0 = reference.guided_step(inp["sample"], inp["model_output"], inp["coeffs"], upcast=True, **kw)
    _assert_close(x0, ref_x0, dtype, "pred_original_sample")
    _assert_close(prev, ref_prev, dtype, "prev_sample")


def test_eps_from_unclipped_prediction_reference_formula():
    """The eps term uses the raw prediction: prev = c_x0 clip(x0) + c_xt x + c_eps eps_raw."""
    x, m = 3 * torch.randn(2, 3, 4, 4, dtype=torch.float64), 3 * torch.randn(2, 3, 4, 4, dtype=torch.float64)
    c = torch.tensor([[0.6, 0.8, 0.5, 0.3, 0.7, 0.0]] * 2, dtype=torch.float64)
    for pred, eps_raw in [("epsilon", m), ("v_prediction", 0.6 * m + 0.8 * x), ("sample", (x - 0.6 * m) / 0.8)]:
        x0_raw = {"epsilon": (x - 0.8 * m) / 0.6, "v_prediction": 0.6 * x - 0.8 * m, "sample": m}[pred]
        prev, x0 = reference.guided_step(x, m, c, prediction_type=pred, clip="static", clip_range=1.0,
                                         eps_from_clipped=False)
        torch.testing.assert_close(x0, x0_raw.clamp(-1, 1))
        torch.testing.assert_close(prev, 0.5 * x0_raw.clamp(-1, 1) + 0.3 * x + 0.7 * eps_raw)
