"""Loading diffusers folders of IF-I, IF-II and the x4 upscaler (saved here by diffusers' save_pretrained)."""

import pytest
import torch

from diffkern.pipelines import (
    IFImg2ImgPipeline,
    IFInpaintingPipeline,
    IFPipeline,
    IFSuperResolutionPipeline,
    StableDiffusionUpscalePipeline,
    load_pipeline,
)
from tests.pipelines import clip_tokenizer, max_diff, tiny_clip
from tests.pipelines._if_helpers import (
    IF_I_SCHEDULER,
    IF_II_SCHEDULER,
    NOISING_SCHEDULER,
    X4_LOW_RES_SCHEDULER,
    X4_SCHEDULER,
    ddim,
    diffusers_ddpm,
    t5_tokenizer,
    tiny_if_sr_unet,
    tiny_if_unet,
    tiny_t5,
    tiny_x4_unet,
    tiny_x4_vae,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor:FutureWarning")
NO_SAFETY = dict(safety_checker=None, feature_extractor=None, watermarker=None)


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("if")
    tok, t5 = t5_tokenizer(), tiny_t5()
    pipes = {
        "IF-I": diffusers.IFPipeline(tokenizer=tok, text_encoder=t5, unet=tiny_if_unet(),
                                     scheduler=diffusers_ddpm(IF_I_SCHEDULER), requires_safety_checker=False,
                                     **NO_SAFETY),
        "IF-II": diffusers.IFSuperResolutionPipeline(
            tokenizer=None, text_encoder=None, unet=tiny_if_sr_unet(),
            scheduler=diffusers_ddpm(IF_II_SCHEDULER),
            image_noising_scheduler=diffusers_ddpm(NOISING_SCHEDULER), requires_safety_checker=False,
            **NO_SAFETY),
        "x4": diffusers.StableDiffusionUpscalePipeline(
            vae=tiny_x4_vae(), text_encoder=tiny_clip(), tokenizer=clip_tokenizer(root / "cliptok"),
            unet=tiny_x4_unet(), low_res_scheduler=diffusers_ddpm(X4_LOW_RES_SCHEDULER),
            scheduler=ddim(X4_SCHEDULER), **NO_SAFETY),
    }
    for name, pipe in pipes.items():
        pipe.save_pretrained(root / name)
        pipe.set_progress_bar_config(disable=True)
    return root, pipes


def test_if_folders_load_and_match(folders):
    root, theirs = folders
    s1 = load_pipeline(root / "IF-I")
    s2 = load_pipeline(root / "IF-II")
    s3 = load_pipeline(root / "x4")
    assert type(s1) is IFPipeline and type(s2) is IFSuperResolutionPipeline
    assert type(s3) is StableDiffusionUpscalePipeline
    assert all(type(p.unet).__module__.startswith("diffkern.") for p in (s1, s2, s3))
    assert any("safety" in n for n in s1.notes)
    for p in (s1, s2, s3):
        p.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="pt")
    a = theirs["IF-I"]("a red cat", generator=_gen(), **kw).images
    b = s1("a red cat", generator=_gen(), **kw).images
    assert max_diff(a, b) < 1e-3
    pe, ne = s1.encode_prompt("a red cat")
    a2 = theirs["IF-II"](image=a, prompt_embeds=pe, negative_prompt_embeds=ne, generator=_gen(), **kw).images
    b2 = s2(image=a, prompt_embeds=pe, negative_prompt_embeds=ne, generator=_gen(), **kw).images
    assert max_diff(a2, b2) < 1e-3
    a3 = theirs["x4"]("a red cat", image=a2, generator=_gen(), num_inference_steps=2, output_type="np").images
    b3 = s3("a red cat", image=a2, generator=_gen(), num_inference_steps=2, output_type="np").images
    assert max_diff(a3, b3) < 1e-3


def test_if_folder_variants_and_errors(folders):
    root, _ = folders
    assert type(load_pipeline(root / "IF-I", img2img=True)) is IFImg2ImgPipeline
    assert type(load_pipeline(root / "IF-I", inpaint=True)) is IFInpaintingPipeline
    assert type(load_pipeline(root / "IF-II", img2img=True)).__name__ == "IFImg2ImgSuperResolutionPipeline"
    assert type(load_pipeline(root / "IF-II", inpaint=True)).__name__ == "IFInpaintingSuperResolutionPipeline"
    with pytest.raises(ValueError, match="x4 upscaler"):
        load_pipeline(root / "x4", img2img=True)
    with pytest.raises(ValueError, match="prompt_embeds"):  # IF-II ships no T5
        load_pipeline(root / "IF-II")("a cat", image=torch.zeros(1, 3, 8, 8))
