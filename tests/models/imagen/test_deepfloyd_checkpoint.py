"""Original DeepFloyd IF checkpoints (pytorch_model.bin + config.yml) -> diffusers layout.

The test writes tiny files in the original layout (deep-floyd/IF's UNetModel: input_blocks /
middle_block / output_blocks of ResBlocks and AttentionBlocks, qkv as a 1x1 conv1d grouped per head,
encoder_kv, encoder_pooling, aug_proj) from a random diffusers IF UNet, converts them back and checks
the config and every tensor; the original attention's math (per-head qkv split, encoder keys before
self keys) is recomputed here and must equal diffusers' attention on the converted weights.
"""

import pytest
import torch
import yaml

from diffkern.models.checkpoints.deepfloyd import convert_deepfloyd_unet, load_deepfloyd_unet

diffusers = pytest.importorskip("diffusers")

BASE_PARAMS = dict(image_size=16, in_channels=3, out_channels=6, model_channels=32, channel_mult="1,2",
                   num_res_blocks=1, attention_resolutions="8", num_head_channels=16, encoder_dim=24,
                   encoder_channels=32, att_pool_heads=2, activation="gelu", use_scale_shift_norm=True,
                   resblock_updown=True, dropout=0.0, precision="32")
BASE_CONFIG = dict(
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, attention_head_dim=16,
    encoder_hid_dim=24, cross_attention_norm="group_norm", addition_embed_type="text",
    addition_embed_type_num_heads=2, act_fn="gelu", resnet_time_scale_shift="scale_shift",
    time_embedding_dim=64)
SR_PARAMS = dict(BASE_PARAMS, in_channels=6, num_res_blocks="1,2", disable_self_attentions="8,16",
                 attention_resolutions="8,16", efficient_activation=True, scale_skip_connection=True)
SR_CONFIG = dict(
    BASE_CONFIG, in_channels=6, layers_per_block=[1, 2], class_embed_type="timestep",
    down_block_types=["SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D"], only_cross_attention=True,
    time_embedding_act_fn="gelu", resnet_skip_time_act=True, resnet_out_scale_factor=1 / 0.7071,
    mid_block_scale_factor=1 / 0.7071)

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _random_unet(config, seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**config)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return unet.eval()


def _heads(tensors, head_dim):
    """Original qkv / encoder_kv rows: per head [part_0 rows; part_1 rows; ...] (QKVAttention's view)."""
    heads = tensors[0].shape[0] // head_dim
    grouped = torch.cat([t.reshape(heads, head_dim, *t.shape[1:]) for t in tensors], dim=1)
    return grouped.reshape(-1, *tensors[0].shape[1:])


def _write_resnet(sd, new, old, out):
    for name, orig in _RESNET.items():
        for p in ("weight", "bias"):
            if f"{new}.{name}.{p}" in sd:
                out[f"{old}.{orig}.{p}"] = sd[f"{new}.{name}.{p}"]


def _write_attention(sd, new, old, out, head_dim, self_attention):
    parts = ["to_q", "to_k", "to_v"] if self_attention else ["to_q"]
    out[f"{old}.qkv.weight"] = _heads([sd[f"{new}.{p}.weight"] for p in parts], head_dim)[..., None]
    out[f"{old}.qkv.bias"] = _heads([sd[f"{new}.{p}.bias"] for p in parts], head_dim)
    kv = [sd[f"{new}.add_{p}_proj.weight"] for p in "kv"]
    out[f"{old}.encoder_kv.weight"] = _heads(kv, head_dim)[..., None]
    out[f"{old}.encoder_kv.bias"] = _heads([sd[f"{new}.add_{p}_proj.bias"] for p in "kv"], head_dim)
    for orig, name in (("norm", "group_norm"), ("norm_encoder", "norm_cross")):
        for p in ("weight", "bias"):
            out[f"{old}.{orig}.{p}"] = sd[f"{new}.{name}.{p}"]
    out[f"{old}.proj_out.weight"] = sd[f"{new}.to_out.0.weight"][..., None]
    out[f"{old}.proj_out.bias"] = sd[f"{new}.to_out.0.bias"]


