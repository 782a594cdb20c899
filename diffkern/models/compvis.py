"""Key conversion between CompVis / Stability single-file checkpoints and the diffusers layouts.

A Stable Diffusion 1.x / 2.x `.ckpt` (or `.safetensors`) holds three models under three prefixes:
`model.diffusion_model.*` (the UNet, CompVis `openaimodel.UNetModel` names),
`first_stage_model.*` (the KL autoencoder, CompVis `Encoder`/`Decoder` names) and
`cond_stage_model.*` (the text encoder: `transformer.text_model.*` for OpenAI CLIP ViT-L/14 in
SD 1.x, `model.*` for OpenCLIP ViT-H/14 in SD 2.x). The functions here map those names (and the
few shapes that differ) to and from the diffusers layouts that diffkern's modules share, and infer
the diffusers configs from tensor shapes. They are pure: dicts in, dicts out, no module built.

    parts = split_checkpoint(sd)
    config = infer_unet_config(parts["unet"])
    unet_sd = unet_from_compvis(parts["unet"], config)

Facts not stored in the weights get the released checkpoints' values, overridable by argument:
SD 1.x attention uses 8 heads, SD 2.x (linear proj_in) heads of 64 channels; the VAE latent
scale is 0.18215; the OpenCLIP text encoder is read at its penultimate layer (SD 2.x's choice).
"""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

# Keys a training checkpoint carries besides the three models: the DDPM schedule buffers, the EMA
# copy (flattened names), the autoencoder's training loss, CLIP's logit scale and projection (SD
# reads token states, never the pooled projection) and position ids (a buffer, not a weight).
_IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
_IGNORED_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
    "cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (the message says why and where).

    Defined here, the lowest layer that raises it; `diffkern.models.loading` re-exports it.
    """


def split_checkpoint(sd):
    """Split a CompVis state dict into {"unet", "vae", "clip" | "openclip", "ignored", "unknown"}.

    Each model part has its prefix stripped; "ignored" holds the training leftovers listed in
    `_IGNORED_KEYS` / `_IGNORED_PREFIXES`; "unknown" holds every other key, unchanged.
    """
    parts = {"unet": {}, "vae": {}, "clip": {}, "openclip": {}, "ignored": {}, "unknown": {}}
    routes = (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("clip", CLIP_PREFIX),
              ("openclip", OPENCLIP_PREFIX))
    for key, value in sd.items():
        if key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
            parts["ignored"][key] = value
            continue
        for part, prefix in routes:
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = value
                break
        else:
            parts["unknown"][key] = value
    for part in ("clip", "openclip"):
        if not parts[part]:
            del parts[part]
    return parts


# ---------------------------------------------------------------------------------------------
# Generic prefix mapping: a table of (diffusers prefix, CompVis prefix, sub-name renames) rows.
# ---------------------------------------------------------------------------------------------

# CompVis ResBlock sub-module names -> diffusers ResnetBlock2D names.
_UNET_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."),
                ("skip_connection.", "conv_shortcut."))
# CompVis AttnBlock uses 1x1 convolutions; diffusers' Attention uses linears (weights lose the 1x1).
_VAE_ATTENTION = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                  ("proj_out.", "to_out.0."))
_VAE_ATTENTION_LINEARS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def _rename_sub(sub, renames, to_diffusers):
    if renames is None:  # same sub-module names on both sides
        return sub
    for compvis, diffusers in renames:
        src, dst = (compvis, diffusers) if to_diffusers else (diffusers, compvis)
        if sub.startswith(src):
            return dst + sub[len(src):]
    return None


def _map_key(key, table, to_diffusers):
    """The key's name on the other side, or None when no row of `table` covers it."""
    # The longest matching prefix wins, so a row for "x.1.conv." is never shadowed by one for "x.1.".
    best = None
    for diffusers, compvis, renames in table:
        src, dst = (compvis, diffusers) if to_diffusers else (diffusers, compvis)
        if key.startswith(src) and (best is None or len(src) > len(best[0])):
            best = (src, dst, renames)
    if best is None:
        return None
    src, dst, renames = best
    sub = _rename_sub(key[len(src):], renames, to_diffusers)
    return None if sub is None else dst + sub


def _convert(sd, table, to_diffusers, strict, what, reshape=None):
    out, unmapped = {}, []
    for key, value in sd.items():
        new = _map_key(key, table, to_diffusers)
        if new is None:
            unmapped.append(key)
            out[key] = value  # kept under its own name so a later key check reports it as unexpected
            continue
        out[new] = reshape(new if to_diffusers else key, value) if reshape else value
    if strict and unmapped:
        raise CheckpointError(f"{what}: {len(unmapped)} keys fit no known module: {_cap(unmapped)}")
    return out


def _cap(keys, limit=20):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ---------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------

