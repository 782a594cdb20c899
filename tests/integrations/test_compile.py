"""torch.compile(unet, fullgraph=True) on a patched diffusers UNet: one graph, the same output.

aot_eager traces through the custom ops' fake implementations as inductor does, without inductor's
CPU code generation (minutes on this machine for even a tiny UNet; the GPU model issue times it)."""

import pytest
import torch

pytest.importorskip("diffusers")

import diffkern  # noqa: E402


def test_patched_unet_compiles_fullgraph():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8,), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2).eval()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = unet(x, t, text).sample
    report = diffkern.patch(unet)
    assert all(report.replaced[k] for k in ("attention", "resnet_norm_silu", "out_norm_silu")), report
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    with torch.no_grad():
        got = compiled(x, t, text).sample
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max())
