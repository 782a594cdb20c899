"""UNet2DConditionModel as a drop-in for diffusers': forward's arguments and outputs, each against
diffusers' model with the same weights, and the model inside a diffusers pipeline."""

import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkern.models import UNet2DConditionModel, from_diffusers  # noqa: E402

from ._helpers import max_diff, randomise  # noqa: E402

TOL = 1e-4


def _not_saturated(images, low=0.0, high=1.0):
    """Most values inside (low, high): at random weights a pipeline's output can clamp everywhere, and
    a parity check on clamped pixels would prove nothing."""
    t = torch.as_tensor(images)
    margin = 0.01 * (high - low)
    assert ((t > low + margin) & (t < high - margin)).double().mean() > 0.5


SD = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
          cross_attention_dim=16, attention_head_dim=2)


def _pair(seed=0, **over):
    torch.manual_seed(seed)
    theirs = randomise(diffusers.UNet2DConditionModel(**{**SD, **over}), seed)
    return theirs, from_diffusers(theirs)


def _inputs(batch=2, tokens=7, in_channels=4, size=(16, 16)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, in_channels, *size, generator=g), torch.randn(batch, tokens, 16, generator=g)


def _both(theirs, ours, *args, **kwargs):
    with torch.no_grad():
        return theirs(*args, **kwargs).sample, ours(*args, **kwargs).sample


def test_output_object_and_return_dict():
    theirs, ours = _pair()
    x, ctx = _inputs()
    with torch.no_grad():
        out = ours(x, 10, ctx)
        tup = ours(x, 10, ctx, return_dict=False)
    assert out.sample is out[0] is out["sample"] and out.to_tuple() == (out.sample,)
    assert list(out.keys()) == ["sample"] and type(out).__name__ == "UNet2DConditionOutput"
    assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], out.sample)


def test_attributes_pipelines_read():
    _, ours = _pair()
    assert ours.in_channels == ours.config.in_channels == 4 and ours.config["sample_size"] == 8
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    with pytest.raises(AttributeError):
        ours.not_a_config_key


def test_controlnet_residuals_match_diffusers():
    theirs, ours = _pair()
    x, ctx = _inputs()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        # One residual per skip: conv_in, level 0 (resnet, downsample), level 1 (resnet).
        shapes = [(2, 16, 16, 16), (2, 16, 16, 16), (2, 16, 8, 8), (2, 32, 8, 8)]
        down = [torch.randn(s, generator=g) for s in shapes]
        mid = torch.randn(2, 32, 8, 8, generator=g)
    want, got = _both(theirs, ours, x, 10, ctx, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid)
    plain = ours(x, 10, ctx).sample
    assert max_diff(got, want) < TOL and max_diff(got, plain) > 1e-3


def test_t2i_adapter_residuals_match_diffusers():
    theirs, ours = _pair()
    x, ctx = _inputs()
    g = torch.Generator().manual_seed(4)
    adapter = [torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 32, 8, 8, generator=g)]
    given = list(adapter)
    with torch.no_grad():
        got = ours(x, 10, ctx, down_intrablock_additional_residuals=given).sample
        want = theirs(x, 10, ctx, down_intrablock_additional_residuals=list(adapter)).sample
    assert max_diff(got, want) < TOL and len(given) == 2  # the caller's list is left alone


def test_encoder_attention_mask_matches_diffusers():
    theirs, ours = _pair()
    x, ctx = _inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    want, got = _both(theirs, ours, x, 10, ctx, encoder_attention_mask=mask)
    unmasked = ours(x, 10, ctx).sample
    assert max_diff(got, want) < TOL and max_diff(got[:1], unmasked[:1]) > 1e-4


def test_class_labels_timestep_cond_and_concat_match_diffusers():
    theirs, ours = _pair(num_class_embeds=10, time_cond_proj_dim=6, class_embeddings_concat=True,
                         timestep_post_act="silu")
    x, ctx = _inputs()
    cond = torch.randn(2, 6, generator=torch.Generator().manual_seed(5))
    want, got = _both(theirs, ours, x, torch.tensor([3, 700]), ctx, class_labels=torch.tensor([1, 7]),
                      timestep_cond=cond)
    assert max_diff(got, want) < TOL
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, 3, ctx)


@pytest.mark.parametrize("kind", ["projection", "simple_projection"])
def test_projection_class_embeddings_match_diffusers(kind):
    theirs, ours = _pair(class_embed_type=kind, projection_class_embeddings_input_dim=5, act_fn="mish")
    x, ctx = _inputs()
    labels = torch.randn(2, 5, generator=torch.Generator().manual_seed(6))
    want, got = _both(theirs, ours, x, 3, ctx, class_labels=labels)
    assert max_diff(got, want) < TOL


def test_only_cross_attention_transformers_match_diffusers():
    theirs, ours = _pair(only_cross_attention=True, center_input_sample=True)
    x, ctx = _inputs()
    want, got = _both(theirs, ours, x, 3, ctx)
    assert max_diff(got, want) < TOL


