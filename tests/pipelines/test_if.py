"""DeepFloyd IF stage I / stage II against diffusers' IFPipeline / IFSuperResolutionPipeline.

Both sides get the same tiny random components (T5 from a T5Config, a tokenizer built with
`tokenizers`, IF-shaped UNets), the same scheduler configs (IF's learned-range variance and dynamic
thresholding) and the same seed; the images must agree to 1e-3 (fp32).
"""

import sys
import types

import numpy as np
import pytest
import torch

from diffkern.pipelines import IFPipeline, IFSuperResolutionPipeline
from diffkern.pipelines.if_timesteps import TIMESTEPS
from tests.pipelines import max_diff
from tests.pipelines._if_helpers import (
    IF_I_SCHEDULER,
    IF_II_SCHEDULER,
    NOISING_SCHEDULER,
    T5_WIDTH,
    diffusers_ddpm,
    if_unet_for_ours,
    t5_tokenizer,
    tiny_if_sr_unet,
    tiny_if_unet,
    tiny_t5,
)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
PROMPTS = ["a photo of a red cat", "the moon"]
NO_SAFETY = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def parts():
    return dict(tokenizer=t5_tokenizer(), text_encoder=tiny_t5(), unet1=tiny_if_unet(),
                unet2=tiny_if_sr_unet())


def _stage1(parts, config=IF_I_SCHEDULER):
    theirs = diffusers.IFPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                                  unet=parts["unet1"], scheduler=diffusers_ddpm(config), **NO_SAFETY)
    ours = IFPipeline(parts["tokenizer"], parts["text_encoder"], if_unet_for_ours(parts["unet1"]),
                      diffusers_ddpm(config), **NO_SAFETY)
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    return theirs, ours


def _stage2(parts):
    kw = dict(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
              scheduler=diffusers_ddpm(IF_II_SCHEDULER),
              image_noising_scheduler=diffusers_ddpm(NOISING_SCHEDULER))
    theirs = diffusers.IFSuperResolutionPipeline(unet=parts["unet2"], **kw, **NO_SAFETY)
    ours = IFSuperResolutionPipeline(unet=if_unet_for_ours(parts["unet2"]), **kw, **NO_SAFETY)
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    return theirs, ours


def _both(theirs, ours, output_type="pt", **kw):
    a = theirs(generator=_gen(), output_type=output_type, **kw).images
    b = ours(generator=_gen(), output_type=output_type, **kw).images
    if output_type == "pil":
        a, b = np.stack([np.asarray(i) for i in a]), np.stack([np.asarray(i) for i in b])
        return np.abs(a.astype(int) - b.astype(int)).max()
    assert tuple(a.shape) == tuple(b.shape)
    return max_diff(a, b)


@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=4),
    dict(num_inference_steps=3, guidance_scale=1.0),
    dict(timesteps=[999, 700, 300, 0], num_images_per_prompt=2, negative_prompt=["a dog", "blue"]),
], ids=["guided", "unguided", "custom-timesteps"])
def test_stage1_matches_diffusers(parts, kw):
    theirs, ours = _stage1(parts)
    assert _both(theirs, ours, prompt=PROMPTS, **kw) < TOL


def test_stage1_named_timesteps_and_output_types(parts):
    theirs, ours = _stage1(parts)
    a = theirs("a cat", generator=_gen(), timesteps=TIMESTEPS["fast27"], output_type="np").images
    b = ours("a cat", generator=_gen(), timesteps="fast27", output_type="np").images
    assert a.shape == (1, 16, 16, 3) and max_diff(a, b) < TOL
    assert _both(theirs, ours, "pil", prompt="a cat", num_inference_steps=2) <= 1  # uint8 rounding


def test_stage1_fixed_variance_scheduler(parts):
    """A scheduler without learned range reads the eps channels only (diffusers splits them off)."""
    config = dict(IF_I_SCHEDULER, variance_type="fixed_small", thresholding=False)
    theirs, ours = _stage1(parts, config)
    assert _both(theirs, ours, prompt=PROMPTS, num_inference_steps=3) < TOL


