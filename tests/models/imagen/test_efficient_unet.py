"""Imagen's Efficient U-Net block types and presets on diffkern's UNet2DConditionModel."""

import math

import pytest
import torch

from diffkern import schedulers
from diffkern.models import UNet2DConditionModel
from diffkern.models.imagen import BUDGETS, efficient_unet_config, imagen_unet, parameter_count, preset_config


def tiny_config(**kw):
    base = dict(cross_attention_dim=32, attention_head_dim=8, encoder_hid_dim=12,
                addition_embed_type_num_heads=2, norm_num_groups=8)
    kw = dict(base, **kw)
    return efficient_unet_config([16, 32], [1, 2], {1}, sample_size=16, **kw)


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_presets_match_the_papers_budgets(name):
    unet = imagen_unet(name, device="meta")
    assert abs(parameter_count(unet) / BUDGETS[name] - 1) < 0.03, parameter_count(unet)


def test_efficient_order_resample_first_and_last():
    """DBlock resnets run at the downsampled size; UBlock resnets before the upsampling; one skip per
    block, scaled by 1/sqrt(2)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_config()).eval()
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, tuple(args[0].shape))  # returns None: the output is left alone
        return hook

    for name in ("down_blocks.0.more_resnets.0", "down_blocks.1.more_resnets.1", "up_blocks.1.resnets.0",
                 "up_blocks.1.upsample"):
        unet.get_submodule(name).register_forward_hook(record(name))
    x = torch.randn(2, 6, 16, 16)
    out = unet(x, 10, encoder_hidden_states=torch.randn(2, 5, 12), class_labels=torch.tensor([0, 100]))
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert out.shape == (2, 3, 16, 16)
    assert seen["down_blocks.0.more_resnets.0"][2:] == (8, 8)
    assert seen["down_blocks.1.more_resnets.1"][2:] == (4, 4)
    assert seen["up_blocks.1.resnets.0"] == (2, 32 + 16, 8, 8)
    assert seen["up_blocks.1.upsample"][2:] == (16, 16)

    up = unet.up_blocks[1]
    h, skip, temb = torch.randn(1, 32, 8, 8), torch.randn(1, 16, 8, 8), torch.randn(1, 64)
    manual = up.resnets[0](torch.cat([h, skip / math.sqrt(2)], dim=1), temb)
    manual = up.upsample(torch.nn.functional.interpolate(manual, scale_factor=2.0, mode="nearest"))
    assert torch.allclose(up(h, (skip,), temb), manual, atol=1e-6)
    assert len(unet.down_blocks[1].more_resnets) == 2 and len(up.more_resnets) == 0  # as many as its DBlock


def test_tiny_efficient_unet_trains():
    """A few Adam steps of the eps-prediction loss on a fixed batch: the loss falls."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_config())
    sched = schedulers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    F = torch.nn.functional
    low = F.interpolate(F.avg_pool2d(x0, 4), size=(16, 16), mode="bilinear", align_corners=True)
    text, t = torch.randn(4, 5, 12, generator=g), torch.tensor([50, 300, 600, 900])
    noise = torch.randn(x0.shape, generator=g)
    x_in = torch.cat([sched.add_noise(x0, noise, t), low], dim=1)
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = unet(x_in, t, encoder_hidden_states=text, class_labels=torch.zeros(4, dtype=torch.long))
        loss = torch.nn.functional.mse_loss(out if isinstance(out, torch.Tensor) else out[0], noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_errors():
    unet = UNet2DConditionModel(**tiny_config())
    with pytest.raises(ValueError, match="multiples of 2 \\*\\* levels"):
        unet(torch.randn(1, 6, 10, 10), 1, encoder_hidden_states=torch.randn(1, 5, 12),
             class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="valid: imagen-base-64"):
        preset_config("imagen-sr-512")
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet2DConditionModel(**tiny_config(attention_head_dim=7))
