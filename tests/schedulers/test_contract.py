"""The diffusers scheduler contract for every diffkern scheduler: configs (round trips both ways,
scheduler_config.json loadable by diffusers, frozen, unknown / invalid keys), compatibles, order,
init_noise_sigma, add_noise, dict-like outputs, and drop-in use inside diffusers' own SD pipeline."""

import json
import logging

import pytest
import torch

import diffkern.schedulers as S
from diffkern.schedulers import SCHEDULERS, SchedulerOutput, scheduler_class

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
    assert mine.config == ours.config and type(mine) is type(ours)
    theirs.save_config(tmp_path / "theirs")
    assert scheduler_class(name).from_pretrained(tmp_path / "theirs").config == ours.config
    with pytest.raises(TypeError, match="frozen"):
        ours.config["num_train_timesteps"] = 3


@pytest.mark.parametrize("name", NAMES)
def test_attributes_match_diffusers(name):
    theirs, ours = theirs_cls(name)(**_cfg(name)), scheduler_class(name)(**_cfg(name))
    assert ours.order == getattr(theirs, "order", 1)  # diffusers' UnCLIPScheduler has no order (pipelines assume 1)
    assert sorted(c.__name__ for c in ours.compatibles if c.__name__ in SCHEDULERS) == sorted(
        c.__name__ for c in theirs.compatibles if c.__name__ in SCHEDULERS) or name == "DDIMInverseScheduler"
    assert type(ours) in ours.compatibles or name == "UnCLIPScheduler"
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
    assert list(out.keys()) == list(ref.keys())
    assert out["prev_sample"] is out.prev_sample is out[0]
    assert len(out.to_tuple()) == len(ref.to_tuple())
    for s in (ours, theirs):
        s.set_timesteps(5)
    tup = ours.step(torch.tanh(x), t, x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(theirs.step(torch.tanh(x), t, x, return_dict=False))


def test_scheduler_output_semantics():
    p = torch.zeros(1)
    o = SchedulerOutput(prev_sample=p)
    assert list(o.keys()) == ["prev_sample"] and o.to_tuple() == (p,) and o.pred_original_sample is None
    x0 = torch.ones(1)
    o2 = SchedulerOutput(prev_sample=p, pred_original_sample=x0)
    assert o2[1] is x0 and o2["pred_original_sample"] is x0 and dict(o2).keys() == {"prev_sample", "pred_original_sample"}
    with pytest.raises(KeyError):
        o["pred_original_sample"]
    with pytest.raises(TypeError):
        o2.pop("prev_sample")


def test_unknown_keys_warn_like_diffusers(caplog):
    cfg = {**SD, "_class_name": "PNDMScheduler", "skip_prk_steps": True, "not_a_real_key": 3}
    with caplog.at_level(logging.WARNING, logger="diffkern.schedulers"):
        s = S.EulerDiscreteScheduler.from_config(cfg)
    assert "not_a_real_key" not in s.config and s.config.beta_schedule == "scaled_linear"
    msgs = [r.getMessage() for r in caplog.records]
    assert any("{'not_a_real_key': 3} were passed to EulerDiscreteScheduler" in m and "will be ignored" in m
               for m in msgs), msgs
    assert not any("skip_prk_steps" in m for m in msgs)  # another scheduler's key: dropped silently


@pytest.mark.parametrize("name,bad,key", [
    ("EulerDiscreteScheduler", {"prediction_type": "noise"}, "prediction_type"),
    ("EulerDiscreteScheduler", {"timestep_spacing": "middle"}, "timestep_spacing"),
    ("EulerDiscreteScheduler", {"beta_schedule": "cubic"}, "beta_schedule"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "use_exponential_sigmas": True}, "use_karras_sigmas"),
    ("DPMSolverMultistepScheduler", {"solver_order": 4}, "solver_order"),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "one"}, "final_sigmas_type"),
    ("UniPCMultistepScheduler", {"solver_type": "bh3"}, "solver_type"),
    ("PNDMScheduler", {"prediction_type": "sample"}, "prediction_type"),
    ("DDPMScheduler", {"num_train_timesteps": 0}, "num_train_timesteps"),
])
def test_invalid_values_name_the_key(name, bad, key):
    with pytest.raises(ValueError, match=key):
        scheduler_class(name).from_config({**SD, **bad})


def test_unsupported_options_say_so():
    with pytest.raises(NotImplementedError, match="algorithm_type"):
        S.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(NotImplementedError, match="use_beta_sigmas"):
        S.EulerDiscreteScheduler(use_beta_sigmas=True)
    with pytest.raises(ValueError, match="no diffkern scheduler named 'Nope'"):
        scheduler_class("Nope")


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
