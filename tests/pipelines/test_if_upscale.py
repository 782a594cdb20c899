"""StableDiffusionUpscalePipeline (IF's stage III) against diffusers' on tiny random components."""

import pytest
import torch

from diffkern.models import from_diffusers
from diffkern.pipelines import StableDiffusionUpscalePipeline
from tests.pipelines import clip_tokenizer, max_diff, tiny_clip
from tests.pipelines._if_helpers import (
    X4_LOW_RES_SCHEDULER,
    X4_SCHEDULER,
    ddim,
    diffusers_ddpm,
    if_unet_for_ours,
    tiny_x4_unet,
    tiny_x4_vae,
)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
# diffusers deprecates [-1, 1] tensors (what IF stage II hands over) but still takes them as they are
pytestmark = pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor:FutureWarning")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tok = clip_tokenizer(tmp_path_factory.mktemp("tok"))
    text, unet, vae = tiny_clip(), tiny_x4_unet(), tiny_x4_vae()
    theirs = diffusers.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
        low_res_scheduler=diffusers_ddpm(X4_LOW_RES_SCHEDULER), scheduler=ddim(X4_SCHEDULER),
        safety_checker=None, feature_extractor=None, watermarker=None)
    ours = StableDiffusionUpscalePipeline(from_diffusers(vae), text, tok, if_unet_for_ours(unet),
                                          diffusers_ddpm(X4_LOW_RES_SCHEDULER), ddim(X4_SCHEDULER))
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    return theirs, ours


@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=3),
    dict(num_inference_steps=2, guidance_scale=1.0, noise_level=350),
    dict(num_inference_steps=2, num_images_per_prompt=2, negative_prompt=["a dog", "blue"], noise_level=100),
], ids=["guided", "unguided", "per-prompt"])
def test_upscale_matches_diffusers(pair, kw):
    theirs, ours = pair
    low = torch.rand(2, 3, 8, 8, generator=_gen(4)) * 2 - 1  # IF stage II's raw output range
    a = theirs(["a red cat", "the moon"], image=low, generator=_gen(), output_type="np", **kw).images
    b = ours(["a red cat", "the moon"], image=low, generator=_gen(), output_type="np", **kw).images
    assert a.shape == b.shape == (2 * kw.get("num_images_per_prompt", 1), 16, 16, 3)
    assert max_diff(a, b) < TOL


def test_bad_inputs(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="noise_level"):
        ours("a cat", image=torch.zeros(1, 3, 8, 8), noise_level=351)
    with pytest.raises(ValueError, match="image: required"):
        ours("a cat")
    with pytest.raises(ValueError, match="image: got 2 images for 1 prompts"):
        ours("a cat", image=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="prompt_embeds"):
        ours(prompt_embeds=torch.zeros(1, 77, 16), image=torch.zeros(1, 3, 8, 8))
