"""create_model(**options): GLIDE's models from OpenAI's option names and released defaults.

    options = model_and_diffusion_defaults()            # base.pt / base_inpaint.pt (with inpaint=True)
    options = model_and_diffusion_defaults_upsampler()  # upsample.pt / upsample_inpaint.pt
    model = create_model(**options)
    model.load_state_dict(torch.load("base.pt"))         # OpenAI's keys, unchanged

The option dictionaries are OpenAI's (glide_text2im/model_creation.py); the diffusion options
(diffusion_steps, noise_schedule, timestep_respacing) are accepted so that the same dictionary can
be passed, and ignored here: diffkern.schedulers builds the diffusion.
"""

from __future__ import annotations

from diffkern.models.glide.unet import GLIDE_N_VOCAB, Text2ImUNet

DIFFUSION_OPTIONS = ("diffusion_steps", "noise_schedule", "timestep_respacing")

# Default channel multipliers per image size when channel_mult is "" (OpenAI's table).
DEFAULT_CHANNEL_MULT = {
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def model_and_diffusion_defaults():
    """The options of GLIDE (filtered)'s released 64x64 base model (base.pt; base_inpaint.pt with
    inpaint=True)."""
    return dict(
        image_size=64,
        num_channels=192,
        num_res_blocks=3,
        channel_mult="",
        num_heads=1,
        num_head_channels=64,
        num_heads_upsample=-1,
        attention_resolutions="32,16,8",
        dropout=0.1,
        text_ctx=128,
        xf_width=512,
        xf_layers=16,
        xf_heads=8,
        xf_final_ln=True,
        xf_padding=True,
        diffusion_steps=1000,
        noise_schedule="squaredcos_cap_v2",
        timestep_respacing="",
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_fp16=True,
        cache_text_emb=False,
        inpaint=False,
        super_res=False,
    )


def model_and_diffusion_defaults_upsampler():
    """The options of the released 64 -> 256 upsampler (upsample.pt; upsample_inpaint.pt with
    inpaint=True): the base options with image_size 256, num_res_blocks 2, the linear noise
    schedule and super_res."""
    options = model_and_diffusion_defaults()
    options.update(image_size=256, num_res_blocks=2, noise_schedule="linear", super_res=True)
    return options


def _channel_mult(channel_mult, image_size):
    if channel_mult in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"create_model: image_size {image_size} has no default channel_mult "
                             f"(choose from {sorted(DEFAULT_CHANNEL_MULT)} or give channel_mult)")
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, str):
        try:
            mult = tuple(int(m) for m in channel_mult.split(","))
        except ValueError:
            raise ValueError(f"create_model: channel_mult must be comma-separated integers like '1,2,3,4', "
                             f"got {channel_mult!r}") from None
    else:
        mult = tuple(int(m) for m in channel_mult)
    # OpenAI's rule: the lowest resolution of the UNet is 8 px (2 ** (levels + 2) == image_size).
    if 2 ** (len(mult) + 2) != image_size:
        raise ValueError(f"create_model: channel_mult {channel_mult!r} has {len(mult)} levels; image_size "
                         f"{image_size} needs levels with 2 ** (levels + 2) == image_size")
    return mult


def _attention_rates(attention_resolutions, image_size):
    """"32,16,8" (pixel resolutions) -> downsample rates image_size // res, as OpenAI."""
    if isinstance(attention_resolutions, str):
        try:
            resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"create_model: attention_resolutions must be comma-separated integers like "
                             f"'32,16,8', got {attention_resolutions!r}") from None
    else:
        resolutions = [int(r) for r in attention_resolutions]
    if any(r <= 0 for r in resolutions):
        raise ValueError(f"create_model: attention_resolutions must be positive, "
                         f"got {attention_resolutions!r}")
    return tuple(image_size // r for r in resolutions)


def create_model(**options):
    """Build GLIDE's Text2ImUNet from OpenAI's options; returns the model only (no diffusion).

    Options (OpenAI's names; any omitted one takes model_and_diffusion_defaults()'s value):
        image_size, num_channels, num_res_blocks, channel_mult ("" = the default for image_size,
        else e.g. "1,2,3,4"), num_heads, num_head_channels, num_heads_upsample,
        attention_resolutions ("32,16,8": pixel resolutions), dropout, text_ctx, xf_width,
        xf_layers, xf_heads, xf_final_ln, xf_padding, use_scale_shift_norm, resblock_updown,
        use_fp16 (the model is converted with convert_to_fp16 here, where OpenAI's create_model
        leaves that call to the caller; calling it again is harmless), cache_text_emb (ignored,
        see Text2ImUNet), inpaint, super_res; and diffusion_steps, noise_schedule,
        timestep_respacing (ignored here).

    The model has 3 input image channels (more with super_res / inpaint) and 6 outputs (eps and
    the learned variance interpolation), as every released GLIDE model. Raises ValueError naming
    any unknown option.
    """
    defaults = model_and_diffusion_defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"create_model: unknown option(s) {', '.join(unknown)}; known options are "
                         f"{', '.join(sorted(defaults))}")
    o = {**defaults, **options}
    image_size = o["image_size"]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"create_model: image_size must be a positive int, got {image_size!r}")
    return Text2ImUNet(
        text_ctx=o["text_ctx"],
        xf_width=o["xf_width"],
        xf_layers=o["xf_layers"],
        xf_heads=o["xf_heads"],
        xf_final_ln=o["xf_final_ln"],
        n_vocab=GLIDE_N_VOCAB,
        xf_padding=o["xf_padding"],
        cache_text_emb=o["cache_text_emb"],
        super_res=o["super_res"],
        inpaint=o["inpaint"],
        in_channels=3,
        model_channels=o["num_channels"],
        out_channels=6,
        num_res_blocks=o["num_res_blocks"],
        attention_resolutions=_attention_rates(o["attention_resolutions"], image_size),
        dropout=o["dropout"],
        channel_mult=_channel_mult(o["channel_mult"], image_size),
        use_fp16=o["use_fp16"],
        num_heads=o["num_heads"],
        num_head_channels=o["num_head_channels"],
        num_heads_upsample=o["num_heads_upsample"],
        use_scale_shift_norm=o["use_scale_shift_norm"],
        resblock_updown=o["resblock_updown"],
    )
