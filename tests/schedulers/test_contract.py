"""The diffusers scheduler contract for every diffkern scheduler (each IS diffusers' class, subclassed):
configs (round trips both ways, scheduler_config.json loadable by diffusers, `_use_default_values` on
switching class), compatibles, order, init_noise_sigma, add_noise, diffusers' output classes, the
options that run diffusers' step, and drop-in use inside diffusers' own SD pipeline."""

import inspect
import json

import pytest
import torch

import diffkern.schedulers as S
from diffkern.schedulers import SCHEDULERS, scheduler_class

from ._sampler_table import diffusers_lms_class

diffusers = pytest.importorskip("diffusers")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
NAMES = sorted(SCHEDULERS)


def theirs_cls(name):
    return diffusers_lms_class() if name == "LMSDiscreteScheduler" else getattr(diffusers, name)


def _public(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _cfg(name):
    return {} if name == "UnCLIPScheduler" else dict(SD)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_and_json(name, tmp_path):
    theirs = theirs_cls(name)(**_cfg(name))
    ours = scheduler_class(name).from_config(theirs.config)
    assert _public(ours.config) == _public(theirs.config)
    assert _public(theirs_cls(name).from_config(ours.config).config) == _public(theirs.config)
    ours.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name and "_diffusers_version" in saved
    back = theirs_cls(name).from_pretrained(tmp_path, subfolder="scheduler")
    assert _public(back.config) == _public(theirs.config)
    mine = scheduler_class(name).from_pretrained(tmp_path, subfolder="scheduler")
    assert _public(mine.config) == _public(ours.config) and type(mine) is type(ours)
    theirs.save_config(tmp_path / "theirs")
    assert _public(scheduler_class(name).from_pretrained(tmp_path / "theirs").config) == _public(ours.config)
    assert isinstance(ours, theirs_cls(name))


@pytest.mark.parametrize("name", NAMES)
def test_attributes_match_diffusers(name):
    theirs, ours = theirs_cls(name)(**_cfg(name)), scheduler_class(name)(**_cfg(name))
    assert ours.order == getattr(theirs, "order", 1)  # diffusers' UnCLIPScheduler has no order (pipelines assume 1)
    assert sorted(c.__name__ for c in ours.compatibles) == sorted(c.__name__ for c in theirs.compatibles)
    for s in (theirs, ours):
        s.set_timesteps(10)
    torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x, noise = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    t = ours.timesteps[[0, 3, -1]]
    if hasattr(type(theirs), "add_noise"):  # diffusers' DDIMInverseScheduler has none
        torch.testing.assert_close(ours.add_noise(x, noise, t), theirs.add_noise(x, noise, t))
    t0 = ours.timesteps[0]
    torch.testing.assert_close(ours.scale_model_input(x, t0), theirs.scale_model_input(x, t0))


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("UnCLIPScheduler",)])
def test_outputs_are_dict_like(name):
    ours, theirs = scheduler_class(name)(**_cfg(name)), theirs_cls(name)(**_cfg(name))
    for s in (ours, theirs):
        s.set_timesteps(5)
    x = torch.randn(1, 4, 3, 3)
    t = ours.timesteps[0]
    out = ours.step(torch.tanh(x), t, x)
    ref = theirs.step(torch.tanh(x), t, x)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    assert out["prev_sample"] is out.prev_sample is out[0]
    assert len(out.to_tuple()) == len(ref.to_tuple())
    for s in (ours, theirs):
        s.set_timesteps(5)
    tup = ours.step(torch.tanh(x), t, x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(theirs.step(torch.tanh(x), t, x, return_dict=False))


@pytest.mark.parametrize("src", ["PNDMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("dst", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_switching_class_keeps_defaults_as_diffusers(src, dst):
    # the keys a config left at their defaults (`_use_default_values`) take the new class's defaults, so
    # switching a (patched) pipeline's scheduler builds what it builds unpatched
    cfg = {**SD, "steps_offset": 1}
    mine = scheduler_class(dst).from_config(scheduler_class(src)(**cfg).config)
    ref = theirs_cls(dst).from_config(theirs_cls(src)(**cfg).config)
    assert _public(mine.config) == _public(ref.config)


def test_extension_key_loads_in_diffusers(tmp_path):
    ours = S.DDPMScheduler(**SD, timestep_respacing="ddim25")
    assert "timestep_respacing" not in S.DDPMScheduler(**SD).config  # absent unless used
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDPMScheduler" and saved["timestep_respacing"] == "ddim25"
    back = diffusers.DDPMScheduler.from_pretrained(tmp_path)  # diffusers warns and keeps it as a hidden key
    assert _public(back.config) == _public(ours.config)
    mine = S.DDPMScheduler.from_pretrained(tmp_path)
    assert mine.timesteps.tolist() == list(range(960, -1, -40))


def _step_or_error(s, x, cfg_step):
    try:
        s.set_timesteps(4)
        t = s.timesteps[0]
        if "generator" in inspect.signature(s.step).parameters:
            cfg_step = {**cfg_step, "generator": torch.Generator().manual_seed(0)}
        return s.step(torch.tanh(s.scale_model_input(x, t)), t, x, **cfg_step).prev_sample
    except Exception as e:  # noqa: BLE001 -- the comparison is of what is raised
        return type(e)


@pytest.mark.parametrize("name,bad", [
    ("EulerDiscreteScheduler", {"prediction_type": "noise"}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "middle"}),
    ("EulerDiscreteScheduler", {"beta_schedule": "cubic"}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "one"}),
    ("UniPCMultistepScheduler", {"solver_type": "bh3"}),
    ("PNDMScheduler", {"prediction_type": "sample"}),
    ("DDPMScheduler", {"variance_type": "huge"}),
    ("DDIMScheduler", {"prediction_type": "score"}),
])
def test_unusual_values_behave_as_in_diffusers(name, bad):
    x = torch.randn(1, 4, 3, 3)
    results = []
    for cls in (scheduler_class(name), theirs_cls(name)):
        try:
            s = cls.from_config({**SD, **bad})
        except Exception as e:  # noqa: BLE001
            results.append(type(e))
            continue
        results.append(_step_or_error(s, x, {}))
    if isinstance(results[1], torch.Tensor):  # diffusers takes it (e.g. an unknown variance_type)
        torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)
    else:  # the same exception class, raised at the same call
        assert results[0] is results[1]


