"""UNet2DConditionModel as the SDXL UNet: "text_time" added conditioning (pooled text embeds + sinusoids of
the size/crop ids), per-level and per-layer transformer depths; against diffusers, and inside diffusers'
StableDiffusionXLPipeline."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkern.models import UNet2DConditionModel, from_diffusers  # noqa: E402

from ._helpers import BACKENDS, backend_context, check_backends, max_diff, randomise  # noqa: E402

TOL = 1e-4


def _not_saturated(images, low=0.0, high=1.0):
    """Most values inside (low, high): at random weights a pipeline's output can clamp everywhere, and
    a parity check on clamped pixels would prove nothing."""
    t = torch.as_tensor(images)
    margin = 0.01 * (high - low)
    assert ((t > low + margin) & (t < high - margin)).double().mean() > 0.5


POOLED, TIME_DIM = 20, 8  # text_embeds width; addition_time_embed_dim (6 time ids -> 48)

# stabilityai/stable-diffusion-xl-base-1.0 shrunk: no attention at the top level, depths 1/2/10 -> 1/2/3,
# linear projections, per-level heads.
SDXL = dict(sample_size=8, block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
            cross_attention_dim=24, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
CONFIGS = {
    "sdxl": SDXL,
    # Asymmetric depths, per layer (diffusers needs reverse_transformer_layers_per_block then).
    "per-layer": dict(SDXL, transformer_layers_per_block=(1, (1,), (2,)),
                      reverse_transformer_layers_per_block=((3, 1), (1, 2), (1, 1))),
}


def _pair(name, seed=0):
    torch.manual_seed(seed)
    theirs = randomise(diffusers.UNet2DConditionModel(**CONFIGS[name]), seed)
    return theirs, from_diffusers(theirs)


def _inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    ctx = torch.randn(batch, 7, 24, generator=g)
    added = {"text_embeds": torch.randn(batch, POOLED, generator=g),
             # (original size, crop top-left, target size) per sample, as SDXL pipelines build them
             "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],
                                       [768.0, 512.0, 16.0, 8.0, 1024.0, 1024.0]])}
    return x, ctx, added


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name, backend, used_backends):
    theirs, ours = _pair(name)
    x, ctx, added = _inputs()
    with torch.no_grad():
        want = theirs(x, torch.tensor([999, 17]), ctx, added_cond_kwargs=added).sample
        with backend_context(backend):
            got = ours(x, torch.tensor([999, 17]), ctx, added_cond_kwargs=added).sample
    assert max_diff(got, want) < TOL
    check_backends(used_backends, backend)


def test_time_ids_matter_and_are_required():
    _, ours = _pair("sdxl")
    x, ctx, added = _inputs()
    with torch.no_grad():
        a = ours(x, 5, ctx, added_cond_kwargs=added).sample
        b = ours(x, 5, ctx, added_cond_kwargs={**added, "time_ids": added["time_ids"].flip(0)}).sample
    assert max_diff(a, b) > 1e-4
    with pytest.raises(ValueError, match="time_ids"):
        ours(x, 5, ctx, added_cond_kwargs={"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match="text_embeds"):
        ours(x, 5, ctx)


def test_depths_and_layout_are_diffusers():
    for name in CONFIGS:
        with torch.device("meta"):
            theirs, ours = diffusers.UNet2DConditionModel(**CONFIGS[name]), UNet2DConditionModel(**CONFIGS[name])
        assert ({k: v.shape for k, v in ours.state_dict().items()}
                == {k: v.shape for k, v in theirs.state_dict().items()})
    ours = UNet2DConditionModel(**SDXL)
    assert [len(a.transformer_blocks) for a in ours.down_blocks[2].attentions] == [3]
    assert [len(a.transformer_blocks) for a in ours.up_blocks[0].attentions] == [3, 3]
    assert ours.add_embedding.linear_1.in_features == POOLED + 6 * TIME_DIM  # what SDXL pipelines read


def test_per_layer_depths_need_the_reverse_list():
    with pytest.raises(ValueError, match="reverse_transformer_layers_per_block"):
        UNet2DConditionModel(**dict(SDXL, transformer_layers_per_block=(1, (1,), (2,))))


# The released SDXL base UNet at full size on the meta device: 2,567,463,684 parameters, as diffusers'.
SDXL_BASE = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def test_sdxl_base_parameter_count_matches_diffusers():
    with torch.device("meta"):
        ours, theirs = UNet2DConditionModel(**SDXL_BASE), diffusers.UNet2DConditionModel(**SDXL_BASE)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 2_567_463_684


def test_in_a_diffusers_sdxl_pipeline_gives_the_same_images(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.pipelines import SD_SCHEDULER_CONFIG, clip_tokenizer, tiny_vae

    tok = clip_tokenizer(tmp_path / "tok")
    text_cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=12, intermediate_size=37,
                              num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tok),
                              max_position_embeddings=77, projection_dim=POOLED)
    torch.manual_seed(0)
    enc1, enc2 = CLIPTextModel(text_cfg).eval(), CLIPTextModelWithProjection(text_cfg).eval()
    unet = randomise(diffusers.UNet2DConditionModel(**dict(SDXL, cross_attention_dim=24)), 2)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a photo of a cat", num_inference_steps=3, height=32, width=32, output_type="np")
    want = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    _not_saturated(want)
    pipe.unet = from_diffusers(pipe.unet)
    got = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    assert max_diff(torch.from_numpy(got), torch.from_numpy(want)) < 1e-4
