"""save_pretrained / from_pretrained across diffkern and diffusers: a folder written by one loads in the other
and gives the same output (the models stand on diffusers' ModelMixin / ConfigMixin)."""

import json

import diffusers
import pytest
import torch
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel as TheirTextProj

import diffkern.models as models

from ._helpers import max_diff, randomise

UNET = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, cross_attention_dim=8,
            attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
VAE = dict(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, sample_size=16,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
UNET_2D = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, in_channels=6,
               down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2,
               mid_block_type=None, resnet_time_scale_shift="scale_shift", sample_size=8)
UNET_2D_ATTN = dict(block_out_channels=(4, 8), norm_num_groups=2, attention_head_dim=3, layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    sample_size=8)  # diffusers' DDPM layout; 8 channels / head_dim 3 = 2 heads, inner width 6
PRIOR = dict(num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=8, num_embeddings=5,
             additional_embeddings=4)
TEXT_PROJ = dict(clip_embeddings_dim=8, time_embed_dim=12, cross_attention_dim=6, clip_extra_context_tokens=2)


def _inputs(name, gen):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    if name == "unet":
        return dict(sample=r(2, 4, 8, 8), timestep=torch.tensor([7, 500]), encoder_hidden_states=r(2, 3, 8))
    if name == "vae":
        return dict(sample=r(2, 3, 16, 16))
    if name == "unet_2d":
        return dict(sample=r(2, 6, 8, 8), timestep=torch.tensor([7, 500]))
    if name == "unet_2d_attn":
        return dict(sample=r(2, 3, 8, 8), timestep=torch.tensor([7, 500]))
    if name == "prior":
        return dict(hidden_states=r(2, 8), timestep=torch.tensor([3, 900]), proj_embedding=r(2, 8),
                    encoder_hidden_states=r(2, 5, 8), attention_mask=torch.tensor([[1, 1, 1, 0, 0]] * 2).bool())
    return dict(image_embeddings=r(2, 8), prompt_embeds=r(4, 8), text_encoder_hidden_states=r(4, 3, 8),
                do_classifier_free_guidance=True)


CASES = {  # name: (diffkern class, diffusers class, config)
    "unet": (models.UNet2DConditionModel, diffusers.UNet2DConditionModel, UNET),
    "vae": (models.AutoencoderKL, diffusers.AutoencoderKL, VAE),
    "unet_2d": (models.UNet2DModel, diffusers.UNet2DModel, UNET_2D),
    "unet_2d_attn": (models.UNet2DModel, diffusers.UNet2DModel, UNET_2D_ATTN),
    "prior": (models.PriorTransformer, diffusers.PriorTransformer, PRIOR),
    "text_proj": (models.UnCLIPTextProjModel, TheirTextProj, TEXT_PROJ),
}


def _public(config):
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def _run(model, name):
    with torch.no_grad():
        out = model(**_inputs(name, torch.Generator().manual_seed(1)))
    return [t for t in (out.to_tuple() if hasattr(out, "to_tuple") else out)]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("direction", ["diffkern->diffusers", "diffusers->diffkern"])
def test_save_in_one_load_in_the_other(name, direction, tmp_path):
    ours_cls, theirs_cls, config = CASES[name]
    writer, reader = (ours_cls, theirs_cls) if direction == "diffkern->diffusers" else (theirs_cls, ours_cls)
    torch.manual_seed(0)
    saved = randomise(writer(**config), seed=3)
    saved.save_pretrained(tmp_path)
    loaded = reader.from_pretrained(tmp_path).eval()
    assert type(loaded) is reader and _public(loaded.config) == _public(saved.config)
    expected, got = _run(saved, name), _run(loaded, name)
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.shape == b.shape and max_diff(a, b) < 1e-5, name
    if name not in ("vae", "text_proj"):  # outputs are diffusers' classes (VAE: DecoderOutput, checked below)
        assert type(_out(loaded, name)).__module__.startswith("diffusers.")


def _out(model, name):
    with torch.no_grad():
        return model(**_inputs(name, torch.Generator().manual_seed(1)))


def test_outputs_are_diffusers_classes():
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
    from diffusers.models.transformers.prior_transformer import PriorTransformerOutput
    from diffusers.models.unets.unet_2d import UNet2DOutput
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    torch.manual_seed(0)
    expected = dict(unet=UNet2DConditionOutput, vae=DecoderOutput, unet_2d=UNet2DOutput, prior=PriorTransformerOutput)
    for name, cls in expected.items():
        out = _out(CASES[name][0](**CASES[name][2]).eval(), name)
        assert type(out) is cls and list(out.values())[0] is out[0]
    vae = models.AutoencoderKL(**VAE)
    assert type(vae.encode(torch.randn(1, 3, 16, 16))) is AutoencoderKLOutput


def test_variant_dtype_and_shards(tmp_path):
    """diffusers' own loading options on a diffkern model: variant, torch_dtype, sharded safetensors."""
    torch.manual_seed(0)
    unet = randomise(models.UNet2DConditionModel(**UNET))
    unet.save_pretrained(tmp_path / "v", variant="fp16")
    assert (tmp_path / "v" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = models.UNet2DConditionModel.from_pretrained(tmp_path / "v", variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and isinstance(half, models.UNet2DConditionModel)
    with pytest.raises(OSError):
        models.UNet2DConditionModel.from_pretrained(tmp_path / "v")  # no plain file: diffusers' error
    unet.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    assert (tmp_path / "s" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sharded = models.UNet2DConditionModel.from_pretrained(tmp_path / "s").eval()
    a, b = _run(unet, "unet")[0], _run(sharded, "unet")[0]
    assert max_diff(a, b) == 0.0


def test_unknown_and_unsupported_options():
    with pytest.raises(TypeError, match="not_an_option"):
        models.AutoencoderKL(not_an_option=1)
    with pytest.raises(ValueError, match="act_fn"):
        models.AutoencoderKL(act_fn="gelu")
    with pytest.raises(ValueError, match="time_embedding_type"):
        models.UNet2DModel(**dict(UNET_2D, time_embedding_type="fourier"))
    with pytest.raises(ValueError, match="norm_in_type"):
        models.PriorTransformer(**dict(PRIOR, norm_in_type="group"))
    with pytest.raises(TypeError, match="time_embed_dim"):
        models.UnCLIPTextProjModel(cross_attention_dim=4)  # diffusers' required keyword


def test_constructor_signatures_are_diffusers():
    """Same argument names, order, kinds and defaults as diffusers' constructors (so configs mean the same)."""
    import inspect

    for name, (ours, theirs, _) in CASES.items():
        a, b = (inspect.signature(c.__init__).parameters for c in (ours, theirs))
        assert [(p.name, p.kind, p.default) for p in a.values()] == \
               [(p.name, p.kind, p.default) for p in b.values()], name