def test_cross_attention_kwargs_warn_like_diffusers():
    _, ours = _pair()
    x, ctx = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = ours(x, 3, ctx, cross_attention_kwargs={"scale": 1.0}).sample  # LoRA scale 1: nothing to say
    with pytest.warns(UserWarning, match=r"cross_attention_kwargs \['not_a_key'\] are not expected"):
        got = ours(x, 3, ctx, cross_attention_kwargs={"not_a_key": 1}).sample
    assert torch.equal(got, plain)


def test_in_a_diffusers_pipeline_gives_the_same_images(tmp_path):
    from tests.pipelines import SD_SCHEDULER_CONFIG, clip_tokenizer, tiny_clip, tiny_unet, tiny_vae

    tok = clip_tokenizer(tmp_path / "tok")
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(len(tok)), tokenizer=tok, unet=randomise(tiny_unet(), 1),
        scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a photo of a cat", num_inference_steps=3, height=32, width=32, output_type="np")
    want = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    _not_saturated(want)
    pipe.unet = from_diffusers(pipe.unet)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    got = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    assert max_diff(torch.from_numpy(got), torch.from_numpy(want)) < 1e-4


def test_in_a_diffusers_controlnet_pipeline_gives_the_same_images(tmp_path):
    from tests.pipelines import SD_SCHEDULER_CONFIG, clip_tokenizer, tiny_clip, tiny_unet, tiny_vae

    tok = clip_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    controlnet = randomise(diffusers.ControlNetModel(
        block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32, norm_num_groups=4,
        attention_head_dim=2, conditioning_embedding_out_channels=(8, 16)), 4)
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(len(tok)), tokenizer=tok, unet=randomise(tiny_unet(), 1),
        controlnet=controlnet, scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    hint = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    args = dict(prompt="a photo of a cat", image=hint, num_inference_steps=3, height=32, width=32, output_type="pt")
    want = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    _not_saturated(want)
    pipe.unet, pipe.vae = from_diffusers(pipe.unet), from_diffusers(pipe.vae)
    got = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    assert max_diff(got, want) < 1e-4


@pytest.mark.parametrize("over", [dict(mid_block_type="UNetMidBlock2D"), dict(mid_block_type=None),
                                  dict(act_fn="gelu", resnet_time_scale_shift="scale_shift"),
                                  dict(down_block_types=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
                                       up_block_types=("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"),
                                       mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=8,
                                       cross_attention_dim=32, cross_attention_norm="layer_norm",
                                       block_out_channels=(32, 32),
                                       mid_block_only_cross_attention=True)],
                         ids=["mid-resnet", "no-mid", "gelu-scale-shift", "simple-layer-norm"])
def test_other_block_layouts_match_diffusers(over):
    theirs, ours = _pair(**over)
    x, _ = _inputs()
    ctx = torch.randn(2, 7, over.get("cross_attention_dim", 16), generator=torch.Generator().manual_seed(8))
    want, got = _both(theirs, ours, x, 3, ctx)
    assert max_diff(got, want) < TOL


def test_text_image_addition_embedding_matches_diffusers():
    theirs, ours = _pair(addition_embed_type="text_image")
    x, ctx = _inputs()
    g = torch.Generator().manual_seed(9)
    added = {"text_embeds": torch.randn(2, 16, generator=g), "image_embeds": torch.randn(2, 16, generator=g)}
    want, got = _both(theirs, ours, x, 3, ctx, added_cond_kwargs=added)
    assert max_diff(got, want) < TOL
    with pytest.raises(ValueError, match="image_embeds"):
        ours(x, 3, ctx, added_cond_kwargs={"text_embeds": added["text_embeds"]})


def test_freeu_matches_diffusers():
    theirs, ours = _pair()
    x, ctx = _inputs()
    plain = ours(x, 3, ctx).sample
    for m in (theirs, ours):
        m.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    want, got = _both(theirs, ours, x, 3, ctx)
    assert max_diff(got, want) < TOL and max_diff(got, plain) > 1e-3
    ours.disable_freeu()
    assert torch.equal(ours(x, 3, ctx).sample, plain)


def test_no_text_for_a_unet_without_cross_attention():
    """encoder_hidden_states=None runs a UNet whose blocks take no text, as diffusers does; a UNet with
    transformers still asks for it."""
    theirs, ours = _pair(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                         mid_block_type="UNetMidBlock2D")
    x, _ = _inputs()
    want, got = _both(theirs, ours, x, 3, None)
    assert max_diff(got, want) < TOL
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        _pair()[1](x, 3, None)


def test_fourier_time_features_match_diffusers():
    theirs, ours = _pair(time_embedding_type="fourier", class_embed_type="timestep", flip_sin_to_cos=False)
    x, ctx = _inputs()
    want, got = _both(theirs, ours, x, torch.tensor([0.3, 2.5]), ctx, class_labels=torch.tensor([0.1, 0.7]))
    assert max_diff(got, want) < TOL
    assert ours.time_proj.weight.shape == (16,) and not ours.time_proj.weight.requires_grad
