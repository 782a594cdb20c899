"""Attention processors for diffusers' `Attention` modules that run `diffkern.ops.attention`.

They follow diffusers' `AttnProcessor2_0` and `AttnAddedKVProcessor2_0` (diffusers 0.42,
models/attention_processor.py) step for step: every projection, norm and dropout is called as the
module it is (`attn.to_q(x)`, `attn.group_norm(x)`, ...), so PEFT LoRA layers, hooks and
fused/loaded weights behave as under diffusers' processors; masks go through the module's own
`prepare_attention_mask`, so padding and head repetition are diffusers' to the letter. Only the
softmax(q k^T) v core changes: it runs on diffkern's attention op, and the added-KV form hands the
text keys to it as `kv_prefix` instead of concatenating them.

Both classes take no constructor arguments (diffusers rebuilds processors by class, e.g. for
IP-Adapter) and keep no state. `Attention.forward` inspects `__call__`'s signature to filter
`cross_attention_kwargs`: the signatures below equal diffusers', so an unknown key gets diffusers'
own warning ("cross_attention_kwargs [...] are not expected by ... and will be ignored.").
"""

from __future__ import annotations

import torch

from diffkern import ops
from diffkern.ops.attention import MAX_HEAD_DIM_TRITON

_SCALE_DEPRECATION = (
    "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise "
    "an error in the future. `scale` should directly be passed while calling the underlying pipeline "
    "component i.e., via `cross_attention_kwargs`."
)


def warn_deprecated_scale(args, kwargs):
    """diffusers' deprecation warning for a positional argument or a `scale` keyword."""
    if len(args) > 0 or kwargs.get("scale", None) is not None:
        from diffusers.utils import deprecate

        deprecate("scale", "1.0.0", _SCALE_DEPRECATION)


def _attention(q, k, v, bias, scale, kv_prefix=None):
    """diffkern attention; head dims over the Triton kernel's limit (the VAE's single 512-wide head)
    go to SDPA when the backend that would be chosen (e.g. a use_backend("triton") context) cannot
    take them, instead of failing."""
    backend = None
    if q.shape[-1] > MAX_HEAD_DIM_TRITON:
        try:
            ops.attention_backend(q, k, v, attn_bias=bias, scale=scale, kv_prefix=kv_prefix)
        except ValueError:
            backend = "sdpa"
    return ops.attention(q, k, v, attn_bias=bias, scale=scale, kv_prefix=kv_prefix, backend=backend)


def _split_heads(x, batch_size, heads):
    """(B, S, H * D) -> (B, H, S, D), a view (the Triton kernel reads the strides in place)."""
    return x.view(batch_size, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class DiffkernAttnProcessor:
    r"""Self / cross attention (SD 1.x / 2.x, SDXL, the VAE's mid-block attention) on diffkern's op.

    Same contract as diffusers' `AttnProcessor2_0`: honours `spatial_norm` (with `temb`),
    `group_norm`, `norm_cross`, `norm_q` / `norm_k`, `attention_mask` (prepared by
    `attn.prepare_attention_mask`; the UNet passes `encoder_attention_mask` here for cross
    attention), `residual_connection` and `rescale_output_factor`. The softmax scale is
    `attn.scale` (dim_head ** -0.5, or 1 when the module was built with scale_qk=False).
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        warn_deprecated_scale(args, kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = _split_heads(query, batch_size, attn.heads)
        key = _split_heads(key, batch_size, attn.heads)
        value = _split_heads(value, batch_size, attn.heads)
        # qk norms: absent from Attention in older diffusers
        norm_q, norm_k = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
        if norm_q is not None:
            query = norm_q(query)
        if norm_k is not None:
            key = norm_k(key)

        out = _attention(query, key, value, attention_mask, attn.scale)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class DiffkernAttnAddedKVProcessor:
    r"""Attention with extra text keys/values (DeepFloyd IF, the unCLIP decoder) on diffkern's op.

    Same contract as diffusers' `AttnAddedKVProcessor2_0`: the text is projected by
    `add_k_proj` / `add_v_proj` and attended before the image's own keys (passed to the op as
    `kv_prefix`, never concatenated by the Triton kernel), or alone when `only_cross_attention`;
    the text padding mask (the UNet's `encoder_attention_mask`, as an additive bias) is padded by
    `attn.prepare_attention_mask` for the image keys that follow; `norm_cross`, `group_norm`
    and the residual connection as in diffusers.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        warn_deprecated_scale(args, kwargs)
        residual = hidden_states
        hidden_states = hidden_states.view(hidden_states.shape[0], hidden_states.shape[1], -1).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape

        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size, out_dim=4)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = _split_heads(attn.to_q(hidden_states), batch_size, attn.heads)
        text_key = _split_heads(attn.add_k_proj(encoder_hidden_states), batch_size, attn.heads)
        text_value = _split_heads(attn.add_v_proj(encoder_hidden_states), batch_size, attn.heads)

        if not attn.only_cross_attention:
            key = _split_heads(attn.to_k(hidden_states), batch_size, attn.heads)
            value = _split_heads(attn.to_v(hidden_states), batch_size, attn.heads)
            out = _attention(query, key, value, attention_mask, attn.scale, kv_prefix=(text_key, text_value))
        else:
            if attention_mask is not None and attention_mask.shape[-1] == text_key.shape[2] + sequence_length:
                # prepare_attention_mask padded the text mask for image keys that this form has none of
                attention_mask = attention_mask[..., : text_key.shape[2]]
            out = _attention(query, text_key, text_value, attention_mask, attn.scale)

        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, residual.shape[1])
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
        return hidden_states + residual
