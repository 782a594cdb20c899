"""UNet2DConditionModel as the unCLIP (Karlo) decoder: SimpleCrossAttn blocks with the text padding mask,
the CLIP image embedding as an "identity" class embedding, scale-shift resnets; against diffusers."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkern.models import UNet2DConditionModel, from_diffusers  # noqa: E402

from ._helpers import BACKENDS, backend_context, check_backends, max_diff, randomise  # noqa: E402

TOL = 1e-4
# kakaobrain/karlo-v1-alpha's decoder (diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py).
KARLO_DECODER = dict(sample_size=64, layers_per_block=3, in_channels=3, out_channels=6,
                     down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                     up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                     mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(320, 640, 960, 1280),
                     cross_attention_dim=1536, class_embed_type="identity", attention_head_dim=64,
                     resnet_time_scale_shift="scale_shift")
TINY = dict(KARLO_DECODER, sample_size=16, layers_per_block=1, block_out_channels=(16, 32, 32), norm_num_groups=4,
            down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 2,
            up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",), cross_attention_dim=24,
            attention_head_dim=8)
TIME_EMBED = 16 * 4  # the identity class embedding adds the image embedding to the time embedding


def _setup(seed=0):
    torch.manual_seed(seed)
    theirs = randomise(diffusers.UNet2DConditionModel(**TINY), seed)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    text = torch.randn(2, 10, 24, generator=g)  # 4 extra image tokens + 6 text tokens, as UnCLIPTextProjModel
    image_time = torch.randn(2, TIME_EMBED, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False  # padding of the shorter prompt
    return theirs, from_diffusers(theirs), x, text, image_time, mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_matches_diffusers(backend, used_backends):
    theirs, ours, x, text, image_time, mask = _setup()
    # As UnCLIPPipeline calls its decoder: the text mask as `attention_mask`.
    kw = dict(encoder_hidden_states=text, class_labels=image_time, attention_mask=mask)
    with torch.no_grad():
        want = theirs(x, torch.tensor([900, 12]), **kw).sample
        with backend_context(backend):
            got = ours(x, torch.tensor([900, 12]), **kw).sample
            unmasked = ours(x, torch.tensor([900, 12]), encoder_hidden_states=text, class_labels=image_time).sample
    assert got.shape == (2, 6, 16, 16) and max_diff(got, want) < TOL
    assert max_diff(got[:1], unmasked[:1]) > 1e-4 and max_diff(got[1:], unmasked[1:]) < TOL  # the mask matters
    check_backends(used_backends, backend)


def test_encoder_attention_mask_is_the_same_mask():
    """Without attention_mask the SimpleCrossAttn blocks take encoder_attention_mask (diffusers' rule)."""
    theirs, ours, x, text, image_time, mask = _setup()
    with torch.no_grad():
        want = theirs(x, 5, text, class_labels=image_time, encoder_attention_mask=mask).sample
        got = ours(x, 5, text, class_labels=image_time, encoder_attention_mask=mask).sample
        as_attention_mask = ours(x, 5, text, class_labels=image_time, attention_mask=mask).sample
    assert max_diff(got, want) < TOL and max_diff(got, as_attention_mask) < TOL


def test_karlo_decoder_parameter_count():
    with torch.device("meta"):
        ours, theirs = UNet2DConditionModel(**KARLO_DECODER), diffusers.UNet2DConditionModel(**KARLO_DECODER)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 885_439_686
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_in_a_diffusers_unclip_pipeline_gives_the_same_images(tmp_path):
    """The decoder swapped into diffusers' UnCLIPPipeline: the same decoder outputs at every step (the
    final images saturate at random weights, so the steps are what is compared) and the same images."""
    from tests.pipelines._unclip import diffusers_components

    pipe = diffusers.UnCLIPPipeline(**diffusers_components(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a photo of a cat", prior_num_inference_steps=2, decoder_num_inference_steps=3,
                super_res_num_inference_steps=2, output_type="pt")

    def run():
        steps = []
        hook = pipe.decoder.register_forward_hook(lambda m, a, out: steps.append(out.sample.clone()))
        images = pipe(**args, generator=torch.Generator().manual_seed(0)).images
        hook.remove()
        return torch.stack(steps), torch.as_tensor(images)  # diffusers' unCLIP "pt" output is numpy

    want_steps, want = run()
    pipe.decoder = from_diffusers(pipe.decoder)
    assert isinstance(pipe.decoder, UNet2DConditionModel)
    got_steps, got = run()
    assert got_steps.shape[0] == 3
    assert max_diff(got_steps, want_steps) < TOL * max(1.0, want_steps.abs().max().item())
    assert max_diff(got, want) < 1e-4
