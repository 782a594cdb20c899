"""IF stage I image-to-image and inpainting against diffusers' IFImg2ImgPipeline / IFInpaintingPipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffkern.pipelines import IFImg2ImgPipeline, IFInpaintingPipeline
from tests.pipelines import max_diff
from tests.pipelines._if_helpers import (IF_I_SCHEDULER, diffusers_ddpm, if_unet_for_ours, t5_tokenizer,
                                         tiny_if_unet, tiny_t5)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
NO_SAFETY = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def parts():
    return dict(tokenizer=t5_tokenizer(), text_encoder=tiny_t5(), unet=tiny_if_unet())


def _pair(parts, inpaint):
    theirs_cls = diffusers.IFInpaintingPipeline if inpaint else diffusers.IFImg2ImgPipeline
    ours_cls = IFInpaintingPipeline if inpaint else IFImg2ImgPipeline
    theirs = theirs_cls(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], unet=parts["unet"],
                        scheduler=diffusers_ddpm(IF_I_SCHEDULER), **NO_SAFETY)
    ours = ours_cls(parts["tokenizer"], parts["text_encoder"], if_unet_for_ours(parts["unet"]),
                    diffusers_ddpm(IF_I_SCHEDULER), **NO_SAFETY)
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    return theirs, ours


def _run(pipe, **kw):
    return pipe(generator=_gen(), output_type="np", **kw).images


@pytest.mark.parametrize("kw", [
    dict(strength=0.7, num_inference_steps=5),
    dict(strength=0.5, timesteps=[999, 800, 600, 400, 200, 0], num_images_per_prompt=2),
    dict(strength=1.0, num_inference_steps=3, guidance_scale=1.0),
], ids=["default", "custom-timesteps", "unguided"])
def test_img2img_matches_diffusers(parts, kw):
    theirs, ours = _pair(parts, inpaint=False)
    image = torch.rand(2, 3, 16, 16, generator=_gen(5)) * 2 - 1
    assert max_diff(_run(theirs, prompt=["a red cat", "the moon"], image=image, **kw),
                    _run(ours, prompt=["a red cat", "the moon"], image=image, **kw)) < TOL


def test_img2img_pil_is_resized_as_diffusers(parts):
    theirs, ours = _pair(parts, inpaint=False)
    pil = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype("uint8"))
    a = _run(theirs, prompt="a cat", image=pil, num_inference_steps=3)
    b = _run(ours, prompt="a cat", image=pil, num_inference_steps=3)
    assert a.shape == b.shape == (1, 16, 24, 3) and max_diff(a, b) < TOL


@pytest.mark.parametrize("mask_kind", ["tensor", "pil"])
def test_inpainting_matches_diffusers(parts, mask_kind):
    theirs, ours = _pair(parts, inpaint=True)
    image = torch.rand(1, 3, 16, 16, generator=_gen(5)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1
    if mask_kind == "pil":
        mask = Image.fromarray((mask[0, 0].numpy() * 255).astype("uint8"))
    kw = dict(prompt="a red cat", image=image, mask_image=mask, num_inference_steps=4,
              num_images_per_prompt=2)
    a, b = _run(theirs, **kw), _run(ours, **kw)
    assert max_diff(a, b) < TOL
    keep = (np.asarray(mask if mask_kind == "tensor" else np.asarray(mask) / 255.0).reshape(16, 16) < 0.5)
    original = ((image[0].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1))
    assert np.abs(b[0][keep] - original[keep]).max() < 1e-5  # unmasked pixels are kept


def test_bad_inputs(parts):
    _, ours = _pair(parts, inpaint=True)
    image = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="mask_image: required"):
        ours("a cat", image=image)
    with pytest.raises(ValueError, match="strength"):
        ours("a cat", image=image, mask_image=torch.ones(1, 1, 16, 16), strength=1.5)
    with pytest.raises(ValueError, match="image: got 2 images for 1 prompts"):
        ours("a cat", image=torch.zeros(2, 3, 16, 16), mask_image=torch.ones(1, 1, 16, 16))


@pytest.fixture(scope="module")
def sr_parts(parts):
    from tests.pipelines._if_helpers import IF_II_SCHEDULER, NOISING_SCHEDULER, tiny_if_sr_unet

    unet = tiny_if_sr_unet()
    kw = dict(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"])
    scheds = lambda: dict(scheduler=diffusers_ddpm(IF_II_SCHEDULER),  # noqa: E731
                          image_noising_scheduler=diffusers_ddpm(NOISING_SCHEDULER))
    pairs = {}
    for name in ("IFImg2ImgSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline"):
        import diffkern.pipelines as P

        theirs = getattr(diffusers, name)(unet=unet, **kw, **scheds(), **NO_SAFETY)
        ours = getattr(P, name)(unet=if_unet_for_ours(unet), **kw, **scheds(), **NO_SAFETY)
        for p in (theirs, ours):
            p.set_progress_bar_config(disable=True)
        pairs[name] = (theirs, ours)
    return pairs


@pytest.mark.parametrize("name, extra", [
    ("IFImg2ImgSuperResolutionPipeline", dict(strength=0.6, num_inference_steps=5, num_images_per_prompt=2)),
    ("IFInpaintingSuperResolutionPipeline", dict(strength=0.8, num_inference_steps=4, noise_level=100)),
])
def test_super_resolution_variants_match_diffusers(sr_parts, name, extra):
    theirs, ours = sr_parts[name]
    low = torch.rand(1, 3, 8, 8, generator=_gen(2)) * 2 - 1
    original = torch.rand(1, 3, 16, 16, generator=_gen(3)) * 2 - 1
    kw = dict(image=low, original_image=original, prompt="a red cat", **extra)
    if "Inpainting" in name:
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., 2:12, 4:14] = 1
        kw["mask_image"] = mask
    assert max_diff(_run(theirs, **kw), _run(ours, **kw)) < TOL
    with pytest.raises(ValueError, match="noise_level"):
        ours(**dict(kw, noise_level=-1))
