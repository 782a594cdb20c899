"""UNet2DConditionModel as the DeepFloyd IF stages (SimpleCrossAttn blocks, T5 projection, text pooling,
noise-level class embedding, stage II's cross-only attention) against diffusers' model, same weights."""

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


T5 = 40  # width of the (tiny) T5 states, projected to cross_attention_dim by encoder_hid_proj

# IF-I's layout shrunk: a resnet-resampled top level, added-KV attention below, GELU everywhere,
# scale-shift resnets with the time activation skipped, outputs scaled by 1/0.7071, 6 output channels
# (eps + learned-range variance). cross_attention_dim is a multiple of 32: norm_cross has 32 groups.
IF_I = dict(sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=4, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), attention_head_dim=8,
            cross_attention_dim=32, encoder_hid_dim=T5, encoder_hid_dim_type="text_proj", addition_embed_type="text",
            addition_embed_type_num_heads=4, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
            act_fn="gelu", time_embedding_act_fn="gelu", resnet_skip_time_act=True,
            resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071)
CONFIGS = {
    "if-i": IF_I,
    # IF-II: 6 input channels (noisy image + upscaled low-res), the noise level as a timestep class
    # embedding, attention to the text only, per-level layers, time embedding narrower than 4x.
    "if-ii": dict(IF_I, in_channels=6, class_embed_type="timestep", only_cross_attention=True,
                  layers_per_block=(1, 2), time_embedding_dim=48),
    # Per-level head widths: diffusers indexes them in the down order on the up path too.
    "if-heads": dict(IF_I, attention_head_dim=(8, 16, 32), block_out_channels=(16, 32, 32),
                     down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 2,
                     up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",)),
}


def _shapes(model):
    return {k: v.shape for k, v in model.state_dict().items()}


def _pair(name, seed=0):
    torch.manual_seed(seed)
    theirs = randomise(diffusers.UNet2DConditionModel(**CONFIGS[name]), seed)
    return theirs, from_diffusers(theirs)


def _inputs(cfg, size=(16, 24), batch=2, tokens=9):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg["in_channels"], *size, generator=g)
    return x, torch.randn(batch, tokens, T5, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name, backend, used_backends):
    theirs, ours = _pair(name)
    x, ctx = _inputs(CONFIGS[name])
    kw = {"class_labels": torch.tensor([250, 20])} if CONFIGS[name].get("class_embed_type") else {}
    with torch.no_grad():
        want = theirs(x, torch.tensor([999, 4]), ctx, **kw).sample
        with backend_context(backend):
            got = ours(x, torch.tensor([999, 4]), ctx, **kw).sample
    assert got.shape == want.shape == (2, 6, 16, 24)
    assert max_diff(got, want) < TOL
    check_backends(used_backends, backend)


def test_text_mask_matches_diffusers():
    """IF attends every text position, but the blocks honour encoder_attention_mask as diffusers does."""
    theirs, ours = _pair("if-i")
    x, ctx = _inputs(IF_I)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 4:] = 0
    with torch.no_grad():
        want = theirs(x, 10, ctx, encoder_attention_mask=mask).sample
        got = ours(x, 10, ctx, encoder_attention_mask=mask).sample
    assert max_diff(got, want) < TOL


def test_text_keys_go_to_the_kernel_as_a_prefix(monkeypatch):
    """The added-KV attention hands the text keys to ops.attention as kv_prefix (no concatenation)."""
    from diffkern import ops

    _, ours = _pair("if-i")
    calls = []
    real = ops.attention
    def spy(q, k, v, **kw):
        calls.append(kw.get("kv_prefix"))
        return real(q, k, v, **kw)

    monkeypatch.setattr(ops, "attention", spy)
    x, ctx = _inputs(IF_I)
    with torch.no_grad():
        ours(x, 10, ctx)
    # 1 pooling call, then down (1) + mid (1) + up (2) SimpleCrossAttn layers, each with 9 text keys first.
    assert calls[0] is None and len(calls) == 5
    assert all(p is not None and p[0].shape[2] == 9 for p in calls[1:])


def test_stage_two_attends_to_text_only():
    _, ours = _pair("if-ii")
    attn = ours.down_blocks[1].attentions[0]
    assert attn.only_cross_attention and not hasattr(attn, "to_k")
    assert ours.mid_block.attentions[0].only_cross_attention


def test_class_labels_required():
    _, ours = _pair("if-ii")
    x, ctx = _inputs(CONFIGS["if-ii"])
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, 10, ctx)
    with pytest.raises(ValueError, match="class_labels must be a"):
        ours(x, 10, ctx, class_labels=torch.tensor([[250], [20]]))


def test_state_dict_is_diffusers_exactly():
    for name in CONFIGS:
        theirs = diffusers.UNet2DConditionModel(**CONFIGS[name])
        ours = UNet2DConditionModel(**CONFIGS[name])
        assert _shapes(ours) == _shapes(theirs)