@pytest.mark.parametrize("name,config,step_kwargs", [
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, {}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 1.0}),
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 0.5}, {}),
    ("UniPCMultistepScheduler", {"thresholding": True, "sample_max_value": 0.5}, {}),
])
def test_unfused_options_run_diffusers_step(name, config, step_kwargs):
    ours, theirs = scheduler_class(name)(**SD, **config), theirs_cls(name)(**SD, **config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=g) * 4
    c, u = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for s in (ours, theirs):
        s.set_timesteps(6)
    takes_generator = "generator" in inspect.signature(theirs.step).parameters
    for t in ours.timesteps[:3]:
        gens = [{"generator": torch.Generator().manual_seed(int(t))} if takes_generator else {} for _ in range(2)]
        ours.scale_model_input(x, t), theirs.scale_model_input(x, t)
        a = ours.step(c, t, x, uncond_output=u, guidance_scale=3.0, **step_kwargs, **gens[0])
        b = theirs.step(u + 3.0 * (c - u), t, x, **step_kwargs, **gens[1])
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=0, rtol=0)
        x = b.prev_sample
    assert ours.fallback_reason(gamma=1.0) is not None if name == "EulerDiscreteScheduler" else \
        ours.fallback_reason() is not None


# -- drop-in inside diffusers' StableDiffusionPipeline -------------------------------------------

@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    from tests.pipelines import clip_tokenizer, tiny_clip, tiny_unet, tiny_vae

    return dict(vae=tiny_vae(), text_encoder=tiny_clip(), unet=tiny_unet(),
                tokenizer=clip_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("name,extra", [
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("UniPCMultistepScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
])
def test_drop_in_diffusers_sd_pipeline(sd_parts, name, extra):
    cfg = {**SD, **extra}
    pipe = diffusers.StableDiffusionPipeline(**sd_parts, scheduler=theirs_cls(name)(**cfg), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a cat", num_inference_steps=4, height=32, width=32, guidance_scale=7.5,
              output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.scheduler = scheduler_class(name).from_config(pipe.scheduler.config)
    assert type(pipe.scheduler).__module__.startswith("diffkern.")
    got = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_step_is_one_fused_op_call(name, monkeypatch):
    # the fast path runs (no silent fallback to diffusers' step) for the default and SD configs
    import diffkern.ops

    calls = []
    for op in ("guided_step", "sampler_update"):
        real = getattr(diffkern.ops, op)
        monkeypatch.setattr(diffkern.ops, op, lambda *a, _real=real, _op=op, **k: calls.append(_op) or _real(*a, **k))
    ours = scheduler_class(name)(**_cfg(name))
    assert ours.fallback_reason() is None
    ours.set_timesteps(5)
    x = torch.randn(1, 3, 4, 4)
    t = ours.timesteps[0]
    out = ours.step(torch.tanh(ours.scale_model_input(x, t)), t, x, uncond_output=torch.tanh(x * 0.5),
                    guidance_scale=2.0)
    assert len(calls) == 1 and torch.isfinite(out.prev_sample).all()
