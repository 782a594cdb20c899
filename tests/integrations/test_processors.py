"""diffkern's attention processors against diffusers' own, module by module, over the Attention
options diffusers models use (fp32, CPU, fresh random weights and inputs every run)."""

import logging

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
)

import diffkern  # noqa: E402
from diffkern.integrations.diffusers import DiffkernAttnAddedKVProcessor, DiffkernAttnProcessor  # noqa: E402

TOL = 1e-5  # both sides compute in float32; the difference is summation order


def _randomise(module):
    """Fresh random weights (norm scales near 1), so every run tests other values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return module.eval()


def _both(attn, reference, ours, *args, **kwargs):
    with torch.no_grad():
        attn.set_processor(reference)
        want = attn(*args, **kwargs)
        attn.set_processor(ours)
        got = attn(*args, **kwargs)
    return got, want


def _key_mask(batch, length, keep):
    """UNet2DConditionModel's form of a (batch, length) keep-mask: (1 - mask) * -10000, unsqueezed."""
    mask = torch.ones(batch, length)
    mask[:, keep:] = 0
    return ((1 - mask) * -10000.0).unsqueeze(1)


CASES = {
    # name: (Attention kwargs, input builder)
    "self_4d_groupnorm_residual": (
        dict(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
             rescale_output_factor=2.0, bias=True),
        lambda: dict(hidden_states=torch.randn(2, 16, 3, 5))),
    "cross_mask_layernorm": (
        dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, cross_attention_norm="layer_norm"),
        lambda: dict(hidden_states=torch.randn(2, 37, 16), encoder_hidden_states=torch.randn(2, 7, 12),
                     attention_mask=_key_mask(2, 7, keep=4))),
    "cross_groupnorm": (
        dict(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4, cross_attention_norm="group_norm",
             cross_attention_norm_num_groups=4),
        lambda: dict(hidden_states=torch.randn(1, 9, 16), encoder_hidden_states=torch.randn(1, 5, 12))),
    "spatial_norm": (
        dict(query_dim=32, heads=1, dim_head=32, spatial_norm_dim=4, residual_connection=True),
        lambda: dict(hidden_states=torch.randn(1, 32, 4, 4), temb=torch.randn(1, 4, 2, 2))),
    "qk_norm": (
        dict(query_dim=16, heads=2, dim_head=8, qk_norm="layer_norm"),
        lambda: dict(hidden_states=torch.randn(2, 11, 16))),
    "vae_single_head_512": (
        dict(query_dim=512, heads=1, dim_head=512, norm_num_groups=32, residual_connection=True, bias=True,
             upcast_softmax=True, _from_deprecated_attn_block=True, eps=1e-6),
        lambda: dict(hidden_states=torch.randn(1, 512, 3, 3))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_attn_processor_2_0(name):
    kwargs, inputs = CASES[name]
    attn = _randomise(Attention(**kwargs))
    got, want = _both(attn, AttnProcessor2_0(), DiffkernAttnProcessor(), **inputs())
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL * max(1.0, want.abs().max())


def test_scale_qk_false_matches_classic_processor():
    """AttnProcessor2_0 ignores attn.scale; diffusers builds scale_qk=False modules with AttnProcessor."""
    attn = _randomise(Attention(query_dim=16, heads=2, dim_head=8, scale_qk=False))
    x = torch.randn(2, 6, 16) * 0.3
    got, want = _both(attn, AttnProcessor(), DiffkernAttnProcessor(), x)
    assert (got - want).abs().max() <= TOL


def test_head_dim_512_runs_under_a_triton_context():
    """The Triton kernel takes head dims up to 256: the VAE's 512-wide head goes to SDPA instead."""
    attn = _randomise(Attention(query_dim=512, heads=1, dim_head=512, norm_num_groups=32,
                                residual_connection=True))
    x = torch.randn(1, 512, 2, 2)
    with torch.no_grad():
        want = attn(x)
        attn.set_processor(DiffkernAttnProcessor())
        with diffkern.use_backend(attention="triton"):
            got = attn(x)
    assert (got - want).abs().max() <= TOL * want.abs().max()


def _added_kv(only_cross=False):
    return _randomise(Attention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=12, norm_num_groups=4,
                                cross_attention_norm="group_norm", cross_attention_norm_num_groups=4,
                                bias=True, upcast_softmax=True, only_cross_attention=only_cross,
                                processor=AttnAddedKVProcessor2_0()))