def test_stage1_prompt_embeds(parts):
    theirs, ours = _stage1(parts)
    pe, ne = ours.encode_prompt(PROMPTS, True)
    pe_d, ne_d = theirs.encode_prompt(PROMPTS, True)
    assert pe.shape == (2, 77, T5_WIDTH) and max_diff(pe, pe_d) < 1e-6 and max_diff(ne, ne_d) < 1e-6
    a = theirs(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=3, generator=_gen(),
               output_type="pt").images
    b = ours(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=3, generator=_gen(),
             output_type="pt").images
    assert max_diff(a, b) < TOL


@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=3),
    dict(timesteps=[999, 500, 0], noise_level=100, num_images_per_prompt=2),
    dict(num_inference_steps=2, guidance_scale=1.0, noise_level=0),
], ids=["guided", "custom-timesteps", "unguided"])
def test_stage2_matches_diffusers(parts, kw):
    theirs, ours = _stage2(parts)
    low = torch.rand(2, 3, 8, 8, generator=_gen(3)) * 2 - 1
    assert _both(theirs, ours, "np", prompt=PROMPTS, image=low, **kw) < TOL


def test_stage2_low_res_noise_per_call_as_deepfloyd(parts):
    """low_res_noise="per_call" (IF's SuperResUNetModel): every UNet call sees the upscaled image noised afresh,
    with different noise for the two guidance halves; "once" (default) is diffusers' single draw."""
    import torch.nn.functional as F

    _, ours = _stage2(parts)
    low = torch.rand(1, 3, 8, 8, generator=_gen(3)) * 2 - 1
    seen = []
    hook = ours.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 3:].clone()))
    try:
        for mode in ("once", "per_call"):
            seen.clear()
            ours(prompt="a cat", image=low, num_inference_steps=3, noise_level=250, generator=_gen(),
                 output_type="pt", low_res_noise=mode)
            calls = list(seen)
            assert len(calls) == 3 and all(c.shape[0] == 2 for c in calls)  # guided: [uncond; cond]
            clean = F.interpolate(low, calls[0].shape[2:], mode="bilinear", align_corners=True)
            abar = ours.image_noising_scheduler.alphas_cumprod[250].item()
            z = [(c - abar ** 0.5 * clean) / (1 - abar) ** 0.5 for c in calls]  # the noise each row carries
            for zi in z:
                assert abs(zi.mean().item()) < 0.2 and abs(zi.std().item() - 1) < 0.2
            if mode == "once":
                assert all(torch.equal(c, calls[0]) for c in calls) and torch.equal(calls[0][0], calls[0][1])
            else:
                assert not torch.allclose(calls[0][0], calls[0][1])  # the halves: separate noise
                assert not torch.allclose(calls[0], calls[1]) and not torch.allclose(calls[1], calls[2])
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="low_res_noise"):
        ours(prompt="a cat", image=low, num_inference_steps=2, low_res_noise="always")


def test_stage2_pil_input_and_chain(parts):
    """Stage I's output_type="pt" feeds stage II; a PIL low-res image is read as diffusers reads it."""
    _, s1 = _stage1(parts)
    theirs, ours = _stage2(parts)
    low = s1("a red cat", num_inference_steps=2, generator=_gen(), output_type="pt").images
    assert _both(theirs, ours, "np", prompt="a red cat", image=low, num_inference_steps=2) < TOL
    pil = s1("a red cat", num_inference_steps=2, generator=_gen(), output_type="pil").images
    assert _both(theirs, ours, "np", prompt="a red cat", image=pil, num_inference_steps=2) < TOL


def test_bad_inputs(parts):
    _, s1 = _stage1(parts)
    _, s2 = _stage2(parts)
    with pytest.raises(ValueError, match="timesteps: unknown schedule 'smart51'.*smart50"):
        s1("a cat", timesteps="smart51")
    with pytest.raises(ValueError, match="image: required"):
        s2("a cat")
    with pytest.raises(ValueError, match="prompt_embeds: expected width 24"):
        s1(prompt_embeds=torch.zeros(1, 77, 16))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        s1(prompt_embeds=torch.zeros(1, 77, T5_WIDTH), negative_prompt_embeds=torch.zeros(1, 70, T5_WIDTH))
    with pytest.raises(ValueError, match="height"):
        s1("a cat", height=1)
    with pytest.raises(ValueError, match="noise_level"):
        s2("a cat", image=torch.zeros(1, 3, 8, 8), noise_level=1000)
    with pytest.raises(ValueError, match="image: got 2 images for 1 prompts"):
        s2("a cat", image=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="image: expected"):
        s2("a cat", image=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="text_encoder"):
        IFPipeline(parts["tokenizer"], tiny_t5(), tiny_if_unet_wide(), diffusers_ddpm(IF_I_SCHEDULER),
                   **NO_SAFETY)


