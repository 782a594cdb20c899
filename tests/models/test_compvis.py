"""CompVis <-> diffusers key conversion, checked against diffusers' own single-file converters.

The external truth: a CompVis state dict made by our unet_to_compvis / vae_to_compvis from a tiny
diffusers model must convert back to the original through diffusers' convert_ldm_unet_checkpoint /
convert_ldm_vae_checkpoint (so our CompVis layout is the real one), and through ours.
"""

import pytest
import torch

from diffkern.models import compvis, compvis_text
from diffkern.models.compvis import CheckpointError
from tests.models._helpers import randomise

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")


def tiny_unet(linear=False, layers=1, in_channels=4, levels=2, seed=0):
    """SD 1.x-style (conv projections, 8 heads) or SD 2.x-style (linear, 64-channel heads) UNet:
    attention at every level but the last, as in SD."""
    torch.manual_seed(seed)
    channels = ([64] * (levels - 1) + [128]) if linear else ([32] * (levels - 1) + [64])
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=layers,
        block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1), cross_attention_dim=64,
        attention_head_dim=[c // 64 for c in channels] if linear else 8, use_linear_projection=linear)
    return randomise(unet, seed)


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  layers_per_block=1)
    return randomise(vae, seed)


def tiny_clip(layers=2, act="quick_gelu", seed=0):
    """A CLIPTextModel whose shapes follow the real ones' rules (64-channel heads)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=60, hidden_size=64, intermediate_size=96, num_attention_heads=1,
                            num_hidden_layers=layers, max_position_embeddings=16, hidden_act=act,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return randomise(CLIPTextModel(config), seed)


def text_model_keys(sd):
    """CLIPTextModel keys as the files store them (transformers >= 5.6 dropped the text_model. level)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


def openclip_layout(clip_sd, extra_layer=True):
    """The SD 2.x OpenCLIP layout (cond_stage_model.model.*, fused qkv) of a CLIPTextModel state dict,
    with one more residual block at the end (SD 2.x reads the penultimate; the last is dropped)."""
    sd = text_model_keys(clip_sd)
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": torch.randn(64, 32), "logit_scale": torch.tensor(4.6)}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in range(layers + (1 if extra_layer else 0)):
        src, dst = f"text_model.encoder.layers.{min(i, layers - 1)}.", f"transformer.resblocks.{i}."
        # the extra block gets fresh random weights: reading it would change every output
        fill = torch.randn_like if i == layers else (lambda t: t)
        for kind in ("weight", "bias"):
            qkv = torch.cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.in_proj_{kind}"] = fill(qkv)
            for ours, theirs in names.items():
                out[dst + f"{theirs}.{kind}"] = fill(sd[f"{src}{ours}.{kind}"])
    return out


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("linear", [False, True], ids=["sd1_conv", "sd2_linear"])
def test_unet_round_trip_matches_diffusers_converter(linear):
    unet = tiny_unet(linear=linear, layers=2, levels=3)
    sd, config = unet.state_dict(), dict(unet.config)
    cv = compvis.unet_to_compvis(sd, config)
    assert "input_blocks.1.0.in_layers.0.weight" in cv and "input_blocks.3.0.op.weight" in cv
    # upsample conv: right after the ResBlock on a level without attention, after the transformer else
    assert "output_blocks.2.1.conv.weight" in cv and "output_blocks.5.2.conv.weight" in cv
    stored = {compvis.UNET_PREFIX + k: v for k, v in cv.items()}
    theirs = single_file_utils.convert_ldm_unet_checkpoint(stored, config)
    assert same(theirs, sd)
    assert same(compvis.unet_from_compvis(cv, config), sd)


@pytest.mark.parametrize("linear", [False, True], ids=["sd1_conv", "sd2_linear"])
def test_infer_unet_config_from_tensors(linear):
    unet = tiny_unet(linear=linear, layers=2, in_channels=9, levels=3)
    cv = compvis.unet_to_compvis(unet.state_dict(), dict(unet.config))
    config = compvis.infer_unet_config(cv)
    for key in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim",
                "use_linear_projection"):
        assert config[key] == unet.config[key], key
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        assert list(config[key]) == list(unet.config[key]), key
    assert config["attention_head_dim"] == ([1, 1, 2] if linear else 8)
    assert config["transformer_layers_per_block"] == 1


def test_infer_unet_config_head_options():
    cv = compvis.unet_to_compvis(tiny_unet().state_dict(), dict(tiny_unet().config))
    assert compvis.infer_unet_config(cv, num_heads=4)["attention_head_dim"] == 4
    assert compvis.infer_unet_config(cv, head_channels=32)["attention_head_dim"] == [1, 2]
    with pytest.raises(ValueError, match="num_heads"):
        compvis.infer_unet_config(cv, num_heads=5)
    with pytest.raises(ValueError, match="not both"):
        compvis.infer_unet_config(cv, num_heads=8, head_channels=64)
    del cv["out.2.weight"]
    with pytest.raises(CheckpointError, match="out.2.weight"):
        compvis.infer_unet_config(cv)


