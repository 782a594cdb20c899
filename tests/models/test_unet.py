"""UNet2DConditionModel against diffusers' on tiny random-weight SD1, SD2 and LDM-text2im configurations."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkern.models import UNet2DConditionModel, from_diffusers  # noqa: E402

from ._helpers import BACKENDS, backend_context, check_backends, max_diff, randomise  # noqa: E402

TOL = 1e-4  # float32 end to end; the models differ only in summation order inside kernels

# The released configurations with their widths shrunk (and everything else kept).
CONFIGS = {
    # runwayml/stable-diffusion-v1-5: 8 heads everywhere, conv projections, 768-wide CLIP tokens.
    "sd1": dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=24, attention_head_dim=8),
    # stabilityai/stable-diffusion-2-1: per-level head counts (head width 64 there, 16 here), linear
    # projections, upcast attention.
    "sd2": dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=16, attention_head_dim=[2, 4, 4], use_linear_projection=True,
                upcast_attention=True),
    # CompVis/ldm-text2im-large-256: four levels, two layers each, 8 heads, 1280-wide LDM-BERT tokens.
    "ldm": dict(sample_size=8, block_out_channels=(16, 32, 32, 32), layers_per_block=2, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=40, attention_head_dim=8),
}
# Non-square latents, and sides that do not halve all the way down (so each upsampler is given its
# skip's size): 20x12 for the 4-level "ldm" (not multiples of 8), 18x10 and 13x7 for every config.
SIZES = [(16, 16), (24, 16), (20, 12), (18, 10), (13, 7)]


def _pair(name, seed=0):
    torch.manual_seed(seed)
    theirs = randomise(diffusers.UNet2DConditionModel(**CONFIGS[name]), seed)
    return theirs, from_diffusers(theirs)


def _inputs(cfg, size, batch=2, tokens=7):
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, cfg.get("in_channels", 4), *size, generator=gen)
    context = torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=gen)
    return sample, context


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name, size, backend, used_backends):
    theirs, ours = _pair(name)
    sample, context = _inputs(CONFIGS[name], size)
    timesteps = torch.tensor([999, 17])
    with torch.no_grad():
        want = theirs(sample, timesteps, context).sample
        with backend_context(backend):
            got = ours(sample, timesteps, context).sample
    assert got.shape == want.shape == sample.shape
    assert max_diff(got, want) < TOL
    check_backends(used_backends, backend)


@pytest.mark.parametrize("timestep",
                         [500, 500.5, torch.tensor(500), torch.tensor([500]), torch.tensor(250.25)],
                         ids=["int", "float", "0d", "1elem", "0d-float"])
def test_timestep_forms_broadcast_to_batch(timestep):
    theirs, ours = _pair("sd1")
    sample, context = _inputs(CONFIGS["sd1"], (16, 16))
    with torch.no_grad():
        want = theirs(sample, timestep, context).sample
        got = ours(sample, timestep, context).sample
        per_sample = ours(sample, torch.full((2,), float(timestep)), context).sample
    assert max_diff(got, want) < TOL
    assert max_diff(got, per_sample) < TOL


def test_state_dict_is_diffusers_exactly():
    theirs = diffusers.UNet2DConditionModel(**CONFIGS["ldm"])
    ours = UNet2DConditionModel(**CONFIGS["ldm"])
    want = {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == want
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


# The released configurations at full size, built on the meta device (no memory, no weights):
# keys and shapes must be diffusers', and the head widths those the checkpoints were trained with.
RELEASED = {
    "sd1": (dict(cross_attention_dim=768, sample_size=64), [40, 80, 160, 160]),
    "sd2": (dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                 sample_size=96), [64, 64, 64, 64]),
    "ldm": (dict(sample_size=32), [40, 80, 160, 160]),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_match_diffusers_layout(name):
    cfg, head_dims = RELEASED[name]
    with torch.device("meta"):
        theirs, ours = diffusers.UNet2DConditionModel(**cfg), UNet2DConditionModel(**cfg)
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in theirs.state_dict().items()})
    down = [b.attentions[0].transformer_blocks[0].attn1.dim_head for b in ours.down_blocks if b.attentions]
    up = [b.attentions[0].transformer_blocks[0].attn2.dim_head for b in ours.up_blocks if b.attentions]
    assert down == head_dims[:3] and up == head_dims[:3][::-1]
    assert ours.mid_block.attentions[0].transformer_blocks[0].attn1.dim_head == head_dims[3]


def test_from_config_and_properties():
    theirs = diffusers.UNet2DConditionModel(**CONFIGS["sd2"])
    ours = UNet2DConditionModel.from_config(theirs.config)  # carries "_class_name" and friends
    assert ours.config.attention_head_dim == [2, 4, 4] and ours.config["in_channels"] == 4
    assert ours.config.mid_block_type == "UNetMidBlock2DCrossAttn"  # a default, filled in
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    # SD2's head counts: 2, 4, 4 heads of width 16 at every level, up blocks mirrored.
    assert ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 2
    assert ours.up_blocks[2].attentions[0].transformer_blocks[0].attn2.dim_head == 16


def test_from_diffusers_keeps_dtype_and_mode():
    theirs = diffusers.UNet2DConditionModel(**CONFIGS["sd1"]).to(torch.bfloat16)
    ours = from_diffusers(theirs)
    assert ours.dtype == torch.bfloat16 and ours.training == theirs.training
    assert all(p.requires_grad for p in ours.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ours.parameters(), theirs.parameters()))


@pytest.mark.parametrize("option, value", [
    ("addition_embed_type", "image_hint"),
    ("class_embed_type", "not_a_kind"),
    ("dual_cross_attention", True),
    ("resnet_time_scale_shift", "spatial"),
    ("act_fn", "tanh"),
    ("time_embedding_type", "learned"),
    ("encoder_hid_dim_type", "image_proj"),
    ("down_block_types", ("KDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
    ("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D", "KUpBlock2D")),
    ("mid_block_type", "UNetMidBlock2DNope"),
])
def test_unsupported_options_name_themselves(option, value):
    with pytest.raises(ValueError, match=option):
        UNet2DConditionModel(**{**CONFIGS["sd1"], option: value})


def test_unknown_keys_follow_diffusers():
    """diffusers' constructor: an unknown keyword is a TypeError; from_config ignores unknown config keys
    (with diffusers' warning)."""
    with pytest.raises(TypeError, match="not_an_option"):
        UNet2DConditionModel(**CONFIGS["sd1"], not_an_option=1)
    unet = UNet2DConditionModel.from_config({**CONFIGS["sd1"], "not_an_option": 1})
    assert isinstance(unet, UNet2DConditionModel) and unet.config.in_channels == 4


def test_private_keys_are_ignored():
    UNet2DConditionModel(**CONFIGS["sd1"], _class_name="UNet2DConditionModel", _diffusers_version="0.42.1")


def test_from_diffusers_rejects_other_types_and_configs():
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="TimestepEmbedding"):
        from_diffusers(diffusers.models.embeddings.TimestepEmbedding(4, 8))
    theirs = diffusers.UNet2DConditionModel(**CONFIGS["sd1"], attention_type="gated")
    with pytest.raises(ValueError, match="attention_type"):
        from_diffusers(theirs)


def test_bad_inputs_raise_clearly():
    ours = UNet2DConditionModel(**CONFIGS["sd1"])
    sample, context = _inputs(CONFIGS["sd1"], (8, 8))
    with pytest.raises(ValueError, match="timestep"):
        ours(sample, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match="sample"):
        ours(sample[:, :3], 1, context)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(sample, 1, None)