def tiny_if_unet_wide():
    class Cfg:
        encoder_hid_dim = 40
        cross_attention_dim = 32

    return types.SimpleNamespace(config=Cfg, parameters=lambda: iter([torch.zeros(1)]))


def test_safety_checker_absent_is_reported(parts):
    _, s1 = _stage1(parts)
    out = s1("a cat", num_inference_steps=2, generator=_gen(), output_type="np")
    assert out.nsfw_detected is None and out.watermark_detected is None
    assert any("safety checker" in n for n in s1.notes)


def test_clean_caption_matches_diffusers(monkeypatch):
    """DeepFloyd's caption cleaning, regex for regex: both sides get the same stand-ins for
    BeautifulSoup (strip tags) and ftfy (identity), which are not installed here."""
    import re

    from diffusers.pipelines.deepfloyd_if import pipeline_if

    from diffkern.models.t5 import clean_caption

    class Soup:
        def __init__(self, text, features=None):
            self.text = re.sub(r"<[^>]+>", "", text)

    ftfy = types.SimpleNamespace(fix_text=lambda s: s)
    monkeypatch.setattr(pipeline_if, "BeautifulSoup", Soup, raising=False)
    monkeypatch.setattr(pipeline_if, "ftfy", ftfy, raising=False)
    monkeypatch.setitem(sys.modules, "bs4", types.SimpleNamespace(BeautifulSoup=Soup))
    monkeypatch.setitem(sys.modules, "ftfy", ftfy)
    owner = types.SimpleNamespace(bad_punct_regex=pipeline_if.IFPipeline.bad_punct_regex)
    theirs = pipeline_if.IFPipeline._clean_caption
    captions = ["A <b>photo</b> of https://x.com/cat.jpg @someone #12 “quoted” — free shipping!!",
                "'red_cat-on-the-moon_at-night' 1024x768 page 12 www.site.org 192.168.0.1 jc6640",
                "  Astronaut...   riding *** a horse   ",
                "<person> 漢字 テスト click for more"]
    for c in captions:
        assert clean_caption(c) == theirs(owner, c), c


def test_pipelines_run_diffkern_unets(parts):
    from tests.pipelines._if_helpers import uses_diffkern_unet

    assert uses_diffkern_unet(_stage1(parts)[1]) and uses_diffkern_unet(_stage2(parts)[1])


def test_safety_checker_and_watermarker_are_used_when_present(parts):
    """IF's optional components, by their call contract: the checker blacks out flagged images and
    reports per-image flags; the watermarker gets the PIL images and the sample size."""
    seen = {}

    class Extractor:
        def __call__(self, images, return_tensors=None):
            seen["extractor"] = len(images)
            return types.SimpleNamespace(pixel_values=torch.zeros(len(images), 3, 4, 4))

    def checker(images, clip_input):
        images = images.copy()
        images[0] = np.zeros(images[0].shape)
        return images, [True, False], [False, False]

    class Watermarker:
        def apply_watermark(self, images, sample_size=None):
            seen["watermark"] = (len(images), sample_size)
            return images

    ours = IFPipeline(parts["tokenizer"], parts["text_encoder"], if_unet_for_ours(parts["unet1"]),
                      diffusers_ddpm(IF_I_SCHEDULER), safety_checker=checker, feature_extractor=Extractor(),
                      watermarker=Watermarker())
    ours.set_progress_bar_config(disable=True)
    out = ours(PROMPTS, num_inference_steps=2, generator=_gen(), output_type="np")
    assert out.nsfw_detected == [True, False] and out.watermark_detected == [False, False]
    assert out.images[0].max() == 0 and out.images[1].max() > 0 and seen["extractor"] == 2
    ours(PROMPTS, num_inference_steps=2, generator=_gen(), output_type="pil")
    assert seen["watermark"] == (2, 16)
    with pytest.raises(ValueError, match="feature_extractor"):
        IFPipeline(parts["tokenizer"], parts["text_encoder"], parts["unet1"], diffusers_ddpm(IF_I_SCHEDULER),
                   safety_checker=checker)
