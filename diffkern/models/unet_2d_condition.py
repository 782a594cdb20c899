"""The text-conditioned latent UNet of Latent Diffusion and Stable Diffusion 1.x / 2.x, on diffkern ops.

UNet2DConditionModel(**config) takes diffusers' UNet2DConditionModel config (config.json of a
checkpoint's `unet` folder) and has exactly diffusers' state_dict keys and shapes for the
configurations it supports, so

    unet = UNet2DConditionModel.from_config(json.load(open("unet/config.json")))
    unet.load_state_dict(safetensors.torch.load_file("unet/diffusion_pytorch_model.safetensors"))

loads a released checkpoint. Supported: CrossAttnDownBlock2D / DownBlock2D down blocks,
UNetMidBlock2DCrossAttn (or no mid block), UpBlock2D / CrossAttnUpBlock2D up blocks, SiLU, conv or
linear transformer projections, per-level head counts, layers and transformer depths. Options for
SDXL-style extra embeddings, class conditioning, dual / cross-only attention and the like raise
ValueError naming the option.
"""

from __future__ import annotations

import torch
from torch import nn

from diffkern.models._config import ConfiguredModel, per_level, resolve_config
from diffkern.models.unet_2d_blocks import DownBlock, MidBlockCrossAttn, UpBlock
from diffkern.nn.group_norm import GroupNorm
from diffkern.nn.resnet import TimestepEmbedding, timestep_embedding

_NAME = "UNet2DConditionModel"

# diffusers' constructor defaults (diffusers 0.42), which is what a config.json leaves out.
DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, dropout=0.0, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False, use_linear_projection=False,
    class_embed_type=None, addition_embed_type=None, addition_time_embed_dim=None, num_class_embeds=None,
    upcast_attention=False, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
    conv_out_kernel=3, projection_class_embeddings_input_dim=None, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
    addition_embed_type_num_heads=64,
)

# Options whose other values build networks (or forward passes) this module does not implement.
UNSUPPORTED = dict(
    mid_block_type=("UNetMidBlock2DCrossAttn", None), only_cross_attention=(False,), act_fn=("silu", "swish"),
    reverse_transformer_layers_per_block=(None,), encoder_hid_dim=(None,), encoder_hid_dim_type=(None,),
    dual_cross_attention=(False,), class_embed_type=(None,), addition_embed_type=(None,),
    addition_time_embed_dim=(None,), num_class_embeds=(None,), resnet_time_scale_shift=("default",),
    resnet_skip_time_act=(False,), resnet_out_scale_factor=(1.0,), time_embedding_type=("positional",),
    time_embedding_dim=(None,), time_embedding_act_fn=(None,), timestep_post_act=(None,),
    time_cond_proj_dim=(None,), projection_class_embeddings_input_dim=(None,), attention_type=("default",),
    class_embeddings_concat=(False,), mid_block_only_cross_attention=(None, False),
    cross_attention_norm=(None,),
)

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


