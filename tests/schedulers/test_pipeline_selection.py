"""load_pipeline runs the scheduler the folder names (PNDM for an SD 1.5-style folder) unless the
caller picks another, and diffkern's SD pipelines give diffusers' images with every sampler."""

import pytest
import torch

import diffkern.schedulers as S
from diffkern.pipelines import load_pipeline
from diffkern.pipelines._common import make_scheduler

from ._sampler_table import diffusers_lms_class

diffusers = pytest.importorskip("diffusers")

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "clip_sample": False, "trained_betas": None}
KW = dict(prompt="a photo of a red cat", num_inference_steps=4, height=32, width=32, guidance_scale=7.5,
          output_type="np")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.pipelines import clip_tokenizer, tiny_clip, tiny_unet, tiny_vae

    root = tmp_path_factory.mktemp("sd15")
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(), unet=tiny_unet(), tokenizer=clip_tokenizer(root / "tok"),
        scheduler=diffusers.PNDMScheduler.from_config(SD15), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    return root / "sd"


def _theirs(folder, name):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    cls = diffusers_lms_class() if name == "LMSDiscreteScheduler" else getattr(diffusers, name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), **KW).images


def test_default_is_the_folders_scheduler(folder):
    ours = load_pipeline(folder)
    assert type(ours.scheduler) is S.PNDMScheduler and ours.scheduler.config.skip_prk_steps is True
    ours.set_progress_bar_config(disable=True)
    got = ours(generator=torch.Generator().manual_seed(0), **KW).images
    assert abs(got - _theirs(folder, "PNDMScheduler")).max() < 1e-3


@pytest.mark.parametrize("pick,name", [
    ("ddim", "DDIMScheduler"),
    ("euler_a", "EulerAncestralDiscreteScheduler"),
    ("dpm++2m_karras", "DPMSolverMultistepScheduler"),
    ("UniPCMultistepScheduler", "UniPCMultistepScheduler"),
    ("heun", "HeunDiscreteScheduler"),
    ("lms", "LMSDiscreteScheduler"),
])
def test_caller_picks_another(folder, pick, name):
    ours = load_pipeline(folder, scheduler=pick)
    assert type(ours.scheduler).__name__ == name
    assert ours.scheduler.config.beta_schedule == "scaled_linear"  # the folder's betas carry over
    ours.set_progress_bar_config(disable=True)
    got = ours(generator=torch.Generator().manual_seed(0), **KW).images
    if pick == "dpm++2m_karras":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False)
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                           use_karras_sigmas=True)
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(generator=torch.Generator().manual_seed(0), **KW).images
    else:
        ref = _theirs(folder, name)
    assert abs(got - ref).max() < 1e-3


def test_img2img_with_a_step_indexed_sampler(folder):
    from PIL import Image
    import numpy as np

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    ours = load_pipeline(folder, scheduler="heun", img2img=True)
    ours.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a red cat", image=image, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
              output_type="np")
    got = ours(generator=torch.Generator().manual_seed(0), **kw).images
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                   requires_safety_checker=False)
    pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(got - ref).max() < 1e-3


def test_make_scheduler_names():
    assert type(make_scheduler(None, {})) is S.DDIMScheduler
    assert type(make_scheduler(None, {"_class_name": "KDPM2DiscreteScheduler"})) is S.DDIMScheduler
    assert type(make_scheduler("ddpm", SD15)) is S.DDPMScheduler
    assert make_scheduler("dpm++2m_sde_karras", SD15).config.algorithm_type == "sde-dpmsolver++"
    with pytest.raises(ValueError, match="scheduler: expected one of"):
        make_scheduler("fastest", SD15)
