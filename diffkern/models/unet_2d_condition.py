"""The diffusers-layout conditional UNet on diffkern ops: Stable Diffusion 1.x / 2.x, SDXL, the
unCLIP (Karlo) decoder and the DeepFloyd IF stages are configs of it, as in diffusers.

UNet2DConditionModel is diffusers' ModelMixin + ConfigMixin with diffusers' constructor, state_dict keys
and output class, so diffusers' own loading and saving apply:

    unet = UNet2DConditionModel.from_pretrained("sd-folder", subfolder="unet", torch_dtype=torch.float16)
    unet.save_pretrained("out")        # loads back into diffusers.UNet2DConditionModel as well

and `forward` takes diffusers' arguments, so the model drops into a diffusers pipeline
(`pipe.unet = diffkern.models.from_diffusers(pipe.unet)`).

Supported: the block types of diffkern.models.unet_blocks (SD's CrossAttn / plain blocks, IF's and
unCLIP's SimpleCrossAttn / ResnetDownsample / ResnetUpsample blocks, and whatever other families
register); class embeddings (num_class_embeds, "timestep", "identity", "projection",
"simple_projection", concatenated or added); encoder_hid_dim ("text_proj"); addition embeddings
"text" (IF's attention pooling), "text_image" and "text_time" (SDXL); timestep_cond; positional or
Fourier time features; any diffusers activation for act_fn / time_embedding_act_fn / timestep_post_act;
scale-shift resnets; per-level layers, heads, cross-attention widths and transformer depths (per layer
too); FreeU (enable_freeu); gradient checkpointing. Options outside these raise ValueError naming the
option; diffusers' attention-processor API (attn_processors, set_attn_processor, attention slicing,
xFormers, IP-Adapter / custom-diffusion processors, QKV fusion) raises NotImplementedError.
"""

from __future__ import annotations

import warnings

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from diffkern.models._config import NoAttentionProcessors, check_options, defaults, per_level
from diffkern.models.embeddings import (GaussianFourierProjection, addition_embedding, class_embedding,
                                        one_width)
from diffkern.models.unet_blocks import block_types, build_block
from diffkern.nn.group_norm import GroupNorm
from diffkern.nn.resnet import ACTIVATIONS, TimestepEmbedding, activation, timestep_embedding
from diffkern.nn.transformer import SpatialTransformer

__all__ = ["UNet2DConditionModel", "UNet2DConditionOutput"]

_NAME = "UNet2DConditionModel"

# Options whose other values build networks (or forward passes) this module does not implement.
_ACTS = tuple(ACTIVATIONS)
UNSUPPORTED = dict(
    act_fn=_ACTS, time_embedding_act_fn=(None,) + _ACTS, timestep_post_act=(None,) + _ACTS,
    encoder_hid_dim_type=(None, "text_proj"), dual_cross_attention=(False,),
    class_embed_type=(None, "timestep", "identity", "projection", "simple_projection"),
    addition_embed_type=(None, "text", "text_image", "text_time"),
    resnet_time_scale_shift=("default", "scale_shift"), time_embedding_type=("positional", "fourier"),
    attention_type=("default",), cross_attention_norm=(None, "group_norm", "layer_norm"),
)