def test_vae_round_trip_matches_diffusers_converter():
    vae = tiny_vae()
    sd = vae.state_dict()
    cv = compvis.vae_to_compvis(sd)
    assert cv["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # CompVis uses 1x1 convs
    assert "decoder.up.1.upsample.conv.weight" in cv and "decoder.up.0.upsample.conv.weight" not in cv
    assert "encoder.down.1.block.0.nin_shortcut.weight" in cv
    theirs = single_file_utils.convert_ldm_vae_checkpoint({compvis.VAE_PREFIX + k: v for k, v in cv.items()},
                                                          dict(vae.config))
    assert same(theirs, sd)
    assert same(compvis.vae_from_compvis(cv), sd)
    config = compvis.infer_vae_config(cv)
    for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
        assert config[key] == vae.config[key], key
    assert list(config["block_out_channels"]) == list(vae.config.block_out_channels)


def test_clip_from_compvis_drops_position_ids():
    sd = text_model_keys(tiny_clip().state_dict())
    stored = dict(sd, **{"text_model.embeddings.position_ids": torch.arange(16)[None]})
    assert same(compvis_text.clip_from_compvis(stored), sd)
    config = compvis_text.infer_clip_config(sd)
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 1)
    assert config["hidden_act"] == "quick_gelu"


def test_openclip_split_and_penultimate_layer_match_diffusers_converter():
    clip = tiny_clip(layers=2, act="gelu")
    expected = text_model_keys(clip.state_dict())
    cv = openclip_layout(clip.state_dict())  # 3 residual blocks: the last must be dropped
    ours = compvis_text.openclip_from_compvis(cv)
    assert same(ours, expected)
    theirs = single_file_utils.convert_open_clip_checkpoint(
        clip, {compvis.OPENCLIP_PREFIX + k: v for k, v in cv.items()}, prefix=compvis.OPENCLIP_PREFIX)
    theirs = text_model_keys(theirs)
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())
    config = compvis_text.infer_openclip_config(ours)
    assert config["num_hidden_layers"] == 2 and config["hidden_act"] == "gelu"
    last = compvis_text.openclip_from_compvis(cv, layer="last")
    assert len([k for k in last if k.endswith("q_proj.weight")]) == 3


def test_split_checkpoint_routes_and_ignores():
    sd = {"model.diffusion_model.out.2.weight": 1, "first_stage_model.quant_conv.weight": 2,
          "cond_stage_model.transformer.text_model.final_layer_norm.weight": 3, "betas": 4,
          "model_ema.decay": 5, "first_stage_model.loss.logvar": 6, "something.else": 7}
    parts = compvis.split_checkpoint(sd)
    assert parts["unet"] == {"out.2.weight": 1} and parts["vae"] == {"quant_conv.weight": 2}
    assert parts["clip"] == {"text_model.final_layer_norm.weight": 3} and "openclip" not in parts
    assert set(parts["ignored"]) == {"betas", "model_ema.decay", "first_stage_model.loss.logvar"}
    assert parts["unknown"] == {"something.else": 7}


def test_unmapped_keys_strict_and_lenient():
    unet = tiny_unet()
    cv = compvis.unet_to_compvis(unet.state_dict(), dict(unet.config))
    cv["input_blocks.99.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="input_blocks.99.0.weight"):
        compvis.unet_from_compvis(cv, dict(unet.config))
    lenient = compvis.unet_from_compvis(cv, dict(unet.config), strict=False)
    assert "input_blocks.99.0.weight" in lenient
    assert compvis.unet_compvis_name("down_blocks.0.resnets.0.norm1.weight", dict(unet.config)) == \
        "input_blocks.1.0.in_layers.0.weight"


# The released configs (diffusers' unet/config.json of SD 1.5 and SD 2.1), built on the meta device:
# full-size shapes at no memory cost.
SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)
SD21 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True)


@pytest.mark.parametrize("released", [SD15, SD21], ids=["sd15", "sd21"])
def test_full_size_config_inferred(released):
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**released)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
    cv = compvis.unet_to_compvis(unet.state_dict(), dict(unet.config))
    # names every released SD 1.x / 2.x checkpoint has
    for key in ("input_blocks.11.0.emb_layers.1.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                "middle_block.1.proj_in.weight"):
        assert key in cv, key
    config = compvis.infer_unet_config(cv, sample_size=released["sample_size"])
    assert {k: config[k] for k in released} == released
    assert config["block_out_channels"] == [320, 640, 1280, 1280] and config["layers_per_block"] == 2
    assert config["down_block_types"] == list(unet.config.down_block_types)
    assert config["up_block_types"] == list(unet.config.up_block_types)
    vae_cv = compvis.vae_to_compvis(vae.state_dict())
    assert "decoder.up.3.upsample.conv.weight" in vae_cv and "decoder.up.0.block.2.conv1.weight" in vae_cv
    assert compvis.infer_vae_config(vae_cv)["block_out_channels"] == [128, 256, 512, 512]
