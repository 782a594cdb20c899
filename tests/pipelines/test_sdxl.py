"""diffkern's SDXL pipelines (text-to-image, image-to-image / refiner, inpainting, the base -> refiner
hand-off) against diffusers' pipelines of the same name on tiny random components: same images."""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkern.pipelines import (  # noqa: E402
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from tests.models._helpers import randomise  # noqa: E402

from . import SD_SCHEDULER_CONFIG, clip_tokenizer, max_diff, tiny_vae  # noqa: E402

POOLED, TIME_DIM, WIDTH = 16, 8, 12


def _unet(time_ids, in_channels=4, seed=2, cross=2 * WIDTH):
    # SDXL's layout shrunk: no attention at the top level, per-level heads and depths, linear projections.
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        in_channels=in_channels, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=cross, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + time_ids * TIME_DIM)
    return randomise(unet, seed)


def _encoders(tok):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=WIDTH,
                         intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=len(tok), max_position_embeddings=77, projection_dim=POOLED,
                         hidden_act="gelu")
    torch.manual_seed(0)
    return CLIPTextModel(cfg).eval(), CLIPTextModelWithProjection(cfg).eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tok = clip_tokenizer(tmp_path_factory.mktemp("tok"))
    enc1, enc2 = _encoders(tok)
    return dict(vae=tiny_vae(), text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok,
                scheduler=diffusers.EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG))


def _pair(cls, diffusers_cls, **components):
    theirs = diffusers_cls(**components)
    theirs.set_progress_bar_config(disable=True)
    ours = cls.from_diffusers_pipeline(theirs)
    return theirs, ours


def _same(theirs, ours, tol=1e-4, **args):
    want = theirs(**args, generator=torch.Generator().manual_seed(0)).images
    got = ours(**args, generator=torch.Generator().manual_seed(0)).images
    want, got = np.asarray(want), np.asarray(got)
    assert want.std() > 1e-2  # not a constant image: the comparison means something
    assert max_diff(got, want) < tol
    return got


def _diffkern_parts(pipe):
    return {k: type(v).__module__.split(".")[0] for k, v in pipe.components.items()
            if k in ("unet", "vae", "scheduler")}


def _image(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g)


def test_text_to_image_matches_diffusers(parts):
    theirs, ours = _pair(StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline, unet=_unet(6),
                         **parts)
    assert _diffkern_parts(ours) == {"unet": "diffkern", "vae": "diffkern", "scheduler": "diffkern"}
    # both prompts, a negative prompt, two images per prompt, and micro-conditioning ids off their defaults
    _same(theirs, ours, prompt="a photo of a cat", prompt_2="a red dog", negative_prompt="blue",
          num_inference_steps=2, height=32, width=32, guidance_scale=5.0, output_type="np",
          num_images_per_prompt=2, original_size=(64, 48), crops_coords_top_left=(4, 8),
          negative_original_size=(32, 32))


def test_base_to_refiner_hand_off_matches_diffusers(parts):
    base_theirs, base = _pair(StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline, unet=_unet(6),
                              **parts)
    refiner_parts = dict(parts, text_encoder=None, tokenizer=None, requires_aesthetics_score=True)
    ref_theirs, refiner = _pair(StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline,
                                unet=_unet(5, seed=3, cross=WIDTH), **refiner_parts)
    assert refiner.config.requires_aesthetics_score
    args = dict(prompt="an astronaut on the moon", num_inference_steps=4, height=32, width=32)
    lat_t = base_theirs(**args, denoising_end=0.6, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images
    lat_o = base(**args, denoising_end=0.6, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    assert max_diff(lat_o, lat_t) < 1e-5 * lat_t.abs().max().item()  # latents of ~30 at random weights
    ref_args = dict(prompt=args["prompt"], num_inference_steps=4, denoising_start=0.6, output_type="np",
                    aesthetic_score=7.0, negative_aesthetic_score=2.0)
    want = ref_theirs(image=lat_t, **ref_args, generator=torch.Generator().manual_seed(1)).images
    got = refiner(image=lat_o, **ref_args, generator=torch.Generator().manual_seed(1)).images
    assert want.std() > 1e-2 and max_diff(got, want) < 1e-4


def test_image_to_image_matches_diffusers(parts):
    theirs, ours = _pair(StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline,
                         unet=_unet(6), **parts)
    _same(theirs, ours, prompt="a painting of a dog", image=_image(), strength=0.7, num_inference_steps=2,
          output_type="np")


@pytest.mark.parametrize("channels", [4, 9])
def test_inpainting_matches_diffusers(parts, channels):
    theirs, ours = _pair(StableDiffusionXLInpaintPipeline, diffusers.StableDiffusionXLInpaintPipeline,
                         unet=_unet(6, in_channels=channels), **parts)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 4:20] = 1
    _same(theirs, ours, prompt="a cat", image=_image(1), mask_image=mask, strength=0.9, num_inference_steps=2,
          output_type="np", height=32, width=32)


def test_from_pretrained_loads_diffkern_components(parts, tmp_path):
    theirs = diffusers.StableDiffusionXLPipeline(unet=_unet(6), **parts)
    theirs.set_progress_bar_config(disable=True)
    theirs.save_pretrained(tmp_path)
    ours = StableDiffusionXLPipeline.from_pretrained(tmp_path)
    assert _diffkern_parts(ours) == {"unet": "diffkern", "vae": "diffkern", "scheduler": "diffkern"}
    assert type(ours.scheduler).__name__ == "EulerDiscreteScheduler"
    assert type(ours.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    ours.set_progress_bar_config(disable=True)
    _same(theirs, ours, prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="np")
    # and the diffkern pipeline's load_pipeline table picks it from the folder
    from diffkern.pipelines import load_pipeline

    assert type(load_pipeline(tmp_path)) is StableDiffusionXLPipeline
    other = load_pipeline(tmp_path, img2img=True, scheduler="dpm++2m_karras")
    assert type(other) is StableDiffusionXLImg2ImgPipeline
    assert type(other.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert other.scheduler.config.use_karras_sigmas
    assert other.scheduler.__module__.startswith("diffkern")