def unet_key_table(config):
    """(diffusers prefix, CompVis prefix, renames) rows for an SD UNet with diffusers `config`."""
    per_level = config["layers_per_block"]
    if not isinstance(per_level, int):
        raise CheckpointError(f"config: layers_per_block must be one int for CompVis UNets, "
                              f"got {per_level!r}")
    levels = len(config["block_out_channels"])
    rows = [("time_embedding.linear_1.", "time_embed.0.", None),
            ("time_embedding.linear_2.", "time_embed.2.", None), ("conv_in.", "input_blocks.0.0.", None),
            ("conv_norm_out.", "out.0.", None), ("conv_out.", "out.2.", None)]
    if config.get("num_class_embeds"):
        rows.append(("class_embedding.", "label_emb.", None))
    # CompVis numbers input blocks consecutively: per level `per_level` (ResBlock[, transformer])
    # entries, then one downsample entry except after the last level.
    for level, kind in enumerate(config["down_block_types"]):
        first = 1 + level * (per_level + 1)
        for j in range(per_level):
            rows.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{first + j}.0.", _UNET_RESNET))
            if "CrossAttn" in kind:
                rows.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{first + j}.1.", None))
        if level < levels - 1:
            rows.append((f"down_blocks.{level}.downsamplers.0.conv.",
                         f"input_blocks.{first + per_level}.0.op.", None))
    rows += [("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", None),
             ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    # Output blocks: per level per_level + 1 entries; the upsample conv sits after the transformer
    # when the level has one (index 2), else right after the ResBlock (index 1).
    for level, kind in enumerate(config["up_block_types"]):
        attention = "CrossAttn" in kind
        for j in range(per_level + 1):
            index = level * (per_level + 1) + j
            rows.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{index}.0.", _UNET_RESNET))
            if attention:
                rows.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{index}.1.", None))
        if level < levels - 1:
            index = level * (per_level + 1) + per_level
            rows.append((f"up_blocks.{level}.upsamplers.0.conv.",
                         f"output_blocks.{index}.{2 if attention else 1}.conv.", None))
    return rows


def unet_from_compvis(sd, config, *, strict=True):
    """CompVis UNet state dict (prefix `model.diffusion_model.` stripped) -> diffusers names.

    strict: unmapped keys raise CheckpointError; with strict=False they are kept under their own
    names, for a later key check against a module to report as unexpected.
    """
    return _convert(sd, unet_key_table(config), True, strict, "unet")


def unet_to_compvis(sd, config, *, strict=True):
    """diffusers UNet2DConditionModel state dict -> CompVis names (no `model.diffusion_model.` prefix)."""
    return _convert(sd, unet_key_table(config), False, strict, "unet")


def unet_compvis_name(key, config):
    """The CompVis name of one diffusers UNet key (the key itself when no row covers it)."""
    return _map_key(key, unet_key_table(config), False) or key


def _indices(sd, prefix):
    """The sorted distinct integers N of keys `prefix + "N." ...`."""
    found = set()
    for key in sd:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _need(sd, key, what):
    if key not in sd:
        raise CheckpointError(f"{what}: cannot infer the config, key {key!r} is missing")
    return sd[key]


def infer_unet_config(sd, *, num_heads=None, head_channels=None, sample_size=64):
    """A diffusers UNet2DConditionModel config inferred from a CompVis UNet state dict's shapes.

    Channels, levels, layers per level, attention levels, transformer depth, context dim, in/out
    channels and conv-vs-linear projections come from the tensors. The head count does not (q, k
    and v are full-width linears), so: num_heads (SD 1.x: 8) or head_channels (SD 2.x: 64) set it;
    by default a UNet with linear proj_in (the SD 2.x family) gets head_channels=64 and one with
    1x1-conv proj_in (SD 1.x) num_heads=8, as in the released checkpoints. sample_size (latent
    pixels: 64 for 512-pixel models, 96 for SD 2.x 768-v) is only the pipelines' default size.
    """
    if num_heads is not None and head_channels is not None:
        raise ValueError("infer_unet_config: give num_heads or head_channels, not both")
    if "label_emb.0.0.weight" in sd:
        raise CheckpointError("unet: label_emb.0.* (SDXL-style added embeddings) is not supported")
    conv_in = _need(sd, "input_blocks.0.0.weight", "unet")
    inputs = _indices(sd, "input_blocks.")
    downsamples = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in sd]
    per_level = (downsamples[0] - 1) if downsamples else len(inputs) - 1
    levels = len(downsamples) + 1
    if per_level < 1 or len(inputs) != levels * (per_level + 1):
        raise CheckpointError(
            f"unet: {len(inputs)} input_blocks do not form levels of equal depth "
            f"(downsamples at {downsamples})")
    channels, down_types, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        channels.append(int(_need(sd, f"input_blocks.{first}.0.out_layers.3.weight", "unet").shape[0]))
        has_attention = f"input_blocks.{first}.1.proj_in.weight" in sd
        down_types.append("CrossAttnDownBlock2D" if has_attention else "DownBlock2D")
        blocks = _indices(sd, f"input_blocks.{first}.1.transformer_blocks.")
        depths.append(len(blocks) if has_attention else 1)
    up_types = []
    for level in range(levels):
        first = level * (per_level + 1)
        has_attention = f"output_blocks.{first}.1.proj_in.weight" in sd
        up_types.append("CrossAttnUpBlock2D" if has_attention else "UpBlock2D")
    proj_in = _need(sd, "middle_block.1.proj_in.weight", "unet")
    linear = proj_in.ndim == 2
    context = int(_need(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "unet").shape[1])
    if num_heads is None and head_channels is None:
        head_channels, num_heads = (64, None) if linear else (None, 8)
    if head_channels is not None:
        bad = [c for c in channels if c % head_channels]
        if bad:
            raise ValueError(f"infer_unet_config: head_channels={head_channels} does not divide "
                             f"channels {bad}")
        # diffusers names the *head count* attention_head_dim (a historical misnomer).
        heads = [c // head_channels for c in channels]
    else:
        bad = [c for c in channels if c % num_heads]
        if bad:
            raise ValueError(f"infer_unet_config: num_heads={num_heads} does not divide channels {bad}")
        heads = num_heads
    config = {
        "sample_size": sample_size,
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(_need(sd, "out.2.weight", "unet").shape[0]),
        "down_block_types": down_types,
        "up_block_types": up_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if "label_emb.weight" in sd:  # SD 2.x x4 upscaler: noise-level class embedding
        config["num_class_embeds"] = int(sd["label_emb.weight"].shape[0])
    return config


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------

def vae_key_table(levels):
    """(diffusers prefix, CompVis prefix, renames) rows for a KL autoencoder with `levels` levels."""
    rows = [("quant_conv.", "quant_conv.", None), ("post_quant_conv.", "post_quant_conv.", None)]
    for side in ("encoder", "decoder"):
        rows += [(f"{side}.conv_in.", f"{side}.conv_in.", None),
                 (f"{side}.conv_out.", f"{side}.conv_out.", None),
                 (f"{side}.conv_norm_out.", f"{side}.norm_out.", None),
                 (f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", None),
                 (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", None),
                 (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTENTION)]
    for level in range(levels):
        rows.append((f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block.", None))
        rows.append((f"encoder.down_blocks.{level}.downsamplers.0.conv.",
                     f"encoder.down.{level}.downsample.conv.", None))
        # CompVis numbers decoder levels from the lowest resolution up, diffusers in execution order.
        up = levels - 1 - level
        rows.append((f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{up}.block.", None))
        rows.append((f"decoder.up_blocks.{level}.upsamplers.0.conv.",
                     f"decoder.up.{up}.upsample.conv.", None))
    return rows


def _vae_levels(sd, compvis):
    levels = _indices(sd, "encoder.down." if compvis else "encoder.down_blocks.")
    if not levels:
        raise CheckpointError("vae: no encoder levels found (encoder.down.N / encoder.down_blocks.N keys)")
    return len(levels)


def vae_from_compvis(sd, *, strict=True):
    """CompVis KL-autoencoder state dict (prefix `first_stage_model.` stripped) -> diffusers names."""
    def reshape(key, value):
        # 1x1 conv (C, C, 1, 1) -> linear (C, C) for the mid-block attention projections
        return value[:, :, 0, 0] if key.endswith(_VAE_ATTENTION_LINEARS) and value.ndim == 4 else value

    out = _convert(sd, vae_key_table(_vae_levels(sd, True)), True, strict, "vae", reshape)
    # The ResnetBlock2D shortcut is the one sub-module whose name differs (CompVis nin_shortcut);
    # neither layout uses either name anywhere else.
    return {k.replace(".nin_shortcut.", ".conv_shortcut."): v for k, v in out.items()}


def vae_to_compvis(sd, *, strict=True):
    """diffusers AutoencoderKL state dict -> CompVis names (no `first_stage_model.` prefix)."""
    def reshape(key, value):
        return value[:, :, None, None] if key.endswith(_VAE_ATTENTION_LINEARS) and value.ndim == 2 else value

    out = _convert(sd, vae_key_table(_vae_levels(sd, False)), False, strict, "vae", reshape)
    return {k.replace(".conv_shortcut.", ".nin_shortcut."): v for k, v in out.items()}


def vae_compvis_name(key, levels):
    """The CompVis name of one diffusers AutoencoderKL key (the key itself when no row covers it)."""
    return (_map_key(key, vae_key_table(levels), False) or key).replace(".conv_shortcut.", ".nin_shortcut.")


def infer_vae_config(sd, *, scaling_factor=0.18215, sample_size=512):
    """A diffusers AutoencoderKL config inferred from a CompVis VAE state dict's shapes.

    scaling_factor (the latent scale SD 1.x and 2.x were trained with) and sample_size are not in
    the weights; GroupNorm uses 32 groups, as in every released KL autoencoder.
    """
    levels = _vae_levels(sd, True)
    per_level = len(_indices(sd, "encoder.down.0.block."))
    channels = [int(_need(sd, f"encoder.down.{i}.block.0.conv2.weight", "vae").shape[0])
                for i in range(levels)]
    return {
        "in_channels": int(_need(sd, "encoder.conv_in.weight", "vae").shape[1]),
        "out_channels": int(_need(sd, "decoder.conv_out.weight", "vae").shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "latent_channels": int(_need(sd, "decoder.conv_in.weight", "vae").shape[1]),
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }
