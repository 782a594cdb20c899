"""UNet2DModel (the Karlo super-resolution UNet) against diffusers' on tiny random configs."""

import pytest
import torch

from diffkern.models import from_diffusers
from diffkern.models.unet_2d import UNet2DModel
from tests.models._helpers import BACKENDS, backend_context, check_backends, max_diff, randomise

diffusers = pytest.importorskip("diffusers")

KARLO_SR = dict(sample_size=256, layers_per_block=3, down_block_types=("ResnetDownsampleBlock2D",) * 4,
                up_block_types=("ResnetUpsampleBlock2D",) * 4, block_out_channels=(320, 640, 960, 1280),
                in_channels=6, out_channels=3, add_attention=False)
TINY_SR = dict(KARLO_SR, sample_size=16, layers_per_block=1, block_out_channels=(8, 16, 24), norm_num_groups=4,
               down_block_types=("ResnetDownsampleBlock2D",) * 3, up_block_types=("ResnetUpsampleBlock2D",) * 3)
TINY_ATTN = dict(in_channels=3, out_channels=6, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "ResnetDownsampleBlock2D"),
                 up_block_types=("ResnetUpsampleBlock2D", "UpBlock2D"), attention_head_dim=4,
                 mid_block_scale_factor=1.5, freq_shift=1, flip_sin_to_cos=False)
TINY_SHIFT = dict(TINY_SR, resnet_time_scale_shift="scale_shift", class_embed_type="identity", downsample_padding=0,
                  down_block_types=("DownBlock2D", "ResnetDownsampleBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D", "UpBlock2D"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [TINY_SR, TINY_ATTN, TINY_SHIFT], ids=["karlo_sr", "mid_attention", "scale_shift"])
def test_unet_2d_matches_diffusers(cfg, backend, used_backends):
    ref = randomise(diffusers.UNet2DModel(**cfg), seed=5)
    ours = from_diffusers(ref)
    assert isinstance(ours, UNet2DModel)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, cfg["in_channels"], 16, 16, generator=g)
    labels = torch.randn(2, cfg["block_out_channels"][0] * 4, generator=g) if "class_embed_type" in cfg else None
    for t in (torch.tensor(999), torch.tensor([10, 400]), 7):
        with torch.no_grad():
            want = ref(x, t, class_labels=labels).sample
            with backend_context(backend):
                got = ours(x, t, class_labels=labels)
        assert got.sample.shape == want.shape
        assert max_diff(got.sample, want) < 1e-4, max_diff(got.sample, want)
    check_backends(used_backends, backend, ("group_norm", "attention") if cfg is TINY_ATTN else ("group_norm",))


def test_karlo_sr_parameter_count():
    with torch.device("meta"):
        model = UNet2DModel(**KARLO_SR)
    assert sum(p.numel() for p in model.parameters()) == 691_579_523


def test_unet_2d_state_dict_keys_equal_diffusers():
    with torch.device("meta"):
        ref = diffusers.UNet2DModel(**dict(KARLO_SR, block_out_channels=(32, 64, 96, 128)))
        ours = UNet2DModel(**dict(KARLO_SR, block_out_channels=(32, 64, 96, 128)))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_unet_2d_bad_config_and_inputs():
    with pytest.raises(ValueError, match="down_block_types"):
        UNet2DModel(**dict(TINY_SR, down_block_types=("SkipDownBlock2D",) * 3))
    with pytest.raises(ValueError, match="time_embedding_type"):
        UNet2DModel(**dict(TINY_SR, time_embedding_type="fourier"))
    model = UNet2DModel(**TINY_SR)
    with pytest.raises(ValueError, match="sample"):
        model(torch.randn(1, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(1, 6, 16, 16), 1, class_labels=torch.zeros(1, 32))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_unet_2d_half_precision(device):
    """fp16: our error against the float64 model is at most 2x diffusers' own fp16 error (+ 1e-3)."""
    import copy

    ref = randomise(diffusers.UNet2DModel(**TINY_SHIFT), seed=8)
    ours = from_diffusers(ref)
    g = torch.Generator().manual_seed(9)
    x, labels = torch.randn(2, 6, 16, 16, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        truth = copy.deepcopy(ref).double()(x.double(), 250, class_labels=labels.double()).sample
        x16, l16 = x.to(device, torch.float16), labels.to(device, torch.float16)
        got = ours.to(device, torch.float16)(x16, 250, class_labels=l16).sample
        want = copy.deepcopy(ref).to(device, torch.float16)(x16, 250, class_labels=l16).sample
    assert got.dtype == torch.float16
    err_ours, err_ref = max_diff(got.cpu(), truth), max_diff(want.cpu(), truth)
    assert err_ours <= 2 * err_ref + 1e-3, (err_ours, err_ref)