class UNet2DConditionModel(ConfiguredModel):
    """Text-conditioned UNet: eps / v prediction from a noisy latent, a timestep and text tokens.

    UNet2DConditionModel(**config) with diffusers' config keys (see DEFAULTS); keys starting with
    "_" are ignored, unknown keys and unsupported values raise ValueError naming the key.

    Heads: as in diffusers, `attention_head_dim` is really the NUMBER of heads per level when
    `num_attention_heads` is None (SD1/LDM: 8 heads, head widths 40/80/160; SD2: [5, 10, 20, 20],
    head width 64); each level's head width is its channels // heads.
    `upcast_attention` is accepted and has no effect: diffkern's attention kernels accumulate the
    scores and the softmax in float32 whatever the input dtype.

    forward(sample (B, in_channels, H, W), timestep, encoder_hidden_states (B, M, cross_attention_dim))
    -> (B, out_channels, H, W). timestep: a number, a 0-d tensor or a (B,) tensor. Any H, W: sides
    that are not multiples of 2**(levels - 1) upsample back to the skip connections' sizes.
    """

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = resolve_config(_NAME, DEFAULTS, config, UNSUPPORTED)
        levels = len(cfg.down_block_types)
        channels = list(cfg.block_out_channels)
        if len(cfg.up_block_types) != levels or len(channels) != levels:
            raise ValueError(f"{_NAME}: down_block_types, up_block_types and block_out_channels must have "
                             f"the same length, got {levels}, {len(cfg.up_block_types)} and {len(channels)}")
        for key, types, allowed in (("down_block_types", cfg.down_block_types, DOWN_TYPES),
                                    ("up_block_types", cfg.up_block_types, UP_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{_NAME}: {key} {bad} are not supported (supported: {', '.join(allowed)})")
        if cfg.norm_num_groups is None:
            raise ValueError(f"{_NAME}: norm_num_groups=None is not supported")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if cfg[key] % 2 == 0:
                raise ValueError(f"{_NAME}: {key} must be odd, got {cfg[key]}")

        # diffusers' naming quirk: without num_attention_heads, attention_head_dim counts heads.
        heads = per_level(_NAME, "num_attention_heads", cfg.num_attention_heads or cfg.attention_head_dim,
                          levels)
        cross_dim = per_level(_NAME, "cross_attention_dim", cfg.cross_attention_dim, levels)
        layers = per_level(_NAME, "layers_per_block", cfg.layers_per_block, levels)
        depth = per_level(_NAME, "transformer_layers_per_block", cfg.transformer_layers_per_block, levels)
        if any(isinstance(d, (list, tuple)) for d in depth):
            raise ValueError(f"{_NAME}: transformer_layers_per_block with per-layer depths is not supported")
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                      use_linear_projection=cfg.use_linear_projection)
        temb = channels[0] * 4

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], cfg.conv_in_kernel,
                                 padding=cfg.conv_in_kernel // 2)
        self.time_embedding = TimestepEmbedding(channels[0], temb)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            self.down_blocks.append(DownBlock(
                channels[max(i - 1, 0)], channels[i], temb, add_downsample=i < levels - 1,
                downsample_padding=cfg.downsample_padding, num_layers=layers[i],
                cross_attention=kind == "CrossAttnDownBlock2D", heads=heads[i],
                cross_attention_dim=cross_dim[i], transformer_depth=depth[i], **common))

        self.mid_block = None
        if cfg.mid_block_type is not None:
            self.mid_block = MidBlockCrossAttn(
                channels[-1], temb, heads=heads[-1], cross_attention_dim=cross_dim[-1],
                transformer_depth=depth[-1], output_scale_factor=cfg.mid_block_scale_factor, **common)

        self.up_blocks = nn.ModuleList()
        rev = channels[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            j = levels - 1 - i  # the down level this up level mirrors
            self.up_blocks.append(UpBlock(
                rev[min(i + 1, levels - 1)], rev[max(i - 1, 0)], rev[i], temb, add_upsample=i < levels - 1,
                num_layers=layers[j] + 1, cross_attention=kind == "CrossAttnUpBlock2D", heads=heads[j],
                cross_attention_dim=cross_dim[j], transformer_depth=depth[j], **common))

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps, activation="silu")
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, cfg.conv_out_kernel,
                                  padding=cfg.conv_out_kernel // 2)

    def _timesteps(self, timestep, sample):
        """timestep -> (B,) tensor on the sample's device, as diffusers reads it (a Python float
        becomes float64, an int int64; a 0-d or (1,) tensor is broadcast to the batch)."""
        if not isinstance(timestep, torch.Tensor):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if sample.device.type == "mps":  # no float64 / int64 arithmetic there
                dtype = torch.float32 if dtype == torch.float64 else torch.int32
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.dim() == 0:
            timestep = timestep[None].to(sample.device)
        if timestep.dim() != 1 or timestep.shape[0] not in (1, sample.shape[0]):
            raise ValueError(f"{_NAME}: timestep must be a number, a 0-d tensor or a (B={sample.shape[0]},) "
                             f"tensor, got shape {tuple(timestep.shape)}")
        return timestep.expand(sample.shape[0])

    def forward(self, sample, timestep, encoder_hidden_states):
        cfg = self.config
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"{_NAME}: sample must be (B, {cfg.in_channels}, H, W), got {got}")
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3:
            got = (tuple(encoder_hidden_states.shape) if isinstance(encoder_hidden_states, torch.Tensor)
                   else type(encoder_hidden_states).__name__)
            raise ValueError(f"{_NAME}: encoder_hidden_states must be (B, tokens, cross_attention_dim), "
                             f"got {got}")
        # Sides that do not halve evenly all the way down: each upsampler is told the size of the
        # skip it meets next, instead of doubling (diffusers' forward_upsample_size).
        up_factor = 2 ** (len(self.up_blocks) - 1)
        forward_sizes = any(s % up_factor for s in sample.shape[-2:])

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        t = timestep_embedding(self._timesteps(timestep, sample), cfg.block_out_channels[0],
                               flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
        emb = self.time_embedding(t.to(sample.dtype))

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, encoder_hidden_states)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, encoder_hidden_states)
        for i, block in enumerate(self.up_blocks):
            level_skips = skips[len(skips) - len(block.resnets):]
            del skips[len(skips) - len(block.resnets):]
            size = skips[-1].shape[2:] if forward_sizes and i < len(self.up_blocks) - 1 else None
            h = block(h, level_skips, emb, encoder_hidden_states, upsample_size=size)
        return self.conv_out(self.conv_norm_out(h))
