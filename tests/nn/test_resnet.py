"""diffkern.nn.ResnetBlock2D against diffusers' ResnetBlock2D with the same weights: the GroupNorm ->
SiLU / GELU sites run as one fused group_norm (IF's GELU resnets included)."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffkern import nn as dnn  # noqa: E402
from diffkern.nn import resnet  # noqa: E402


@pytest.mark.parametrize("act_fn,norm", [("gelu", "scale_shift"), ("gelu", "default"), ("silu", "scale_shift"),
                                         ("mish", "default")])
def test_resnet_block_matches_diffusers(act_fn, norm, monkeypatch):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    kw = dict(in_channels=8, out_channels=16, temb_channels=12, groups=4, eps=1e-6, time_embedding_norm=norm)
    theirs = ResnetBlock2D(non_linearity=act_fn, skip_time_act=act_fn == "gelu", **kw).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    ours = resnet.ResnetBlock2D(act_fn=act_fn, skip_time_act=act_fn == "gelu", **kw).eval()
    ours.load_state_dict(theirs.state_dict())
    acts = []
    real = dnn.group_norm.ops.group_norm
    monkeypatch.setattr(dnn.group_norm.ops, "group_norm",
                        lambda *a, **k: (acts.append(k["activation"]), real(*a, **k))[1])
    x, temb = torch.randn(2, 8, 5, 7), torch.randn(2, 12)
    with torch.no_grad():
        want, got = theirs(x, temb), ours(x, temb)
    fused = resnet.fused_activation(act_fn)
    assert acts == [fused, fused] and (fused is None) == (act_fn == "mish")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