def original_layout(unet, blocks, attn_levels, self_attention, head_dim):
    """The state dict deep-floyd/IF's UNetModel would hold, in its construction order."""
    sd, out = unet.state_dict(), {}
    renames = (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
               ("aug_proj.0", "class_embedding.linear_1"), ("aug_proj.2", "class_embedding.linear_2"),
               ("input_blocks.0.0", "conv_in"), ("encoder_proj", "encoder_hid_proj"),
               ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
               ("encoder_pooling.0", "add_embedding.norm1"),
               ("encoder_pooling.2", "add_embedding.proj"), ("encoder_pooling.3", "add_embedding.norm2"))
    for old, new in renames:
        for p in ("weight", "bias"):
            if f"{new}.{p}" in sd:
                out[f"{old}.{p}"] = sd[f"{new}.{p}"]
    for k, v in sd.items():
        if k.startswith("add_embedding.pool."):
            out["encoder_pooling.1." + k[len("add_embedding.pool."):]] = v
    levels, i = len(blocks), 1
    for level in range(levels):
        for j in range(blocks[level]):
            _write_resnet(sd, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0", out)
            if level in attn_levels:
                _write_attention(sd, f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1", out,
                                 head_dim, self_attention)
            i += 1
        if level < levels - 1:
            _write_resnet(sd, f"down_blocks.{level}.downsamplers.0", f"input_blocks.{i}.0", out)
            i += 1
    _write_resnet(sd, "mid_block.resnets.0", "middle_block.0", out)
    _write_attention(sd, "mid_block.attentions.0", "middle_block.1", out, head_dim, self_attention)
    _write_resnet(sd, "mid_block.resnets.1", "middle_block.2", out)
    i = 0
    for u, level in enumerate(reversed(range(levels))):
        for j in range(blocks[level] + 1):
            _write_resnet(sd, f"up_blocks.{u}.resnets.{j}", f"output_blocks.{i}.0", out)
            if level in attn_levels:
                _write_attention(sd, f"up_blocks.{u}.attentions.{j}", f"output_blocks.{i}.1", out, head_dim,
                                 self_attention)
            if level and j == blocks[level]:
                _write_resnet(sd, f"up_blocks.{u}.upsamplers.0",
                              f"output_blocks.{i}.{2 if level in attn_levels else 1}", out)
            i += 1
    return out


def _original_attention(orig, prefix, x, context, heads, self_attention):
    """deep-floyd/IF AttentionBlock.forward on original weights (written out here, not converted)."""
    b, c, h, w = x.shape
    gn = torch.nn.functional.group_norm
    wt = {k[len(prefix) + 1:]: v for k, v in orig.items() if k.startswith(prefix + ".")}
    conv1d = torch.nn.functional.conv1d
    h_in = gn(x, 32, wt["norm.weight"], wt["norm.bias"]).view(b, c, -1)
    qkv = conv1d(h_in, wt["qkv.weight"], wt["qkv.bias"])
    enc = gn(context.permute(0, 2, 1), 32, wt["norm_encoder.weight"], wt["norm_encoder.bias"])
    enc = conv1d(enc, wt["encoder_kv.weight"], wt["encoder_kv.bias"])
    ch = c // heads
    ek, ev = enc.reshape(b * heads, ch * 2, -1).split(ch, dim=1)
    if self_attention:
        q, k, v = qkv.reshape(b * heads, ch * 3, -1).split(ch, dim=1)
        k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
    else:
        (q,), k, v = qkv.reshape(b * heads, ch, -1).split(ch, dim=1), ek, ev
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / ch ** 0.5, dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    out = conv1d(a, wt["proj_out.weight"], wt["proj_out.bias"])
    return x + out.reshape(b, c, h, w)


@pytest.mark.parametrize("params, config, blocks, attn_levels, self_attention", [
    (BASE_PARAMS, BASE_CONFIG, [1, 1], {1}, True),
    (SR_PARAMS, SR_CONFIG, [1, 2], {0, 1}, False),
], ids=["stage-I", "stage-II"])
def test_original_checkpoint_converts(tmp_path, params, config, blocks, attn_levels, self_attention):
    unet = _random_unet(config)
    orig = original_layout(unet, blocks, attn_levels, self_attention, head_dim=16)
    torch.save(orig, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.yml").write_text(yaml.safe_dump({"params": params}))

    new_config, converted = convert_deepfloyd_unet(torch.load(tmp_path / "pytorch_model.bin"), params)
    rebuilt = diffusers.UNet2DConditionModel(**new_config)
    assert {k: v for k, v in rebuilt.config.items() if not k.startswith("_")} == \
        {k: v for k, v in unet.config.items() if not k.startswith("_")}
    assert sorted(converted) == sorted(unet.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in unet.state_dict().items())

    # The attention semantics: the original block's math on original weights == diffusers on converted ones.
    attn = unet.mid_block.attentions[0]
    x, context = torch.randn(2, 64, 8, 8), torch.randn(2, 5, 32)
    expected = _original_attention(orig, "middle_block.1", x, context, heads=4, self_attention=self_attention)
    assert (attn(x, encoder_hidden_states=context) - expected).abs().max() < 1e-4


def test_load_deepfloyd_unet_to_diffkern(tmp_path):
    unet = _random_unet(BASE_CONFIG)
    torch.save(original_layout(unet, [1, 1], {1}, True, 16), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.yml").write_text(yaml.safe_dump({"params": BASE_PARAMS}))
    ours = load_deepfloyd_unet(tmp_path)
    from diffkern.models import load

    assert type(load(tmp_path)) is type(ours)  # loading.load recognises the original folder layout
    x, t, text = torch.randn(1, 3, 16, 16), torch.tensor([500]), torch.randn(1, 7, 24)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=text).sample
        got = ours(x, t, encoder_hidden_states=text)
    got = got if isinstance(got, torch.Tensor) else got[0]
    assert (got - ref).abs().max() < 1e-4


def test_errors(tmp_path):
    unet = _random_unet(BASE_CONFIG)
    orig = original_layout(unet, [1, 1], {1}, True, 16)
    orig["input_blocks.9.0.in_layers.0.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match="does not place.*input_blocks.9"):
        convert_deepfloyd_unet(orig, BASE_PARAMS)
    del orig["input_blocks.9.0.in_layers.0.weight"], orig["middle_block.1.qkv.weight"]
    with pytest.raises(KeyError, match="middle_block.1.qkv.weight is missing"):
        convert_deepfloyd_unet(orig, BASE_PARAMS)
    with pytest.raises(ValueError, match="encoder_channels"):
        convert_deepfloyd_unet(orig, {k: v for k, v in BASE_PARAMS.items() if k != "encoder_channels"})
    with pytest.raises(FileNotFoundError, match="config.yml"):
        load_deepfloyd_unet(tmp_path)


def test_if_i_xl_config_has_its_4_3b_parameters():
    """IF-I-XL's config.yml (704 ch x (1, 2, 3, 4), 3 resnets, attention at 32/16/8, head 64, T5 4096 ->
    2816, 64-head pooling) through the converter: the released 4.3B, counted on the meta device."""
    from diffkern.models import UNet2DConditionModel
    from diffkern.models.checkpoints.deepfloyd import convert_deepfloyd_config

    params = dict(image_size=64, in_channels=3, out_channels=6, model_channels=704, channel_mult="1,2,3,4",
                  num_res_blocks=3, attention_resolutions="32,16,8", num_head_channels=64, encoder_dim=4096,
                  encoder_channels=2816, att_pool_heads=64, activation="gelu", use_scale_shift_norm=True,
                  resblock_updown=True, efficient_activation=True, scale_skip_connection=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**convert_deepfloyd_config(params))
    assert abs(sum(p.numel() for p in unet.parameters()) / 4.3e9 - 1) < 0.01


# ------------------------------------------------------------------------------------------------
# Every config form IF's own UNetModel reads, against IF's own model ($IF_SRC or the extracted reference)
# ------------------------------------------------------------------------------------------------

def _if_unet_class():
    import os
    import sys
    from pathlib import Path

    for src in (os.environ.get("IF_SRC"), "/work/ext/deep-floyd+IF"):
        if src and (Path(src) / "deepfloyd_if" / "model" / "unet.py").is_file():
            if src not in sys.path:
                sys.path.insert(0, src)
            from deepfloyd_if.model.unet import UNetModel

            return UNetModel
    pytest.skip("DeepFloyd IF's code is not importable (set IF_SRC to a deep-floyd/IF checkout)")


TINY = dict(image_size=16, in_channels=3, out_channels=6, model_channels=32, num_res_blocks=1, encoder_dim=24,
            encoder_channels=32, att_pool_heads=2, use_scale_shift_norm=True, resblock_updown=True)


@pytest.mark.parametrize("params", [
    # a list of attention_resolutions is read as downsample factors; num_heads (not num_head_channels) with
    # head widths that change per level; gelu_jit (tanh GELU); disable_self_attentions=True with a list
    dict(TINY, channel_mult=[1, 2, 3], attention_resolutions=[2, 4], num_heads=2, activation="gelu_jit",
         disable_self_attentions=True, efficient_activation=True, scale_skip_connection=True),
    # a string of resolutions; disable_self_attentions=True with a string disables nothing in IF's code
    dict(TINY, channel_mult="1,2", attention_resolutions="8", num_head_channels=8, activation="silu",
         disable_self_attentions=True),
    # disable_self_attentions as a list of downsample factors, per-level res blocks, IF's default channel_mult
    dict(TINY, num_res_blocks=[1, 2, 1, 1], attention_resolutions="8,4,2", num_head_channels=8,
         activation="gelu", disable_self_attentions=[4, 8]),
], ids=["list-ds-num_heads-gelu_jit", "str-res-silu", "disable-list-default-mult"])
def test_config_forms_match_ifs_own_unet(tmp_path, params):
    UNetModel = _if_unet_class()
    torch.manual_seed(0)
    ref = UNetModel(**params).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.yml").write_text(yaml.safe_dump({"params": params}))
    ours = load_deepfloyd_unet(tmp_path)
    size = params["image_size"]
    x, t, text = torch.randn(2, 3, size, size), torch.tensor([10, 700]), torch.randn(2, 5, 24)
    with torch.no_grad():
        want = ref(x, t, text)
        got = ours(x, t, encoder_hidden_states=text)
    got = got if isinstance(got, torch.Tensor) else got[0]
    assert (got - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())


def test_hostile_config_files_are_checkpoint_errors_naming_the_file(tmp_path):
    from diffkern.models import CheckpointError, load

    UNetModel = _if_unet_class()
    params = dict(TINY, channel_mult="1,2", attention_resolutions="8", num_head_channels=8, activation="gelu")
    torch.manual_seed(0)
    torch.save(UNetModel(**params).state_dict(), tmp_path / "pytorch_model.bin")
    cases = [
        ("- just\n- a list\n", "expected a `params:` mapping"),
        ("params: [1, 2\n", "cannot read the YAML file"),
        (yaml.safe_dump({"params": dict(params, num_head_channels=0)}), "num_head_channels must be positive"),
        (yaml.safe_dump({"params": dict(params, attention_resolutions="0")}), "attention_resolutions must be positive"),
        (yaml.safe_dump({"params": dict(params, num_res_blocks="abc")}), "'abc' is not an integer"),
        (yaml.safe_dump({"params": dict(params, widht=3)}), "unknown UNet argument(s) widht"),
        (yaml.safe_dump({"params": dict(params, activation="swishy")}), "activation 'swishy' is not supported"),
        (yaml.safe_dump({"params": dict(params, num_head_channels=-1, num_heads=3)}), "not divisible by num_heads"),
        # q only where self-attention is disabled, but the file has q, k and v
        (yaml.safe_dump({"params": dict(params, disable_self_attentions="8")}), "do not fit the config.yml's UNet"),
        (yaml.safe_dump({"params": {k: v for k, v in params.items() if k != "att_pool_heads"}}), "att_pool_heads"),
    ]
    for text, expected in cases:
        (tmp_path / "config.yml").write_text(text)
        for loader in (load_deepfloyd_unet, load):
            with pytest.raises(CheckpointError) as err:
                loader(tmp_path)
            assert expected in str(err.value) and ("config.yml" in str(err.value) or str(tmp_path) in str(err.value)), \
                (text, str(err.value))
    (tmp_path / "config.yml").write_text(yaml.safe_dump({"params": params}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read"):
        load_deepfloyd_unet(tmp_path)
