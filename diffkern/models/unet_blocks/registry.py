"""Block-type registry of the diffusers-layout UNet: block name -> builder.

UNet2DConditionModel builds each entry of `down_block_types` / `mid_block_type` / `up_block_types`
by looking the name up here and calling the builder with diffusers' get_down_block / get_mid_block
/ get_up_block keyword arguments (names and meaning as in diffusers 0.42):

    down:  num_layers, in_channels, out_channels, temb_channels, add_downsample, resnet_eps,
           resnet_act_fn, resnet_groups, transformer_layers_per_block, num_attention_heads,
           attention_head_dim, cross_attention_dim, downsample_padding, use_linear_projection,
           only_cross_attention, upcast_attention, resnet_time_scale_shift, resnet_skip_time_act,
           resnet_out_scale_factor, cross_attention_norm, dropout
    up:    the same with add_upsample, prev_output_channel and resolution_idx (no downsample_padding)
    mid:   in_channels, temb_channels, resnet_eps, resnet_act_fn, resnet_groups, output_scale_factor,
           transformer_layers_per_block, num_attention_heads, attention_head_dim, cross_attention_dim,
           use_linear_projection, mid_block_only_cross_attention, upcast_attention,
           resnet_time_scale_shift, resnet_skip_time_act, cross_attention_norm, dropout

A builder takes what it needs and ignores the rest (accept **kwargs). The module it returns must
call like diffusers' blocks, by keyword:

    down: block(hidden_states, temb, encoder_hidden_states=, attention_mask=, cross_attention_kwargs=,
                encoder_attention_mask=, additional_residuals=None) -> (hidden_states, tuple of skips)
    mid:  block(hidden_states, temb, encoder_hidden_states=, attention_mask=, cross_attention_kwargs=,
                encoder_attention_mask=) -> hidden_states
    up:   block(hidden_states, res_hidden_states_tuple, temb, encoder_hidden_states=,
                cross_attention_kwargs=, upsample_size=, attention_mask=, encoder_attention_mask=)
          -> hidden_states; an up block has `resnets` (one skip consumed per resnet).

`has_cross_attention` (bool attribute) says where a T2I-adapter residual goes (diffusers' rule).
Register another family's blocks (e.g. Imagen's Efficient U-Net) from its own module:

    from diffkern.models.unet_blocks import register_block
    @register_block("down", "EfficientDownBlock2D")
    class EfficientDownBlock2D(nn.Module): ...
"""

from __future__ import annotations

KINDS = ("down", "mid", "up")
_BLOCKS = {kind: {} for kind in KINDS}


def register_block(kind, name):
    """Decorator: register a builder (a class or function taking the keyword arguments above)."""
    if kind not in KINDS:
        raise ValueError(f"register_block: kind must be one of {KINDS}, got {kind!r}")

    def wrap(builder):
        _BLOCKS[kind][name] = builder
        return builder
    return wrap


def block_types(kind):
    """The registered names of one kind, sorted."""
    return sorted(_BLOCKS[kind])


def build_block(kind, name, **kwargs):
    """Build a registered block; an unknown name is a ValueError listing the known ones."""
    # diffusers accepts "UNetRes" prefixed names (UNetResDownBlock2D) as the plain ones.
    plain = name[7:] if isinstance(name, str) and name.startswith("UNetRes") else name
    if plain not in _BLOCKS[kind]:
        raise ValueError(f"{kind} block type {name!r} is not supported "
                         f"(supported: {', '.join(block_types(kind))})")
    return _BLOCKS[kind][plain](**kwargs)
