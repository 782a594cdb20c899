"""StableDiffusionInpaintPipeline against diffusers' on tiny random-weight components.

Same weights (a 9-channel tiny UNet and the VAE converted with from_diffusers, the same text encoder and
tokenizer), same scheduler config, same seed: the images must agree to 1e-3 (fp32), which also checks
that the mask and image preprocessing and every generator draw happen as in diffusers.
"""

import numpy as np
import pytest
import torch

from diffkern import schedulers
from diffkern.pipelines import StableDiffusionInpaintPipeline, load_pipeline
from diffkern.pipelines.stable_diffusion_inpaint import preprocess_mask
from tests.pipelines import (
    SD_SCHEDULER_CONFIG,
    clip_tokenizer,
    diffkern_modules,
    max_diff,
    tiny_clip,
    tiny_inpaint_unet,
    tiny_unet,
    tiny_vae,
)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
PROMPT = "a red cat on the moon"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("tok"))
    return dict(vae=tiny_vae(), text_encoder=tiny_clip(), tokenizer=tokenizer, unet=tiny_inpaint_unet())


def _diffusers_pipe(comps, scheduler="ddim"):
    sched = getattr(diffusers, f"{scheduler.upper()}Scheduler").from_config(SD_SCHEDULER_CONFIG)
    pipe = diffusers.StableDiffusionInpaintPipeline(**comps, scheduler=sched, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pair(comps):
    ours = StableDiffusionInpaintPipeline(**diffkern_modules(**comps),
                                          scheduler=schedulers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG))
    ours.set_progress_bar_config(disable=True)
    return _diffusers_pipe(comps), ours


def _inputs(as_pil, size=32, seed=5):
    """A random picture and a mask repainting a soft-edged square (the 0.5 threshold matters)."""
    image = torch.rand(1, 3, size, size, generator=_gen(seed))
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((xx - size / 2).abs().maximum((yy - size / 2).abs()) < size / 4).float()
    mask = (mask + 0.3 * torch.rand(size, size, generator=_gen(seed + 1))).clamp(0, 1)
    if not as_pil:
        return image, mask[None, None]
    from PIL import Image

    pil = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    return pil, Image.fromarray((mask.numpy() * 255).astype(np.uint8), mode="L")


def _both(theirs, ours, gen=_gen, **kw):
    a = theirs(generator=gen(), output_type="np", **kw).images
    b = ours(generator=gen(), output_type="np", **kw).images
    assert a.shape == b.shape
    return max_diff(a, b)


def test_uses_diffkern_modules(pair):
    _, ours = pair
    assert type(ours.unet).__module__.startswith("diffkern.") and ours.unet.config.in_channels == 9


@pytest.mark.parametrize("as_pil", [False, True])
@pytest.mark.parametrize("strength", [1.0, 0.75])
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_inpaint_matches_diffusers(pair, as_pil, strength, guidance_scale):
    theirs, ours = pair
    image, mask = _inputs(as_pil)
    kw = dict(prompt=PROMPT, image=image, mask_image=mask, strength=strength, guidance_scale=guidance_scale,
              num_inference_steps=3, height=32, width=32)
    assert _both(theirs, ours, **kw) < TOL


def test_resize_batches_eta_and_generator_lists(pair):
    """Images and masks of other sizes (resized to 32), two prompts x two images each, DDIM eta > 0,
    one generator per image: every draw (two posterior samples, x_T, step noise) lines up."""
    theirs, ours = pair
    image, _ = _inputs(True, size=40)
    _, mask = _inputs(True, size=48, seed=7)
    kw = dict(prompt=[PROMPT, "a blue dog"], negative_prompt=["a photo", "red"], image=image, mask_image=mask,
              strength=0.75, num_inference_steps=3, num_images_per_prompt=2, eta=0.7, height=32, width=32)
    assert _both(theirs, ours, **kw) < TOL
    assert _both(theirs, ours, gen=lambda: [_gen(i) for i in range(4)], **kw) < TOL


def test_one_mask_per_image_and_ddpm(comps):
    ours = StableDiffusionInpaintPipeline(**diffkern_modules(**comps),
                                          scheduler=schedulers.DDPMScheduler.from_config(SD_SCHEDULER_CONFIG))
    ours.set_progress_bar_config(disable=True)
    images = torch.rand(2, 3, 32, 32, generator=_gen(2))
    masks = (torch.rand(2, 32, 32, generator=_gen(3)) > 0.5).float()  # (B, H, W): diffusers adds the channel
    kw = dict(prompt=[PROMPT, "a dog"], image=images, mask_image=masks, num_inference_steps=3, height=32,
              width=32)
    assert _both(_diffusers_pipe(comps, "ddpm"), ours, **kw) < TOL