@pytest.mark.parametrize("masked", [False, True])
def test_added_kv_matches_diffusers(masked):
    attn = _added_kv()
    inputs = dict(hidden_states=torch.randn(2, 16, 3, 4), encoder_hidden_states=torch.randn(2, 5, 12))
    if masked:
        inputs["attention_mask"] = _key_mask(2, 5, keep=3)
    got, want = _both(attn, AttnAddedKVProcessor2_0(), DiffkernAttnAddedKVProcessor(), **inputs)
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_added_kv_only_cross_attention_with_text_mask():
    """Masked text keys count as absent: equal to diffusers' processor on the unmasked tokens alone
    (diffusers' own processor cannot broadcast the padded mask in this form)."""
    attn = _added_kv(only_cross=True)
    x, text = torch.randn(2, 16, 3, 3), torch.randn(2, 5, 12)
    with torch.no_grad():
        attn.set_processor(DiffkernAttnAddedKVProcessor())
        got = attn(x, text, attention_mask=_key_mask(2, 5, keep=3))
        attn.set_processor(AttnAddedKVProcessor2_0())
        attn.norm_cross = None  # group-norm statistics would differ over 3 vs 5 tokens
        want = attn(x, text[:, :3])
        attn.set_processor(DiffkernAttnAddedKVProcessor())
        ours_short = attn(x, text[:, :3])
    assert (ours_short - want).abs().max() <= TOL * want.abs().max()
    assert got.shape == want.shape and torch.isfinite(got).all()


class _LoRALinear(torch.nn.Module):
    """base(x) + up(down(x)), the shape of a PEFT LoRA layer wrapping a projection."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base, self.calls = base, 0
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.5)

    def forward(self, x):
        self.calls += 1
        return self.base(x) + self.up(self.down(x))


def test_lora_wrapped_projections_are_called_as_modules():
    attn = _randomise(Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8))
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, _LoRALinear(getattr(attn, name)))
    attn.to_out[0] = _LoRALinear(attn.to_out[0])
    x, text = torch.randn(1, 8, 16), torch.randn(1, 5, 12)
    got, want = _both(attn, AttnProcessor2_0(), DiffkernAttnProcessor(), x, text)
    assert (got - want).abs().max() <= TOL * want.abs().max()
    assert all(getattr(attn, n).calls == 2 for n in ("to_q", "to_k", "to_v")) and attn.to_out[0].calls == 2


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("proc_pair", [(AttnProcessor2_0, DiffkernAttnProcessor),
                                       (AttnAddedKVProcessor2_0, DiffkernAttnAddedKVProcessor)])
def test_unknown_cross_attention_kwargs_warn_as_diffusers_does(proc_pair):
    reference, ours = proc_pair
    added = reference is AttnAddedKVProcessor2_0
    attn = _added_kv() if added else _randomise(Attention(query_dim=16, heads=2, dim_head=8))
    x = torch.randn(1, 16, 2, 2) if added else torch.randn(1, 4, 16)
    text = torch.randn(1, 3, 12) if added else None
    logger = logging.getLogger("diffusers.models.attention_processor")
    handler = _Capture()
    logger.addHandler(handler)
    try:
        with torch.no_grad():
            attn.set_processor(reference())
            want = attn(x, text, bogus_key=1.0)
            attn.set_processor(ours())
            got = attn(x, text, bogus_key=1.0)
            plain = attn(x, text)
    finally:
        logger.removeHandler(handler)
    warned = [m for m in handler.messages if "bogus_key" in m]
    assert len(warned) == 2
    assert warned[1] == warned[0].replace(reference.__name__, ours.__name__)
    assert torch.equal(got, plain) and (got - want).abs().max() <= TOL * want.abs().max()


def test_processors_take_no_arguments_and_fit_set_attn_processor():
    from tests.pipelines import tiny_unet

    unet = tiny_unet()
    unet.set_attn_processor(DiffkernAttnProcessor())  # diffusers' own API, as IP-Adapter loading uses it
    assert all(type(p) is DiffkernAttnProcessor for p in unet.attn_processors.values())


def test_unet_encoder_attention_mask_matches_diffusers():
    """The SD UNet's encoder_attention_mask (a (B, S) keep-mask) reaches the cross attention as
    diffusers prepares it."""
    from tests.pipelines import tiny_unet

    unet = tiny_unet()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor(7), torch.randn(2, 6, 32)
    mask = torch.ones(2, 6)
    mask[1, 2:] = 0
    with torch.no_grad():
        want = unet(x, t, text, encoder_attention_mask=mask).sample
        unmasked = unet(x, t, text).sample
        diffkern.patch(unet, norm=False)
        got = unet(x, t, text, encoder_attention_mask=mask).sample
    assert (want - unmasked).abs().max() > 1e-3  # the mask matters here
    assert (got - want).abs().max() <= TOL * max(1.0, want.abs().max())
