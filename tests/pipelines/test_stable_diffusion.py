"""SD / LDM pipelines against diffusers' pipelines on tiny random-weight components.

Both sides get the same weights (diffkern's UNet and VAE converted with from_diffusers, the same
text encoder and tokenizer), the same scheduler config and the same seed; the images must agree to
1e-3 (fp32). diffusers' safety checker is off on its side (we have none).
"""

import numpy as np
import pytest
import torch

from diffkern import schedulers
from diffkern.models.text_encoders import LDMBertModel
from diffkern.pipelines import (
    LDMTextToImagePipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from tests.pipelines import (
    SD_SCHEDULER_CONFIG,
    bert_tokenizer,
    clip_tokenizer,
    diffkern_modules,
    max_diff,
    tiny_clip,
    tiny_ldmbert,
    tiny_unet,
    tiny_vae,
)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
PROMPT = "a photo of an astronaut on the moon"
V2_CONFIG = {**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """diffusers components for SD1-like (eps) and SD2-like (v, linear projections) models."""
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("tok"))
    common = dict(vae=tiny_vae(), text_encoder=tiny_clip(), tokenizer=tokenizer)
    return {"sd1": dict(common, unet=tiny_unet()), "sd2": dict(common, unet=tiny_unet(v2=True))}


def _pair(parts, kind="sd1", scheduler="ddim", img2img=False, config=SD_SCHEDULER_CONFIG):
    """(diffusers pipeline, diffkern pipeline) on the same weights and scheduler config."""
    ours_cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    theirs_cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    d_sched = getattr(diffusers, f"{scheduler.upper()}Scheduler").from_config(config)
    k_sched = getattr(schedulers, f"{scheduler.upper()}Scheduler").from_config(config)
    comps = parts[kind]
    theirs = theirs_cls(**comps, scheduler=d_sched, safety_checker=None, feature_extractor=None,
                        requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    ours = ours_cls(**diffkern_modules(**comps), scheduler=k_sched)
    ours.set_progress_bar_config(disable=True)
    return theirs, ours


def _both(theirs, ours, **kw):
    a = theirs(generator=_gen(), output_type="np", **kw).images
    b = ours(generator=_gen(), output_type="np", **kw).images
    assert a.shape == b.shape
    return max_diff(a, b)


def test_uses_diffkern_modules(parts):
    _, ours = _pair(parts)
    for module in (ours.unet, ours.vae):
        assert type(module).__module__.startswith("diffkern.")


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_text_to_image_matches_diffusers(parts, guidance_scale):
    theirs, ours = _pair(parts)
    kw = dict(prompt=[PROMPT, "a red cat"], negative_prompt=["blue", "a dog"], num_inference_steps=3,
              guidance_scale=guidance_scale, height=32, width=32)
    assert _both(theirs, ours, **kw) < TOL


def test_text_to_image_images_per_prompt_and_eta(parts):
    theirs, ours = _pair(parts)
    kw = dict(prompt=PROMPT, num_inference_steps=2, num_images_per_prompt=2, eta=0.5, height=32, width=32)
    assert _both(theirs, ours, **kw) < TOL


def test_given_latents_and_generator_list(parts):
    theirs, ours = _pair(parts)
    latents = torch.randn(2, 4, 16, 16, generator=_gen(3))
    kw = dict(prompt=[PROMPT, "a cat"], num_inference_steps=2, height=32, width=32, output_type="np")
    a = theirs(latents=latents, **kw).images
    b = ours(latents=latents, **kw).images
    assert max_diff(a, b) < TOL
    gens = [_gen(1), _gen(2)]
    a = theirs(generator=gens, **kw).images
    b = ours(generator=[_gen(1), _gen(2)], **kw).images
    assert max_diff(a, b) < TOL


def test_ddpm_scheduler_matches_diffusers(parts):
    theirs, ours = _pair(parts, scheduler="ddpm")
    assert _both(theirs, ours, prompt=PROMPT, num_inference_steps=3, height=32, width=32) < TOL


def test_sd2_v_prediction_matches_diffusers(parts):
    theirs, ours = _pair(parts, kind="sd2", config=V2_CONFIG)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    assert _both(theirs, ours, prompt=PROMPT, num_inference_steps=3, height=32, width=32) < TOL


@pytest.mark.parametrize("as_pil", [False, True])
def test_image_to_image_matches_diffusers(parts, as_pil):
    theirs, ours = _pair(parts, img2img=True)
    image = torch.rand(1, 3, 32, 32, generator=_gen(5))
    if as_pil:
        from PIL import Image

        image = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    kw = dict(prompt=PROMPT, image=image, strength=0.6, num_inference_steps=4)
    assert _both(theirs, ours, **kw) < TOL


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_prompt_embeds_match_diffusers(parts, guidance_scale):
    """Given embeddings (both, or the prompt's only with the negative encoded from negative_prompt or "")
    repeated per prompt as diffusers repeats them."""
    theirs, ours = _pair(parts)
    embeds = torch.randn(4, 77, 32, generator=_gen(7))
    kw = dict(num_inference_steps=2, guidance_scale=guidance_scale, height=32, width=32,
              num_images_per_prompt=2)
    assert _both(theirs, ours, prompt_embeds=embeds[:2], negative_prompt_embeds=embeds[2:], **kw) < TOL
    assert _both(theirs, ours, prompt_embeds=embeds[:2], negative_prompt=["blue", "a dog"], **kw) < TOL
    assert _both(theirs, ours, prompt_embeds=embeds[:1], **kw) < TOL
    assert _both(theirs, ours, prompt=[PROMPT, "a cat"], negative_prompt_embeds=embeds[2:], **kw) < TOL


def test_prompt_embeds_of_the_prompt_give_the_prompt_image(parts):
    from diffkern.models.text_encoders import encode_prompt

    _, ours = _pair(parts)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    cond = encode_prompt(ours.text_encoder, ours.tokenizer, [PROMPT])
    uncond = encode_prompt(ours.text_encoder, ours.tokenizer, ["blue"])
    a = ours(PROMPT, negative_prompt="blue", generator=_gen(), **kw).images
    b = ours(prompt_embeds=cond, negative_prompt_embeds=uncond, generator=_gen(), **kw).images
    assert max_diff(a, b) == 0


@pytest.mark.filterwarnings("ignore:You have passed")  # diffusers: 1 image for 2 outputs is deprecated
def test_image_to_image_prompt_embeds_match_diffusers(parts):
    theirs, ours = _pair(parts, img2img=True)
    embeds = torch.randn(2, 77, 32, generator=_gen(7))
    kw = dict(image=torch.rand(1, 3, 32, 32, generator=_gen(5)), strength=0.6, num_inference_steps=4,
              num_images_per_prompt=2)
    assert _both(theirs, ours, prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], **kw) < TOL
    assert _both(theirs, ours, prompt_embeds=embeds[:1], **kw) < TOL


def test_bad_prompt_embeds_name_themselves(parts):
    _, ours = _pair(parts)
    kw = dict(num_inference_steps=1, height=32, width=32)
    e = torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="prompt, prompt_embeds: give one"):
        ours(PROMPT, prompt_embeds=e, **kw)
    with pytest.raises(ValueError, match="prompt: required"):
        ours(**kw)
    with pytest.raises(ValueError, match="negative_prompt, negative_prompt_embeds: give one"):
        ours(prompt_embeds=e, negative_prompt="a", negative_prompt_embeds=e, **kw)
    with pytest.raises(ValueError, match="negative_prompt_embeds: expected the shape of prompt_embeds"):
        ours(prompt_embeds=e, negative_prompt_embeds=torch.zeros(2, 77, 32), **kw)
    with pytest.raises(ValueError, match="negative_prompt_embeds: expected the shape of the prompt"):
        ours(PROMPT, negative_prompt_embeds=torch.zeros(1, 70, 32), **kw)
    with pytest.raises(ValueError, match="prompt_embeds: expected a .batch, tokens, dim. tensor"):
        ours(prompt_embeds=torch.zeros(77, 32), **kw)
    with pytest.raises(ValueError, match="prompt_embeds: expected dim 32"):
        ours(prompt_embeds=torch.zeros(1, 77, 16), **kw)
    with pytest.raises(ValueError, match="negative_prompt: got 1 negative prompts for 2 prompts"):
        ours(prompt_embeds=torch.zeros(2, 77, 32), negative_prompt=["a"], **kw)


