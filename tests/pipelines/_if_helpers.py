"""Tiny random DeepFloyd IF components, built offline: a T5 tokenizer made with `tokenizers`, a
2-layer T5 encoder from a T5Config, diffusers IF UNets at the sizes of diffusers' own IF tests,
and IF's scheduler configs."""

from __future__ import annotations

import torch

from tests.pipelines import LETTERS, WORDS

T5_WIDTH = 24

# IF-I-XL / IF-II-L scheduler configs (as released), and the noising scheduler of stage II.
IF_I_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                      beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
                      clip_sample=True, clip_sample_range=1.0, prediction_type="epsilon",
                      variance_type="learned_range")
IF_II_SCHEDULER = dict(IF_I_SCHEDULER, sample_max_value=1.0)
NOISING_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                         beta_end=0.02)


def t5_tokenizer(folder=None):
    """A T5 tokenizer (Unigram, "</s>" appended, "<pad>" = 0) knowing WORDS and single letters; saved
    to `folder` when given, so AutoTokenizer.from_pretrained(folder) loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -3.0) for c in LETTERS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    t = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                        extra_ids=0, model_max_length=77)
    if folder is not None:
        t.save_pretrained(str(folder))
    return t


def tiny_t5(seed=0, vocab_size=64):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                   eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _if_unet(seed, **kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=[8, 16], down_block_types=["ResnetDownsampleBlock2D",
                                                                      "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], out_channels=6,
        cross_attention_dim=32, encoder_hid_dim=T5_WIDTH, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=4, **kw)
    with torch.no_grad():  # default init zeroes the output convs; perturb so every weight matters
        gen = torch.Generator().manual_seed(seed)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return unet.eval()


def tiny_if_unet(seed=0):
    """Stage I shape: 3 -> 6 channels (eps + learned-range variance), text pooling, added-KV attention."""
    return _if_unet(seed, layers_per_block=1, in_channels=3)


def tiny_if_sr_unet(seed=1):
    """Stage II shape: 6 input channels (image + noised upscale), the noise level as a timestep class
    embedding, per-level layers, GELU time embedding, mid-block scale 1.414 (as IF-II)."""
    return _if_unet(seed, layers_per_block=[1, 2], in_channels=6, class_embed_type="timestep",
                    mid_block_scale_factor=1.414, time_embedding_act_fn="gelu", time_embedding_dim=32)


def diffusers_ddpm(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**config)


def if_unet_for_ours(unet):
    """diffkern's UNet converted from the diffusers IF UNet (same weights): what the diffkern
    pipelines run in these tests."""
    from diffkern.models import from_diffusers

    return from_diffusers(unet)


def uses_diffkern_unet(pipe):
    return type(pipe.unet).__module__.startswith("diffkern.")


# stabilityai/stable-diffusion-x4-upscaler's schedulers (DDIM v-prediction; the low-res noising DDPM).
X4_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
X4_LOW_RES_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                            beta_schedule="scaled_linear")


def tiny_x4_unet(seed=2, cross_attention_dim=32):
    """The x4 upscaler's shape: 4 latent + 3 image channels in, class embeddings for the noise level,
    linear projections, cross-attention only on the first level (as the released one)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=7, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        norm_num_groups=4, attention_head_dim=2, use_linear_projection=True, num_class_embeds=351).eval()


def tiny_x4_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4,
                         norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
                         scaling_factor=0.08333).eval()


def ddim(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**config)