# DeepFloyd/IF-I-XL-v1.0's UNet, reconstructed from diffusers' scripts/convert_if.py and the IF
# model card (model_channels 704, channel_mult 1,2,3,4, 3 res blocks, attention at 32/16/8, head
# width 64, T5-XXL 4096 -> 2816, 64-head pooling): 4.3B parameters.
IF_I_XL = dict(sample_size=64, in_channels=3, out_channels=6, block_out_channels=(704, 1408, 2112, 2816),
               layers_per_block=3,
               down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
               mid_block_type="UNetMidBlock2DSimpleCrossAttn",
               up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",), attention_head_dim=64,
               cross_attention_dim=2816, encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
               addition_embed_type="text", addition_embed_type_num_heads=64, cross_attention_norm="group_norm",
               resnet_time_scale_shift="scale_shift", act_fn="gelu", time_embedding_act_fn="gelu",
               resnet_skip_time_act=True, resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071)


def test_if_i_xl_parameter_count_matches_diffusers():
    with torch.device("meta"):
        ours, theirs = UNet2DConditionModel(**IF_I_XL), diffusers.UNet2DConditionModel(**IF_I_XL)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == 4_304_695_110
    assert _shapes(ours) == _shapes(theirs)


def test_up_blocks_read_head_widths_in_down_order():
    ours = UNet2DConditionModel(**CONFIGS["if-heads"])
    assert ours.down_blocks[2].attentions[0].dim_head == 32 and ours.mid_block.attentions[0].dim_head == 32
    assert ours.up_blocks[0].attentions[0].dim_head == 8 and ours.up_blocks[0].attentions[0].heads == 4


def test_stage_two_unet_is_one_graph():
    """Traces under torch.compile as one graph (the SimpleCrossAttn path, class embedding, text pooling)."""
    torch._dynamo.reset()
    ours = UNet2DConditionModel(**CONFIGS["if-ii"]).eval()
    x, ctx = _inputs(CONFIGS["if-ii"])
    with torch.no_grad():
        ex = torch._dynamo.explain(ours)(x, torch.tensor([3, 5]), ctx, class_labels=torch.tensor([3, 4]))
    assert (ex.graph_count, [str(r.reason)[:200] for r in ex.break_reasons]) == (1, [])


def test_in_a_diffusers_if_pipeline_gives_the_same_images():
    from tests.pipelines._if_helpers import IF_I_SCHEDULER, t5_tokenizer, tiny_if_unet, tiny_t5

    pipe = diffusers.IFPipeline(tokenizer=t5_tokenizer(), text_encoder=tiny_t5(), unet=tiny_if_unet(),
                                scheduler=diffusers.DDPMScheduler(**IF_I_SCHEDULER), safety_checker=None,
                                feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a photo of a cat", num_inference_steps=3, height=16, width=16, output_type="pt")
    want = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    _not_saturated(want, -1.0, 1.0)
    pipe.unet = from_diffusers(pipe.unet)
    got = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    assert max_diff(got, want) < 1e-4


def test_bfloat16_error_is_no_worse_than_diffusers():
    """In bfloat16, the error against our float32 output is at most 2x diffusers' own bfloat16 error."""
    theirs, ours = _pair("if-ii")
    x, ctx = _inputs(CONFIGS["if-ii"])
    labels = torch.tensor([250, 20])
    with torch.no_grad():
        ref = ours(x, 10, ctx, class_labels=labels).sample
        theirs, ours = theirs.to(torch.bfloat16), ours.to(torch.bfloat16)
        want = theirs(x.bfloat16(), 10, ctx.bfloat16(), class_labels=labels).sample
        got = ours(x.bfloat16(), 10, ctx.bfloat16(), class_labels=labels).sample
    assert got.dtype == torch.bfloat16
    assert max_diff(got, ref) <= 2 * max_diff(want, ref) + 1e-3


def test_in_a_diffusers_if_super_resolution_pipeline_gives_the_same_images():
    from tests.pipelines._if_helpers import IF_II_SCHEDULER, NOISING_SCHEDULER, t5_tokenizer, tiny_if_sr_unet, tiny_t5

    pipe = diffusers.IFSuperResolutionPipeline(
        tokenizer=t5_tokenizer(), text_encoder=tiny_t5(), unet=tiny_if_sr_unet(),
        scheduler=diffusers.DDPMScheduler(**IF_II_SCHEDULER),
        image_noising_scheduler=diffusers.DDPMScheduler(**NOISING_SCHEDULER), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    args = dict(prompt="a photo of a cat", image=low, num_inference_steps=3, height=16, width=16,
                noise_level=100, output_type="pt")
    want = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    _not_saturated(want, -1.0, 1.0)
    pipe.unet = from_diffusers(pipe.unet)
    got = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    assert max_diff(got, want) < 1e-4