def test_output_types_agree(parts):
    _, ours = _pair(parts)
    kw = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=32)
    pt = ours(generator=_gen(), output_type="pt", **kw).images
    arr = ours(generator=_gen(), output_type="np", **kw).images
    pil = ours(generator=_gen(), output_type="pil", **kw).images
    lat = ours(generator=_gen(), output_type="latent", **kw).images
    assert pt.shape == (1, 3, 32, 32) and arr.shape == (1, 32, 32, 3) and lat.shape == (1, 4, 16, 16)
    assert 0 <= pt.min() and pt.max() <= 1
    assert np.array_equal(pt.permute(0, 2, 3, 1).numpy(), arr)
    assert np.abs(np.asarray(pil[0], dtype=np.float32) / 255 - arr[0]).max() <= 0.5 / 255 + 1e-6


def test_default_size_from_unet_and_vae(parts):
    _, ours = _pair(parts)
    out = ours(PROMPT, num_inference_steps=1, output_type="pt", generator=_gen()).images
    assert out.shape[-2:] == (32, 32)  # sample_size 16 x downscale 2


def test_bad_arguments_name_themselves(parts):
    _, ours = _pair(parts)
    with pytest.raises(ValueError, match="height"):
        ours(PROMPT, height=31, width=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        ours(PROMPT, num_inference_steps=1, output_type="jpeg")
    with pytest.raises(ValueError, match="generator"):
        ours(PROMPT, num_inference_steps=1, generator=[_gen(), _gen()])
    with pytest.raises(ValueError, match="latents"):
        ours(PROMPT, num_inference_steps=1, latents=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="negative_prompt"):
        ours([PROMPT, "a cat"], negative_prompt=["a", "b", "c"], num_inference_steps=1)
    with pytest.raises(TypeError, match="scheduler"):
        StableDiffusionPipeline(ours.unet, ours.vae, ours.text_encoder, ours.tokenizer,
                                diffusers.DDIMScheduler())
    _, img = _pair(parts, img2img=True)
    with pytest.raises(ValueError, match="strength"):
        img(PROMPT, torch.rand(1, 3, 32, 32), strength=1.5, num_inference_steps=2)


def test_from_loaded_patches_legacy_sd_scheduler_config(parts):
    comps = diffkern_modules(**parts["sd1"])
    legacy = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if k not in ("steps_offset", "clip_sample")}
    pipe = StableDiffusionPipeline.from_loaded({**comps, "scheduler_config": legacy}, scheduler="ddpm")
    assert isinstance(pipe.scheduler, schedulers.DDPMScheduler)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"


