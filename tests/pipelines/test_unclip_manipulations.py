"""The paper's manipulations: slerp / text-diff formulas, DDIM decode and inversion against float64
formulas (a linear stub decoder makes the expected trajectory closed-form), the eta = 0 round trip through
a real (tiny) decoder, and the three end-to-end methods."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffkern.models import from_diffusers
from diffkern.pipelines import UnCLIPImageVariationPipeline, UnCLIPManipulations
from diffkern.pipelines._unclip_manipulations import interpolate_embeddings, slerp, text_diff_embedding
from diffkern.models._config import ModelConfig
from tests.pipelines._unclip import clip_vision, diffkern_decoder_or_none, diffusers_components, feature_extractor


def _np_slerp(a, b, t):
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    w = math.acos(float(np.clip(a @ b, -1, 1)))
    return (math.sin((1 - t) * w) * a + math.sin(t * w) * b) / math.sin(w)


@pytest.mark.parametrize("theta", [0.0, 0.3, 0.5, 1.0])
def test_slerp_and_embedding_formulas(theta):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 16, generator=g, dtype=torch.float64) * s for s in (2.0, 0.5, 1.0))
    for i in range(3):
        want = _np_slerp(a[i].numpy(), b[i].numpy(), theta)
        assert np.abs(slerp(a, b, theta)[i].numpy() - want).max() < 1e-12
        norm = (1 - theta) * np.linalg.norm(a[i]) + theta * np.linalg.norm(b[i])
        assert np.abs(interpolate_embeddings(a, b, theta)[i].numpy() - want * norm).max() < 1e-12
        d = (b[i] - c[i]).numpy()
        want = _np_slerp(a[i].numpy(), d, theta) * np.linalg.norm(a[i])
        assert np.abs(text_diff_embedding(a, c, b, theta)[i].numpy() - want).max() < 1e-12
    assert torch.allclose(interpolate_embeddings(a, b, 0.0), a, atol=1e-12)
    assert torch.allclose(interpolate_embeddings(a, b, 1.0), b, atol=1e-12)


@pytest.mark.parametrize("theta", [-0.1, 1.5, float("nan"), "0.5", True])
def test_theta_outside_unit_interval(theta):
    a = torch.randn(1, 4)
    with pytest.raises(ValueError, match="theta"):
        slerp(a, a + 1, theta)
    with pytest.raises(ValueError, match="theta"):
        text_diff_embedding(a, a, a + 1, theta)


@pytest.fixture(scope="module")
def variation_pipe(tmp_path_factory):
    c = diffusers_components(tmp_path_factory.mktemp("manip"))
    decoder = diffkern_decoder_or_none(c["decoder"]) or c["decoder"]
    return UnCLIPImageVariationPipeline(
        decoder=decoder, text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
        text_proj=from_diffusers(c["text_proj"]), feature_extractor=feature_extractor(), image_encoder=clip_vision(),
        super_res_first=from_diffusers(c["super_res_first"]),
        super_res_last=from_diffusers(c["super_res_last"]), decoder_scheduler=c["decoder_scheduler"],
        super_res_scheduler=c["super_res_scheduler"])


class LinearDecoder(nn.Module):
    """eps = alpha x + beta mean(class_labels) (6 channels: eps, then zeros as 'variance')."""

    def __init__(self, alpha=0.3, beta=0.2):
        super().__init__()
        self.config = ModelConfig(sample_size=16, in_channels=3)
        self.alpha, self.beta = alpha, beta
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, sample, timestep, encoder_hidden_states, class_labels, attention_mask):
        eps = self.alpha * sample + self.beta * class_labels.mean(-1)[:, None, None, None] + self.anchor
        return torch.cat([eps, torch.zeros_like(eps)], 1)


def _stub_manip(variation_pipe, steps, guidance, iterations=0):
    pipe = copy.copy(variation_pipe)
    pipe.decoder = LinearDecoder()
    pipe.text_encoder = copy.deepcopy(variation_pipe.text_encoder).double()
    pipe.text_proj = copy.deepcopy(variation_pipe.text_proj).double()
    m = UnCLIPManipulations(pipe, num_inference_steps=steps, guidance_scale=guidance,
                            fixed_point_iterations=iterations)
    # the stub's eps offsets, cond and uncond, exactly as the decoder sees them
    z = torch.randn(2, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fn = m._model_fn(z)
    x = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    cond, uncond = fn(x, 0)
    offset = uncond[:, :1, :1, :1] + guidance * (cond[:, :1, :1, :1] - uncond[:, :1, :1, :1])
    return m, z, offset


def _abar(t):
    f = lambda s: math.cos((s / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    if t < 0:
        return 1.0
    prod = 1.0
    for i in range(t + 1):
        prod *= 1 - min(1 - f(i + 1) / f(i), 0.999)
    return prod


def test_ddim_decode_matches_the_float64_formula(variation_pipe):
    steps, g_scale, eta = 4, 3.0, 0.7
    m, z, offset = _stub_manip(variation_pipe, steps, g_scale)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = m.decode(z, x_T, eta=eta, generator=torch.Generator().manual_seed(3))
    noise = torch.Generator().manual_seed(3)
    x = x_T.clone()
    for t in (750, 500, 250, 0):
        s = t - 250
        a_t, a_s = _abar(t), _abar(s)
        eps = 0.3 * x + offset
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)
        z_k = torch.randn(x.shape, generator=noise, dtype=torch.float64)
        x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma ** 2) * eps + sigma * z_k
    # 1e-5: the schedule's alphas_cumprod are float32 (as diffusers'), the formula's float64
    assert (got - x.clamp(-1, 1)).abs().max() < 1e-5


def test_ddim_inversion_matches_the_float64_solution(variation_pipe):
    """With eps linear in x, the exact inverse step solves x_t = c_x x_s + c_e (alpha x_t + b) in closed form;
    fixed-point iterations converge to it."""
    m, z, offset = _stub_manip(variation_pipe, 4, 2.0, iterations=40)
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    got = m.invert(x0, z)
    x = x0.clone()
    for t in (0, 250, 500, 750):
        a_s, a_t = _abar(t - 250), _abar(t)
        cx, ce = math.sqrt(a_t / a_s), math.sqrt(1 - a_t) - math.sqrt(a_t * (1 - a_s) / a_s)
        x = (cx * x + ce * offset) / (1 - ce * 0.3)
    assert (got - x).abs().max() < 1e-5  # float32 alphas_cumprod vs the float64 schedule
    back = m.decode(z, got, eta=0.0)
    # the eta = 0 round trip; 1e-6: the sampler's step coefficients are float32 rows (guided_step's)
    assert (back - x0).abs().max() < 1e-6


def test_round_trip_through_the_tiny_decoder(variation_pipe):
    """x_T = invert(image | z_i); DDIM eta = 0 from x_T gives the image back. The fixed-point iterations
    converge when |eps coefficient| x Lip(eps) < 1; a random decoder's eps is far steeper than a trained
    one's, so its output convolution is scaled down (x 0.005) to make the inverse well posed."""
    pipe = copy.copy(variation_pipe)
    for name in ("decoder", "text_encoder", "text_proj"):
        setattr(pipe, name, copy.deepcopy(getattr(variation_pipe, name)).double())
    with torch.no_grad():
        pipe.decoder.conv_out.weight.mul_(0.005)
        pipe.decoder.conv_out.bias.mul_(0.005)
    img = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1.6 - 0.8
    img = torch.nn.functional.interpolate(img, size=(16, 16), mode="bilinear")
    z = torch.randn(1, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    errors = {}
    for k in (0, 6):
        m = UnCLIPManipulations(pipe, num_inference_steps=10, guidance_scale=2.0, fixed_point_iterations=k)
        errors[k] = (m.decode(z, m.invert(img, z)) - img).abs().max().item()
    assert errors[6] < 1e-5 and errors[0] > 100 * errors[6], errors


def test_manipulations_end_to_end(variation_pipe):
    from PIL import Image

    rng = np.random.default_rng(0)
    a, b = (Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(2))
    m = UnCLIPManipulations(variation_pipe, num_inference_steps=3, guidance_scale=2.0, fixed_point_iterations=1)
    out = m.variations(a, num_variations=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                       super_res_num_inference_steps=2)
    assert out.images.shape == (2, 3, 32, 32) and not torch.equal(out.images[0], out.images[1])
    small = m.interpolate(a, b, steps_between=1, super_res=False, output_type="pt").images
    assert small.shape == (3, 3, 16, 16)
    assert m.interpolate(a, b, thetas=[0.5], slerp_noise=True, super_res=False, output_type="np").images.shape == \
        (1, 16, 16, 3)
    pil = m.text_diff(a, "a photo of a cat", "a photo of a dog", thetas=[0.0, 0.5],
                      generator=torch.Generator().manual_seed(1), super_res_num_inference_steps=2).images
    assert len(pil) == 2 and pil[0].size == (32, 32)
    with pytest.raises(ValueError, match="thetas"):
        m.text_diff(a, "a cat", "a dog", thetas=[1.2])
    with pytest.raises(ValueError, match="image"):
        m.variations(torch.zeros(1, 3, 8, 8))