def test_prompt_embeds_match_diffusers(pair):
    theirs, ours = pair
    image, mask = _inputs(False)
    embeds = torch.randn(2, 77, 32, generator=_gen(8))
    kw = dict(image=image, mask_image=mask, num_inference_steps=2, height=32, width=32,
              num_images_per_prompt=2)
    assert _both(theirs, ours, prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], **kw) < TOL
    assert _both(theirs, ours, prompt_embeds=embeds, strength=0.75, **kw) < TOL  # negative: "" encoded


def test_given_latents_match_diffusers(pair):
    theirs, ours = pair
    image, mask = _inputs(False)
    latents = torch.randn(1, 4, 16, 16, generator=_gen(4))
    kw = dict(prompt=PROMPT, image=image, mask_image=mask, num_inference_steps=2, height=32, width=32,
              latents=latents)
    assert _both(theirs, ours, **kw) < TOL


@pytest.mark.parametrize("form", ["pil", "hw_array", "hw1_array", "hw_tensor", "b1hw_tensor"])
def test_mask_forms_agree_with_diffusers_mask_processor(form):
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    m = torch.rand(24, 40, generator=_gen(9))
    mask = {"pil": Image.fromarray((m.numpy() * 255).astype(np.uint8)).convert("RGB"),
            "hw_array": m.numpy(), "hw1_array": m.numpy()[..., None], "hw_tensor": m,
            "b1hw_tensor": m[None, None]}[form]
    ours = preprocess_mask(mask, 16, 32)
    theirs = processor.preprocess(mask, height=16, width=32)
    assert ours.shape == theirs.shape == (1, 1, 16, 32)
    assert torch.equal(ours, theirs.float())


def test_bad_arguments_name_themselves(pair, comps):
    _, ours = pair
    image, mask = _inputs(False)
    kw = dict(num_inference_steps=1, height=32, width=32)
    with pytest.raises(ValueError, match="mask_image.*one channel"):
        ours(PROMPT, image, torch.rand(1, 3, 32, 32), **kw)
    with pytest.raises(ValueError, match="mask_image: 3 masks for 2 images"):
        ours(PROMPT, torch.rand(2, 3, 32, 32), torch.rand(3, 1, 32, 32), **kw)
    with pytest.raises(ValueError, match="image: 3 cannot be spread over 2"):
        ours([PROMPT, "a cat"], torch.rand(3, 3, 32, 32), mask, **kw)
    with pytest.raises(ValueError, match="mask_image"):
        ours(PROMPT, image, None, **kw)
    with pytest.raises(ValueError, match="strength"):
        ours(PROMPT, image, mask, strength=1.2, **kw)
    with pytest.raises(ValueError, match="latents"):
        ours(PROMPT, image, mask, latents=torch.zeros(1, 9, 16, 16), **kw)
    with pytest.raises(ValueError, match="prompt, prompt_embeds"):
        ours(PROMPT, image, mask, prompt_embeds=torch.zeros(1, 77, 32), **kw)
    plain = diffkern_modules(**{**comps, "unet": tiny_unet()})
    ddim = schedulers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="unet: an inpainting UNet takes 9 input channels.*inpainting check"):
        StableDiffusionInpaintPipeline(**plain, scheduler=ddim)


def test_load_pipeline_picks_inpaint(pair, tmp_path):
    theirs, fresh = pair
    theirs.save_pretrained(tmp_path / "inpaint")
    ours = load_pipeline(tmp_path / "inpaint", inpaint=True)
    assert isinstance(ours, StableDiffusionInpaintPipeline)
    assert type(ours.unet).__module__.startswith("diffkern.")
    ours.set_progress_bar_config(disable=True)
    image, mask = _inputs(False)
    kw = dict(prompt=PROMPT, image=image, mask_image=mask, num_inference_steps=2, height=32, width=32,
              output_type="np")
    assert max_diff(ours(generator=_gen(), **kw).images, fresh(generator=_gen(), **kw).images) == 0
    with pytest.raises(ValueError, match="inpaint=True"):
        load_pipeline(tmp_path / "inpaint")
    with pytest.raises(ValueError, match="img2img, inpaint"):
        load_pipeline(tmp_path / "inpaint", img2img=True, inpaint=True)
