"""The diffusers scheduler contract: from_config, config, timesteps, add_noise, pipelines."""

import pytest
import torch

import diffkern
from diffkern.schedulers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, sample_loop
from diffkern.kernels import reference

from ._helpers import model

diffusers = pytest.importorskip("diffusers")

PAIRS = [
    (DDPMScheduler, diffusers.DDPMScheduler),
    (DDIMScheduler, diffusers.DDIMScheduler),
    (DDIMInverseScheduler, diffusers.DDIMInverseScheduler),
]
CONFIGS = [
    {},
    {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "steps_offset": 1,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "clip_sample": False,
    },
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 400},
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("ours_cls,theirs_cls", PAIRS)
def test_from_config_round_trip(ours_cls, theirs_cls, config):
    theirs = theirs_cls(**config)
    ours = ours_cls.from_config(theirs.config)
    for key, value in theirs.config.items():
        if key in ours.config:
            assert ours.config[key] == value, key
    assert ours.config.num_train_timesteps == theirs.config.num_train_timesteps  # attribute access
    back = theirs_cls.from_config(ours.config)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    assert public(back.config) == public(theirs.config)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod)
    torch.testing.assert_close(ours.betas, theirs.betas)
    assert isinstance(ours, theirs_cls) and type(ours).__name__ == theirs_cls.__name__
    assert ours.init_noise_sigma == theirs.init_noise_sigma
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert len(ours) == len(theirs)


def test_from_config_overrides_and_foreign_keys():
    cfg = dict(diffusers.PNDMScheduler().config)  # other schedulers' keys are ignored, as diffusers does
    s = DDIMScheduler.from_config(cfg, prediction_type="sample", clip_sample_range=2.0)
    assert s.config.prediction_type == "sample" and s.config.clip_sample_range == 2.0
    # an unknown keyword is not a config key: returned as unused, as diffusers' from_config does
    s2, unused = DDIMScheduler.from_config(cfg, not_a_key=1, return_unused_kwargs=True)
    assert unused == {"not_a_key": 1} and "not_a_key" not in s2.config
    with pytest.raises(TypeError, match="not_a_key"):
        DDIMScheduler(not_a_key=1)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 20, 50, 333, 1000])
def test_set_timesteps_matches(spacing, n):
    for ours_cls, theirs_cls in PAIRS:
        if ours_cls is DDIMInverseScheduler and spacing == "linspace":
            continue
        ours, theirs = (
            ours_cls(timestep_spacing=spacing, steps_offset=1),
            theirs_cls(timestep_spacing=spacing, steps_offset=1),
        )
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
        assert ours.timesteps.tolist() == theirs.timesteps.tolist(), (ours_cls.__name__, spacing, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_and_velocity(dtype):
    ours, theirs = (
        DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
    )
    x, noise = torch.randn(4, 3, 5, 5, dtype=dtype), torch.randn(4, 3, 5, 5, dtype=dtype)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(ours.add_noise(x, noise, t), theirs.add_noise(x, noise, t))
    torch.testing.assert_close(ours.get_velocity(x, noise, t), theirs.get_velocity(x, noise, t))


def test_return_dict_false_and_tensor_timestep():
    s = DDIMScheduler()
    s.set_timesteps(10)
    x = torch.randn(1, 3, 4, 4)
    out = s.step(torch.tanh(x), s.timesteps[1], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out[0], s.step(torch.tanh(x), int(s.timesteps[1]), x).prev_sample)
    assert s.scale_model_input(x, s.timesteps[0]) is x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", ["none", "static", "dynamic"])
def test_private_stand_in_agrees_with_op(clip, prediction_type):
    op = diffkern.ops.guided_step
    g = torch.Generator().manual_seed(0)
    x, m, u, n = (torch.randn(3, 4, 6, 6, generator=g) for _ in range(4))
    coeffs = torch.rand(3, 6, generator=g) + 0.1
    kw = {
        "uncond_output": u,
        "guidance_scale": 3.0,
        "prediction_type": prediction_type,
        "clip": clip,
        "noise": n,
        "dynamic_percentile": 0.9,
        "dynamic_max_value": 1.5,
    }
    for a, b in zip(op(x, m, coeffs, **kw), reference.guided_step(x, m, coeffs, **kw)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_guided_step_matches_manual_guidance():
    s1, s2 = DDPMScheduler(), DDPMScheduler()
    for s in (s1, s2):
        s.set_timesteps(10)
    x, c, u = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0)).unbind(0)
    x, c, u = x[None], c[None], u[None]
    t = s1.timesteps[2]
    a = s1.step(c, t, x, generator=torch.Generator().manual_seed(3), uncond_output=u, guidance_scale=4.0)
    b = s2.step(u + 4.0 * (c - u), t, x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=1e-5)


def test_sample_loop_matches_manual_diffusers_loop():
    ours = DDIMScheduler(clip_sample=False)
    theirs = diffusers.DDIMScheduler(clip_sample=False)
    shape = (2, 3, 8, 8)
    got = sample_loop(
        lambda x, t: model(x, t),
        ours,
        shape,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=20,
        progress=False,
        step_kwargs={"eta": 1.0},
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * theirs.init_noise_sigma
    theirs.set_timesteps(20)
    for t in theirs.timesteps:
        x = theirs.step(model(x, t), t, x, eta=1.0, generator=g).prev_sample
    torch.testing.assert_close(got, x, atol=5e-5, rtol=5e-5)


def test_sample_loop_guidance_and_progress():
    s = DDPMScheduler(timestep_respacing="10")
    got = sample_loop(
        lambda x, t: (model(x, t), model(x, t, scale=0.5)),
        s,
        (1, 3, 4, 4),
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        progress=True,
    )
    assert got.shape == (1, 3, 4, 4) and torch.isfinite(got).all()


@pytest.mark.parametrize(
    "ours_cls,theirs_cls,kwargs",
    [(DDPMScheduler, diffusers.DDPMScheduler, {}), (DDIMScheduler, diffusers.DDIMScheduler, {"eta": 1.0})],
)
def test_drop_in_pipeline(ours_cls, theirs_cls, kwargs):
    # a tiny random UNet2DModel in diffusers' own pipeline: swapping the scheduler keeps the image
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe_cls = diffusers.DDPMPipeline if ours_cls is DDPMScheduler else diffusers.DDIMPipeline
    pipe = pipe_cls(unet=unet, scheduler=theirs_cls(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np", **kwargs
    ).images
    pipe.scheduler = ours_cls.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, ours_cls)
    got = pipe(
        generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np", **kwargs
    ).images
    assert abs(got - ref).max() < 1e-4
