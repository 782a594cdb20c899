"""AutoencoderKL against diffusers' on tiny random-weight configurations."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkern.models import AutoencoderKL, DiagonalGaussianDistribution, from_diffusers  # noqa: E402

from ._helpers import BACKENDS, backend_context, check_backends, max_diff, randomise  # noqa: E402

TOL = 1e-4  # float32 end to end


def _not_saturated(images, low=0.0, high=1.0):
    """Most values inside (low, high): at random weights a pipeline's output can clamp everywhere, and
    a parity check on clamped pixels would prove nothing."""
    t = torch.as_tensor(images)
    margin = 0.01 * (high - low)
    assert ((t > low + margin) & (t < high - margin)).double().mean() > 0.5


def _close(got, want):
    """Within TOL, relative to the output's scale where it exceeds 1: var = exp(logvar) reaches the
    tens on random weights, and float32 rounding grows with it."""
    return max_diff(got, want) < TOL * max(1.0, want.abs().max().item())

CONFIGS = {
    # The SD / LDM-text2im autoencoder (f=8, 4 latent channels), widths shrunk.
    "sd": dict(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
               norm_num_groups=4, sample_size=32),
    # Variants: no attention in the mid blocks, no quant convs, 3 latent channels, f=2.
    "plain": dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=3,
                  norm_num_groups=8, mid_block_add_attention=False, use_quant_conv=False,
                  use_post_quant_conv=False),
}
SIZES = [(32, 32), (24, 40), (17, 11)]  # the last is odd: the encoder's asymmetric padding shows


def _pair(name, seed=0):
    torch.manual_seed(seed)
    theirs = randomise(diffusers.AutoencoderKL(**CONFIGS[name]), seed)
    return theirs, from_diffusers(theirs)


def _ops_used(name):
    with_attention = CONFIGS[name].get("mid_block_add_attention", True)
    return ("group_norm", "attention") if with_attention else ("group_norm",)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_matches_diffusers(name, size, backend, used_backends):
    theirs, ours = _pair(name)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs.encode(x).latent_dist
        with backend_context(backend):
            got = ours.encode(x).latent_dist
    assert got.mean.shape == want.mean.shape
    for attr in ("mean", "logvar", "std", "var"):
        assert _close(getattr(got, attr), getattr(want, attr)), attr
    assert _close(got.mode(), want.mode())
    assert _close(got.kl(), want.kl())
    # The same generator state draws the same noise, so the same latents.
    sample_want = want.sample(torch.Generator().manual_seed(7))
    assert _close(got.sample(torch.Generator().manual_seed(7)), sample_want)
    check_backends(used_backends, backend, _ops_used(name))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(4, 4), (3, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_diffusers(name, size, backend, used_backends):
    theirs, ours = _pair(name)
    z = torch.randn(2, CONFIGS[name]["latent_channels"], *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs.decode(z).sample
        with backend_context(backend):
            got = ours.decode(z).sample
    assert got.shape == want.shape
    assert _close(got, want)
    check_backends(used_backends, backend, _ops_used(name))


def test_forward_and_generator_list_match_diffusers():
    theirs, ours = _pair("sd")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _close(ours(x).sample, theirs(x).sample)
        gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
        want = theirs(x, sample_posterior=True, generator=gens()).sample
        assert _close(ours(x, sample_posterior=True, generator=gens()).sample, want)
        assert _close(ours(x, return_dict=False)[0], theirs(x).sample)


def test_posterior_clamps_logvar_like_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Theirs

    moments = torch.randn(2, 8, 3, 3) * 40  # far outside [-30, 20] in places
    ours, theirs = DiagonalGaussianDistribution(moments), Theirs(moments)
    assert ours.logvar.min() == -30 and ours.logvar.max() == 20
    for attr in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, attr), getattr(theirs, attr))
    other = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3))
    torch.testing.assert_close(ours.kl(other), theirs.kl(Theirs(other.parameters)))
    torch.testing.assert_close(ours.nll(moments[:, :4]), theirs.nll(moments[:, :4]))
    zero = DiagonalGaussianDistribution(moments, deterministic=True)
    assert torch.equal(zero.sample(), zero.mean) and not zero.kl().any()


def test_state_dict_is_diffusers_exactly():
    for name in CONFIGS:
        theirs, ours = diffusers.AutoencoderKL(**CONFIGS[name]), AutoencoderKL(**CONFIGS[name])
        want = {k: v.shape for k, v in theirs.state_dict().items()}
        assert {k: v.shape for k, v in ours.state_dict().items()} == want
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.load_state_dict(ours.state_dict(), strict=True)


def test_released_sd_vae_matches_diffusers_layout():
    # stabilityai/sd-vae-ft-mse and the SD1/SD2/LDM autoencoders, full size, on the meta device.
    cfg = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=256)
    with torch.device("meta"):
        theirs, ours = diffusers.AutoencoderKL(**cfg), AutoencoderKL(**cfg)
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in theirs.state_dict().items()})
    assert ours.encoder.mid_block.attentions[0].heads == 1  # one head of width 512


def test_from_config_and_properties():
    theirs = diffusers.AutoencoderKL(**CONFIGS["sd"], scaling_factor=0.5)
    ours = AutoencoderKL.from_config(theirs.config)
    assert ours.config.scaling_factor == 0.5 and ours.config.shift_factor is None
    assert AutoencoderKL().config.scaling_factor == 0.18215  # diffusers' default, the SD1 value
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert from_diffusers(theirs.to(torch.float16)).dtype == torch.float16


@pytest.mark.parametrize("option, value", [
    ("down_block_types", ("AttnDownEncoderBlock2D",)),
    ("up_block_types", ("AttnUpDecoderBlock2D",)),
    ("act_fn", "gelu"),
    ("norm_num_groups", 24),
])
def test_unsupported_options_name_themselves(option, value):  # (an unknown keyword: diffusers' TypeError)
    with pytest.raises(ValueError, match=option):
        AutoencoderKL(**{option: value})


def test_bad_inputs_and_types_raise_clearly():
    ours = AutoencoderKL(**CONFIGS["plain"])
    with pytest.raises(ValueError, match="x must be"):
        ours.encode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="z must be"):
        ours.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(TypeError, match="AutoencoderKL"):
        from_diffusers(diffusers.VQModel(block_out_channels=(32,), norm_num_groups=8))


def test_outputs_are_diffusers_shaped():
    ours = AutoencoderKL(**CONFIGS["plain"]).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        enc, enc_tuple = ours.encode(x), ours.encode(x, return_dict=False)
        dec = ours.decode(enc.latent_dist.mode())
        dec_tuple = ours.decode(enc.latent_dist.mode(), return_dict=False)
    assert type(enc).__name__ == "AutoencoderKLOutput" and enc[0] is enc["latent_dist"] is enc.latent_dist
    assert isinstance(enc_tuple, tuple) and isinstance(enc_tuple[0], DiagonalGaussianDistribution)
    assert type(dec).__name__ == "DecoderOutput" and dec[0] is dec.sample and torch.equal(dec_tuple[0], dec.sample)
    assert ours.config.force_upcast is True  # carried for the pipelines that read it


# Tiles of sample_size 16 pixels (4 latents at f=4) over 40x28 images: several rows and columns of
# overlapping tiles, blended, with ragged last tiles.
TILED = dict(CONFIGS["sd"], block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, sample_size=16)


@pytest.mark.parametrize("slicing", [False, True])
def test_tiling_and_slicing_match_diffusers(slicing):
    torch.manual_seed(0)
    theirs = randomise(diffusers.AutoencoderKL(**TILED), 0)
    ours = from_diffusers(theirs)
    for m in (theirs, ours):
        m.enable_tiling()
        if slicing:
            m.enable_slicing()
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, 3, 40, 28, generator=g), torch.randn(2, 4, 10, 7, generator=g)
    with torch.no_grad():
        want_enc, got_enc = theirs.encode(x).latent_dist, ours.encode(x).latent_dist
        want_dec, got_dec = theirs.decode(z).sample, ours.decode(z).sample
        ours.disable_tiling()
        ours.disable_slicing()
        untiled = ours.decode(z).sample
    assert _close(got_enc.mean, want_enc.mean) and _close(got_enc.logvar, want_enc.logvar)
    assert got_dec.shape == want_dec.shape == (2, 3, 40, 28) and _close(got_dec, want_dec)
    assert max_diff(untiled, got_dec) > 1e-3  # tiling really ran (its seams differ from one pass)


def test_slicing_alone_changes_nothing():
    theirs, ours = _pair("sd")
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = ours.decode(z).sample
        ours.enable_slicing()
        sliced = ours.decode(z).sample
    assert _close(sliced, whole)


@pytest.mark.parametrize("tiling", [False, True])
def test_in_a_diffusers_img2img_pipeline_gives_the_same_images(tmp_path, tiling):
    """encode(...).latent_dist.sample(generator) and decode(..., return_dict=False) as diffusers calls them."""
    from tests.pipelines import SD_SCHEDULER_CONFIG, clip_tokenizer, tiny_clip, tiny_unet, tiny_vae

    tok = clip_tokenizer(tmp_path / "tok")
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=randomise(tiny_vae(), 3), text_encoder=tiny_clip(len(tok)), tokenizer=tok, unet=tiny_unet(),
        scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if tiling:  # 48x48 pixels over 32-pixel tiles
        pipe.vae.enable_tiling()
    image = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    args = dict(prompt="a photo of a cat", image=image, strength=0.6, num_inference_steps=4, output_type="pt")
    want = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    _not_saturated(want)
    pipe.vae = from_diffusers(pipe.vae)
    assert pipe.vae.use_tiling == tiling  # the switch carries over
    got = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    assert max_diff(got, want) < 1e-4