def test_from_pretrained_folder(parts, tmp_path):
    theirs, _ = _pair(parts)
    theirs.save_pretrained(tmp_path / "sd")
    ours = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", scheduler="ddpm")
    assert isinstance(ours.scheduler, schedulers.DDPMScheduler)
    assert ours.scheduler.config.beta_schedule == "scaled_linear" and ours.scheduler.config.steps_offset == 1
    assert type(ours.unet).__module__.startswith("diffkern.")
    ours.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=32, output_type="np")
    fresh = _pair(parts, scheduler="ddpm")[1]
    assert max_diff(ours(generator=_gen(), **kw).images, fresh(generator=_gen(), **kw).images) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_the_modules(parts, dtype):
    _, ours = _pair(parts)
    kw = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=32, output_type="np")
    ref = ours(generator=_gen(), **kw).images
    ours.to(dtype=dtype)  # casts the text encoder too, which the other tests share: cast it back after
    try:
        assert ours.dtype == dtype
        lat = ours(generator=_gen(), **{**kw, "output_type": "latent"}).images
        assert lat.dtype == dtype
        out = ours(generator=_gen(), **kw).images
    finally:
        ours.to(dtype=torch.float32)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    # the noise is drawn in the half dtype (as diffusers draws it), so only a loose agreement with fp32
    assert max_diff(out, ref) < 0.1


@pytest.fixture(scope="module")
def ldm_pair(tmp_path_factory):
    tokenizer = bert_tokenizer(tmp_path_factory.mktemp("bert_tok"))
    bert, unet, vae = tiny_ldmbert(), tiny_unet(), tiny_vae(levels=4)  # downscale 8, as the released VAE
    config = {**SD_SCHEDULER_CONFIG, "_class_name": "DDIMScheduler"}
    theirs = diffusers.LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tokenizer, unet=unet,
                                              scheduler=diffusers.DDIMScheduler.from_config(config))
    theirs.set_progress_bar_config(disable=True)
    converted = diffkern_modules(unet=unet, vae=vae)
    ours = LDMTextToImagePipeline(**converted, text_encoder=LDMBertModel.from_diffusers(bert),
                                  tokenizer=tokenizer, scheduler=schedulers.DDIMScheduler.from_config(config))
    ours.set_progress_bar_config(disable=True)
    return theirs, ours


@pytest.mark.parametrize("guidance_scale", [6.0, 1.0])
def test_ldm_text_to_image_matches_diffusers(ldm_pair, guidance_scale):
    theirs, ours = ldm_pair
    kw = dict(prompt=[PROMPT, "a red cat"], num_inference_steps=3, guidance_scale=guidance_scale,
              height=32, width=32)
    assert _both(theirs, ours, **kw) < TOL
