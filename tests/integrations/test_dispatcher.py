"""diffkern behind diffusers' attention dispatcher (diffusers >= 0.35): same results as the native
backend, diffkern's op really runs, the registry is restored on exit."""

import pytest
import torch

pytest.importorskip("diffusers")

import diffkern  # noqa: E402
from diffkern.integrations.diffusers import attention_backend, diffkern_attention, dispatcher  # noqa: E402

_ABSENT = dispatcher.dispatcher_unavailable()
pytestmark = pytest.mark.skipif(bool(_ABSENT), reason=_ABSENT)


@pytest.fixture
def count_attention(monkeypatch):
    calls = []
    real = dispatcher.ops.attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatcher.ops, "attention", spy)
    return calls


@pytest.mark.parametrize("mask", [None, "bool_2d", "float_4d"])
def test_dispatch_attention_fn_matches_native(mask, count_attention):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn

    B, Sq, Sk, H, D = 2, 7, 5, 2, 8
    q, k, v = torch.randn(B, Sq, H, D), torch.randn(B, Sk, H, D), torch.randn(B, Sk, H, D)
    attn_mask = None
    if mask == "bool_2d":
        attn_mask = torch.ones(B, Sk, dtype=torch.bool)
        attn_mask[0, 3:] = False
    elif mask == "float_4d":
        attn_mask = torch.randn(B, H, Sq, Sk)
    want = dispatch_attention_fn(q, k, v, attn_mask=attn_mask, scale=0.3)
    before = dict(_AttentionBackendRegistry._backends), _AttentionBackendRegistry._active_backend
    with attention_backend():
        got = dispatch_attention_fn(q, k, v, attn_mask=attn_mask, scale=0.3)
    assert (dict(_AttentionBackendRegistry._backends), _AttentionBackendRegistry._active_backend) == before
    assert count_attention == [(B, H, Sq, D)]
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_refuses_what_it_cannot_honour():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="dropout_p"):
        diffkern_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="return_lse"):
        diffkern_attention(q, q, q, return_lse=True)
    with pytest.raises(ValueError, match="heads"):
        diffkern_attention(q, torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), enable_gqa=True)


def test_flux_transformer_under_the_context(count_attention):
    """A dispatcher-era model (Flux): same output under the context; patch() reports it as left."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    inputs = dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  img_ids=torch.randn(16, 3), txt_ids=torch.randn(8, 3), return_dict=False)
    with torch.no_grad():
        want = model(**inputs)[0]
        with attention_backend():
            got = model(**inputs)[0]
    assert len(count_attention) == 2  # one joint block, one single block
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    report = diffkern.patch(model)
    assert report.total == 0 and any("dispatcher" in why for _, _, why in report.left)
    assert any("AttentionBackendName" in n for n in report.notes) and "attention_backend()" in repr(report)


def test_report_says_when_the_dispatcher_is_absent(monkeypatch):
    from diffusers.models.resnet import ResnetBlock2D

    monkeypatch.setattr(dispatcher, "dispatcher_unavailable", lambda: "no attention_dispatch here (test)")
    report = diffkern.patch(ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=None, groups=2))
    assert any("no attention_dispatch here (test)" in n for n in report.notes)
    with pytest.raises(RuntimeError, match="no attention_dispatch here"):
        with attention_backend():
            pass
