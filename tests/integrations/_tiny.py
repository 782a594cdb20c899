"""Tiny random-weight diffusers pipelines, built offline, for patched-vs-unpatched parity tests.

Sizes follow diffusers' own pipeline tests, shrunk further (8/16 channels, 8-32 pixels) so that a
pipeline call takes well under a second on CPU. Tokenizers and CLIP text encoders come from
tests/pipelines (a few-word vocabulary written to a folder); IF's T5 is a tiny T5EncoderModel whose
output is passed as prompt_embeds (no sentencepiece vocabulary is needed offline).
"""

from __future__ import annotations

import torch

from tests.pipelines import (
    SD_SCHEDULER_CONFIG,
    clip_tokenizer,
    tiny_clip,
    tiny_inpaint_unet,
    tiny_unet,
    tiny_vae,
)

_SD_EXTRA = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sd_parts(tmp_path):
    """VAE, CLIP text encoder and tokenizer of the SD pipelines, and no safety checker."""
    return dict(vae=tiny_vae(), text_encoder=tiny_clip(), tokenizer=clip_tokenizer(tmp_path / "tok"),
                **_SD_EXTRA)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd(tmp_path, v2=False):
    """SD 1.x (PNDM, epsilon) or 2.x-style (linear projections, DDIM v-prediction)."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    if v2:
        sched = DDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    else:
        sched = PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)
    return _quiet(StableDiffusionPipeline(unet=tiny_unet(v2=v2), scheduler=sched, **_sd_parts(tmp_path)))


def sd_img2img(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    return _quiet(StableDiffusionImg2ImgPipeline(
        unet=tiny_unet(), scheduler=DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), **_sd_parts(tmp_path)))


def sd_inpaint(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    return _quiet(StableDiffusionInpaintPipeline(
        unet=tiny_inpaint_unet(), scheduler=DDIMScheduler.from_config(SD_SCHEDULER_CONFIG),
        **_sd_parts(tmp_path)))


def sd_controlnet(tmp_path):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    torch.manual_seed(1)
    controlnet = ControlNetModel(
        block_out_channels=(8, 16), layers_per_block=1, in_channels=4, cross_attention_dim=32,
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2,
        conditioning_embedding_out_channels=(4, 8)).eval()
    return _quiet(StableDiffusionControlNetPipeline(
        unet=tiny_unet(), controlnet=controlnet, scheduler=DDIMScheduler.from_config(SD_SCHEDULER_CONFIG),
        **_sd_parts(tmp_path)))


def sdxl(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the 32-wide pooled text embedding
        cross_attention_dim=64, norm_num_groups=4).eval()
    torch.manual_seed(1)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=128, projection_dim=32,
                         max_position_embeddings=77)
    text_encoder_2 = CLIPTextModelWithProjection(cfg).eval()
    sched = EulerDiscreteScheduler.from_config(
        {**SD_SCHEDULER_CONFIG, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading"})
    tok = clip_tokenizer(tmp_path / "tok")
    return _quiet(StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(), text_encoder_2=text_encoder_2, tokenizer=tok,
        tokenizer_2=tok, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True))


def _if_unet(in_channels, act_fn, sample_size, super_res=False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    extra = dict(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
                 time_embedding_dim=32) if super_res else {}
    return UNet2DConditionModel(
        sample_size=sample_size, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=in_channels, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32,
        attention_head_dim=4, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn=act_fn, **extra).eval()


def t5_embeds(batch=1, seq=7, seed=3):
    """Prompt embeddings of a tiny T5 encoder (T5Config), for IF's prompt_embeds."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    t5 = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        return t5(torch.randint(0, 64, (batch, seq))).last_hidden_state


def _if_extra():
    return dict(tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None,
                watermarker=None, requires_safety_checker=False)


def if_stage1(act_fn="gelu"):
    """IF stage I (gelu resnets, as the release: its norm sites stay diffusers')."""
    from diffusers import DDPMScheduler, IFPipeline

    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                          dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon")
    return _quiet(IFPipeline(unet=_if_unet(3, act_fn, 8), scheduler=sched, **_if_extra()))


def if_super_resolution(act_fn="silu"):
    """IF stage II with SiLU resnets, so the added-KV attention and the scale-shift norm sites both run."""
    from diffusers import DDPMScheduler, IFSuperResolutionPipeline

    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                          dynamic_thresholding_ratio=0.95, sample_max_value=1.0)
    noising = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    return _quiet(IFSuperResolutionPipeline(unet=_if_unet(6, act_fn, 16, super_res=True), scheduler=sched,
                                            image_noising_scheduler=noising, **_if_extra()))


def _unclip_parts(tmp_path):
    from diffusers import UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(4)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=128, projection_dim=32,
                         max_position_embeddings=77)
    text_encoder = CLIPTextModelWithProjection(cfg).eval()
    torch.manual_seed(5)
    text_proj = UnCLIPTextProjModel(clip_embeddings_dim=32, time_embed_dim=32, cross_attention_dim=16,
                                    clip_extra_context_tokens=2).eval()
    torch.manual_seed(6)
    decoder = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=16, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity").eval()
    supers = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        supers.append(UNet2DModel(
            sample_size=16, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4, in_channels=6,
            out_channels=3, down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
            up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D")).eval())
    return dict(
        decoder=decoder, text_encoder=text_encoder, tokenizer=clip_tokenizer(tmp_path / "tok"),
        text_proj=text_proj, super_res_first=supers[0], super_res_last=supers[1],
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))


def unclip(tmp_path):
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler

    parts = _unclip_parts(tmp_path)
    torch.manual_seed(9)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, embedding_dim=32,
                             num_layers=1).eval()
    prior_scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                      num_train_timesteps=1000, clip_sample_range=5.0)
    return _quiet(UnCLIPPipeline(prior=prior, prior_scheduler=prior_scheduler, **parts))


def unclip_image_variation(tmp_path):
    from diffusers import UnCLIPImageVariationPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    parts = _unclip_parts(tmp_path)
    torch.manual_seed(10)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=16,
        intermediate_size=37, patch_size=4)).eval()
    return _quiet(UnCLIPImageVariationPipeline(image_encoder=image_encoder, feature_extractor=None, **parts))