class UNet2DConditionModel(NoAttentionProcessors, ModelMixin, ConfigMixin):
    """Conditional UNet: eps / v / x0 prediction from a noisy sample, a timestep and text tokens.

    diffusers' ModelMixin + ConfigMixin with diffusers' constructor (same arguments and defaults as
    diffusers 0.42), so from_config / from_pretrained / save_pretrained (variants, shards, safetensors,
    torch_dtype) are diffusers' own; values of an option this module does not implement (UNSUPPORTED,
    block types outside diffkern.models.unet_blocks) raise ValueError naming the option.

    Heads: as in diffusers, for the SD blocks `attention_head_dim` is really the NUMBER of heads per
    level when `num_attention_heads` is None (SD1/LDM: 8 heads; SD2: [5, 10, 20, 20]), each head
    `channels // heads` wide; for the SimpleCrossAttn blocks (IF, unCLIP) it is the head WIDTH, with
    `channels // attention_head_dim` heads (and the up blocks read it per level in the down order,
    as diffusers does). `upcast_attention` has no effect: diffkern's attention kernels accumulate the
    scores and the softmax in float32 whatever the input dtype.

    forward: see `forward`. Any H, W for the SD blocks: sides that are not multiples of
    2**(levels - 1) upsample back to the skip connections' sizes.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(self, sample_size=None, in_channels=4, out_channels=4, center_input_sample=False,
                 flip_sin_to_cos=True, freq_shift=0,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 mid_block_type="UNetMidBlock2DCrossAttn",
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 downsample_padding=1, mid_block_scale_factor=1, dropout=0.0, act_fn="silu", norm_num_groups=32,
                 norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
                 reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
                 attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False,
                 use_linear_projection=False, class_embed_type=None, addition_embed_type=None,
                 addition_time_embed_dim=None, num_class_embeds=None, upcast_attention=False,
                 resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
                 time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None,
                 timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
                 projection_class_embeddings_input_dim=None, attention_type="default", class_embeddings_concat=False,
                 mid_block_only_cross_attention=None, cross_attention_norm=None, addition_embed_type_num_heads=64):
        super().__init__()
        check_options(_NAME, self.config, UNSUPPORTED)
        if encoder_hid_dim is not None and encoder_hid_dim_type is None:
            self.register_to_config(encoder_hid_dim_type="text_proj")  # diffusers records the default too
        cfg = self.config
        if cfg.encoder_hid_dim_type is not None and cfg.encoder_hid_dim is None:
            raise ValueError(f"{_NAME}: encoder_hid_dim must be set when encoder_hid_dim_type is "
                             f"{cfg.encoder_hid_dim_type!r}")
        levels = len(cfg.down_block_types)
        channels = list(cfg.block_out_channels)
        if len(cfg.up_block_types) != levels or len(channels) != levels:
            raise ValueError(f"{_NAME}: down_block_types, up_block_types and block_out_channels must have "
                             f"the same length, got {levels}, {len(cfg.up_block_types)} and {len(channels)}")
        mid_types = [] if cfg.mid_block_type is None else [cfg.mid_block_type]
        for key, kind, names in (("down_block_types", "down", cfg.down_block_types),
                                 ("mid_block_type", "mid", mid_types),
                                 ("up_block_types", "up", cfg.up_block_types)):
            known = block_types(kind)
            bad = [n for n in names if (n[7:] if n.startswith("UNetRes") else n) not in known]
            if bad:
                raise ValueError(f"{_NAME}: {key} {bad} are not supported (supported: {', '.join(known)})")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if cfg[key] % 2 == 0:
                raise ValueError(f"{_NAME}: {key} must be odd, got {cfg[key]}")

        # diffusers' naming quirk: without num_attention_heads, attention_head_dim counts heads.
        heads = per_level(_NAME, "num_attention_heads", cfg.num_attention_heads or cfg.attention_head_dim,
                          levels)
        head_dim = per_level(_NAME, "attention_head_dim", cfg.attention_head_dim, levels)
        cross_dim = per_level(_NAME, "cross_attention_dim", cfg.cross_attention_dim, levels)
        layers = per_level(_NAME, "layers_per_block", cfg.layers_per_block, levels)
        depth = per_level(_NAME, "transformer_layers_per_block", cfg.transformer_layers_per_block, levels)
        only_cross = per_level(_NAME, "only_cross_attention", cfg.only_cross_attention, levels)
        mid_only_cross = cfg.mid_block_only_cross_attention
        if mid_only_cross is None:
            mid_only_cross = cfg.only_cross_attention if isinstance(cfg.only_cross_attention, bool) else False
        if cfg.reverse_transformer_layers_per_block is None:
            if any(isinstance(d, (list, tuple)) for d in depth):
                raise ValueError(f"{_NAME}: per-layer transformer_layers_per_block needs "
                                 "reverse_transformer_layers_per_block (an asymmetrical UNet)")
            up_depth = depth[::-1]
        else:
            up_depth = list(cfg.reverse_transformer_layers_per_block)

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], cfg.conv_in_kernel,
                                 padding=cfg.conv_in_kernel // 2)
        if cfg.time_embedding_type == "fourier":  # random Fourier features of the noise level (score SDE)
            time_embed_dim = cfg.time_embedding_dim or channels[0] * 2
            if time_embed_dim % 2:
                raise ValueError(f"{_NAME}: time_embedding_dim must be even with fourier features, "
                                 f"got {time_embed_dim}")
            self.time_proj = GaussianFourierProjection(time_embed_dim // 2,
                                                       flip_sin_to_cos=cfg.flip_sin_to_cos)
            self._time_features = time_embed_dim
        else:
            time_embed_dim = cfg.time_embedding_dim or channels[0] * 4
            self._time_features = channels[0]
        self.time_embedding = TimestepEmbedding(self._time_features, time_embed_dim, act_fn=cfg.act_fn,
                                                post_act_fn=cfg.timestep_post_act,
                                                cond_proj_dim=cfg.time_cond_proj_dim)
        self.encoder_hid_proj = None
        if cfg.encoder_hid_dim_type == "text_proj":
            self.encoder_hid_proj = nn.Linear(cfg.encoder_hid_dim, one_width(_NAME, cfg, "cross_attention_dim"))
        self.class_embedding = class_embedding(_NAME, cfg, self._time_features, time_embed_dim)
        self.add_embedding = addition_embedding(_NAME, cfg, time_embed_dim)
        self.time_embed_act = activation(cfg.time_embedding_act_fn) if cfg.time_embedding_act_fn else None

        blocks_temb = time_embed_dim * 2 if cfg.class_embeddings_concat else time_embed_dim
        common = dict(temb_channels=blocks_temb, resnet_eps=cfg.norm_eps, resnet_act_fn=cfg.act_fn,
                      resnet_groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
                      upcast_attention=cfg.upcast_attention,
                      resnet_time_scale_shift=cfg.resnet_time_scale_shift,
                      resnet_skip_time_act=cfg.resnet_skip_time_act,
                      cross_attention_norm=cfg.cross_attention_norm, dropout=cfg.dropout,
                      dual_cross_attention=False, attention_type="default")
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            self.down_blocks.append(build_block(
                "down", kind, num_layers=layers[i], transformer_layers_per_block=depth[i],
                in_channels=channels[max(i - 1, 0)], out_channels=channels[i], add_downsample=i < levels - 1,
                cross_attention_dim=cross_dim[i], num_attention_heads=heads[i],
                attention_head_dim=head_dim[i] if head_dim[i] is not None else channels[i],
                downsample_padding=cfg.downsample_padding, only_cross_attention=only_cross[i],
                resnet_out_scale_factor=cfg.resnet_out_scale_factor, **common))

        self.mid_block = None
        if cfg.mid_block_type is not None:
            self.mid_block = build_block(
                "mid", cfg.mid_block_type, in_channels=channels[-1],
                output_scale_factor=cfg.mid_block_scale_factor,
                transformer_layers_per_block=depth[-1], num_attention_heads=heads[-1],
                cross_attention_dim=cross_dim[-1], mid_block_only_cross_attention=mid_only_cross,
                attention_head_dim=head_dim[-1], **common)

        self.up_blocks = nn.ModuleList()
        rev = channels[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            j = levels - 1 - i  # the down level this up level mirrors
            self.up_blocks.append(build_block(
                "up", kind, num_layers=layers[j] + 1, transformer_layers_per_block=up_depth[i],
                in_channels=rev[min(i + 1, levels - 1)], prev_output_channel=rev[max(i - 1, 0)],
                out_channels=rev[i], add_upsample=i < levels - 1, resolution_idx=i,
                cross_attention_dim=cross_dim[j], num_attention_heads=heads[j],
                only_cross_attention=only_cross[j],
                # diffusers indexes attention_head_dim by i here, not by the mirrored level.
                attention_head_dim=head_dim[i] if head_dim[i] is not None else rev[i],
                resnet_out_scale_factor=cfg.resnet_out_scale_factor, **common))

        self.conv_norm_out = self.conv_act = None
        if cfg.norm_num_groups is not None:
            fused = "silu" if cfg.act_fn.lower() in ("silu", "swish") else None
            self.conv_norm_out = GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps,
                                           activation=fused)
            self.conv_act = nn.Identity() if fused else activation(cfg.act_fn)  # SiLU runs inside the norm
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, cfg.conv_out_kernel,
                                  padding=cfg.conv_out_kernel // 2)
        self._needs_text = (self.encoder_hid_proj is not None or cfg.addition_embed_type == "text"
                            or any(isinstance(m, SpatialTransformer) for m in self.modules()))

    def enable_freeu(self, s1, s2, b1, b2):
        """FreeU (https://huggingface.co/papers/2309.11497) on the SD up blocks, as diffusers' enable_freeu:
        s1/s2 scale the skips' low frequencies, b1/b2 the backbone's first half of channels, at the
        first two up levels."""
        for block in self.up_blocks:
            block.s1, block.s2, block.b1, block.b2 = s1, s2, b1, b2

    def disable_freeu(self):
        for block in self.up_blocks:
            for key in ("s1", "s2", "b1", "b2"):
                if hasattr(block, key):
                    setattr(block, key, None)

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

    def _time_proj(self, t):
        """diffusers' `time_proj`: sinusoids (positional) or random Fourier features of t, float32."""
        if self.config.time_embedding_type == "fourier":
            return self.time_proj(t)
        return self._sinusoid(t, self.config.block_out_channels[0])

    def _sinusoid(self, t, dim):
        cfg = self.config
        return timestep_embedding(t, dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  downscale_freq_shift=cfg.freq_shift)

    def _embedding(self, sample, timestep, encoder_hidden_states, class_labels, timestep_cond,
                   added_cond_kwargs):
        """The time embedding every resnet sees: time (+ class) (+ addition), then time_embed_act."""
        cfg = self.config
        t = self._time_proj(self._timesteps(timestep, sample)).to(sample.dtype)
        emb = self.time_embedding(t, timestep_cond)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(f"{_NAME}: class_labels must be given (class_embed_type="
                                 f"{cfg.class_embed_type!r}, num_class_embeds={cfg.num_class_embeds})")
            if cfg.class_embed_type == "timestep":
                if not isinstance(class_labels, torch.Tensor) or class_labels.dim() != 1:
                    got = (tuple(class_labels.shape) if isinstance(class_labels, torch.Tensor)
                           else type(class_labels).__name__)
                    raise ValueError(f"{_NAME}: class_labels must be a (B,) tensor of noise levels "
                                     f"(class_embed_type='timestep'), got {got}")
                class_labels = self._time_proj(class_labels).to(sample.dtype)
            class_emb = self.class_embedding(class_labels).to(sample.dtype)
            emb = torch.cat([emb, class_emb], dim=-1) if cfg.class_embeddings_concat else emb + class_emb
        if cfg.addition_embed_type is not None:
            emb = emb + self._addition(emb, encoder_hidden_states, added_cond_kwargs or {})
        return emb if self.time_embed_act is None else self.time_embed_act(emb)

    def _addition(self, emb, encoder_hidden_states, added):
        kind = self.config.addition_embed_type
        if kind == "text":
            return self.add_embedding(encoder_hidden_states)
        needed = ("image_embeds",) if kind == "text_image" else ("text_embeds", "time_ids")
        missing = [k for k in needed if k not in added]
        if missing:
            raise ValueError(f"{_NAME}: addition_embed_type={kind!r} needs {missing} in added_cond_kwargs")
        if kind == "text_image":
            return self.add_embedding(added.get("text_embeds", encoder_hidden_states), added["image_embeds"])
        text_embeds, time_ids = added["text_embeds"], added["time_ids"]  # SDXL: pooled text + size/crop ids
        time_embeds = self._sinusoid(time_ids.flatten(), self.config.addition_time_embed_dim)
        time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict=True):
        """diffusers' UNet2DConditionModel.forward, argument for argument.

        Args:
            sample: (B, in_channels, H, W) noisy input.
            timestep: a number, a 0-d tensor or a (B,) / (1,) tensor.
            encoder_hidden_states: (B, T, cross_attention_dim) text tokens (encoder_hid_dim wide when the
                model projects them: IF's T5 states).
            class_labels: (B,) labels / noise levels, or (B, D) embeddings ("identity": the unCLIP image
                embedding; "projection"), as class_embed_type needs.
            timestep_cond: (B, time_cond_proj_dim), added to the sinusoid through time_embedding.cond_proj.
            attention_mask: (B, T) keep-mask (1 = attend) over the text for the SimpleCrossAttn blocks (as
                the unCLIP decoder passes it), over the pixels for the SD transformers' self-attention.
            cross_attention_kwargs: "scale" (LoRA; this model has no LoRA layers, so only 1.0 is exact) -
                any other key is ignored with diffusers' warning.
            added_cond_kwargs: {"text_embeds", "time_ids"} for SDXL ("text_time"), {"image_embeds"} for
                "text_image".
            down_block_additional_residuals, mid_block_additional_residual: ControlNet residuals, added to
                every skip and to the mid block's output (both given); the down ones alone are the legacy
                T2I-adapter use (diffusers' FutureWarning).
            down_intrablock_additional_residuals: T2I-adapter residuals, added inside the down path.
            encoder_attention_mask: (B, T) keep-mask over the text tokens, turned into a (1 - mask) * -10000
                bias as diffusers does.
            return_dict: True -> UNet2DConditionOutput(sample=...) (attribute, key and index access);
                False -> a one-element tuple.
        """
        cfg = self.config
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"{_NAME}: sample must be (B, {cfg.in_channels}, H, W), got {got}")
        # None is diffusers' way to run a UNet whose blocks need no text (no transformers, no text
        # pooling or projection); the SimpleCrossAttn blocks then attend to the pixels alone.
        if encoder_hidden_states is not None or self._needs_text:
            if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3:
                got = (tuple(encoder_hidden_states.shape) if isinstance(encoder_hidden_states, torch.Tensor)
                       else type(encoder_hidden_states).__name__)
                raise ValueError(f"{_NAME}: encoder_hidden_states must be (B, tokens, width), got {got}")
        cross_attention_kwargs = _check_cross_attention_kwargs(cross_attention_kwargs)
        # Sides that do not halve evenly all the way down: each upsampler is told the size of the
        # skip it meets next, instead of doubling (diffusers' forward_upsample_size).
        up_factor = 2 ** (len(self.up_blocks) - 1)
        forward_sizes = any(s % up_factor for s in sample.shape[-2:])
        # Keep-masks -> additive biases, once (diffusers' convention: (1 - mask) * -10000, (B, 1, T)).
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._embedding(sample, timestep, encoder_hidden_states, class_labels, timestep_cond,
                              added_cond_kwargs)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)
        context = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                       cross_attention_kwargs=cross_attention_kwargs,
                       encoder_attention_mask=encoder_attention_mask)

        down_res, mid_res = down_block_additional_residuals, mid_block_additional_residual
        is_controlnet = mid_res is not None and down_res is not None
        adapter = down_intrablock_additional_residuals
        adapter = None if adapter is None else list(adapter)  # popped below: the caller's list stays whole
        if adapter is None and mid_res is None and down_res is not None:
            warnings.warn("T2I should not use down_block_additional_residuals: pass them as "
                          "down_intrablock_additional_residuals (diffusers' deprecation, removal in 1.3.0)",
                          FutureWarning, stacklevel=2)
            adapter = list(down_res)

        h = self.conv_in(sample)
        skips = (h,)
        for block in self.down_blocks:
            residual = adapter.pop(0) if adapter else None
            if getattr(block, "has_cross_attention", False):
                h, block_skips = block(h, emb, additional_residuals=residual, **context)
            else:
                h, block_skips = block(h, emb, **context)
                if residual is not None:  # diffusers adds it in place, to the block's last skip as well
                    h = h + residual
                    block_skips = block_skips[:-1] + (h,)
            skips += block_skips
        if is_controlnet:
            skips = tuple(s + r for s, r in zip(skips, down_res))

        if self.mid_block is not None:
            h = self.mid_block(h, emb, **context)
            if adapter and h.shape == adapter[0].shape:  # T2I-Adapter-XL
                h = h + adapter.pop(0)
        if is_controlnet:
            h = h + mid_res

        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if forward_sizes and i < len(self.up_blocks) - 1 else None
            h = block(h, level_skips, emb, upsample_size=size, **context)

        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        h = self.conv_out(h)
        return UNet2DConditionOutput(sample=h) if return_dict else (h,)


def _check_cross_attention_kwargs(kwargs):
    """diffusers' handling: "scale" is the LoRA scale (popped); other keys are ignored with a warning."""
    if not kwargs:
        return None
    kwargs = dict(kwargs)
    scale = kwargs.pop("scale", 1.0)
    if scale != 1.0:
        warnings.warn("Passing `scale` via `cross_attention_kwargs` when not using the PEFT backend is "
                      "ineffective.", stacklevel=3)
    if kwargs:
        warnings.warn(f"cross_attention_kwargs {list(kwargs)} are not expected by diffkern's attention and "
                      "will be ignored.", stacklevel=3)
    return None


DEFAULTS = defaults(UNet2DConditionModel)  # diffusers' constructor defaults (what a config.json leaves out)
