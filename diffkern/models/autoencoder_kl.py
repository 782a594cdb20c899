"""The KL-regularised autoencoder of Latent Diffusion / Stable Diffusion (the "VAE"), on diffkern ops.

AutoencoderKL is diffusers' ModelMixin + ConfigMixin with diffusers' constructor and exactly its
state_dict keys and shapes (DownEncoderBlock2D / UpDecoderBlock2D blocks, SiLU), so a checkpoint's `vae`
folder loads with from_pretrained. encode / decode / forward return diffusers' output objects (AutoencoderKLOutput with
`.latent_dist`, DecoderOutput with `.sample`; return_dict=False gives tuples), and enable_tiling /
enable_slicing give diffusers' tiled and sliced results, so the model drops into diffusers pipelines.
`force_upcast` is carried in the config for the pipelines that read it (as diffusers' model does).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffkern.models._config import NoAttentionProcessors, check_options, defaults
from diffkern.models.unet_blocks.cross_attn import Checkpointed
from diffkern.nn.group_norm import GroupNorm
from diffkern.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffkern.nn.transformer import SpatialSelfAttention

_NAME = "AutoencoderKL"
VAE_EPS = 1e-6  # every GroupNorm of the CompVis autoencoder

UNSUPPORTED = dict(act_fn=("silu", "swish"))


class UNetMidBlock2D(Checkpointed, nn.Module):
    """diffusers' UNetMidBlock2D without time embedding: resnet, single-head self-attention, resnet."""

    def __init__(self, channels, groups, add_attention=True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups=groups, eps=VAE_EPS)
                                      for _ in range(2)])
        self.attentions = (nn.ModuleList([SpatialSelfAttention(channels, channels, norm_num_groups=groups,
                                                               eps=VAE_EPS)])
                           if add_attention else None)

    def forward(self, h):
        h = self._run(self.resnets[0], h)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self._run(self.resnets[1], h)


class _Level(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional resampler."""

    def __init__(self, in_channels, out_channels, num_layers, groups, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=VAE_EPS)
            for i in range(num_layers)])
        if resample == "down":
            # padding 0 + an asymmetric (0, 1, 0, 1) pad: the CompVis encoder's downsampling.
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, out_channels, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)])

    def forward(self, h):
        for resnet in self.resnets:
            h = resnet(h)
        resamplers = getattr(self, "downsamplers", None) or getattr(self, "upsamplers", None)
        return h if resamplers is None else resamplers[0](h)


class Encoder(Checkpointed, nn.Module):
    """Image (B, in, H, W) -> moments (B, 2 * latent, h, w); each level floors the size by 2."""

    def __init__(self, cfg):
        super().__init__()
        ch, groups, levels = list(cfg.block_out_channels), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList([
            _Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, "down" if i < levels - 1 else None)
            for i in range(levels)])
        self.mid_block = UNetMidBlock2D(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=VAE_EPS, activation="silu")
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = self._run(block, h)
        return self.conv_out(self.conv_norm_out(self._run(self.mid_block, h)))


class Decoder(Checkpointed, nn.Module):
    """Latent (B, latent, h, w) -> image (B, out, h * 2**(levels-1), ...)."""

    def __init__(self, cfg):
        super().__init__()
        rev, groups = list(cfg.block_out_channels)[::-1], cfg.norm_num_groups
        levels = len(rev)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], kernel_size=3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            _Level(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, groups,
                   "up" if i < levels - 1 else None)
            for i in range(levels)])
        self.conv_norm_out = GroupNorm(groups, rev[-1], eps=VAE_EPS, activation="silu")
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z):
        h = self._run(self.mid_block, self.conv_in(z))
        # The up blocks may be kept in another dtype than the rest (diffusers' upcast pattern).
        h = h.to(next(self.up_blocks.parameters()).dtype)
        for block in self.up_blocks:
            h = self._run(block, h)
        return self.conv_out(self.conv_norm_out(h))


class AutoencoderKL(NoAttentionProcessors, ModelMixin, ConfigMixin):
    """KL autoencoder: encode(x).latent_dist -> DiagonalGaussianDistribution, decode(z).sample -> image.

    diffusers' ModelMixin + ConfigMixin with diffusers' constructor (arguments and defaults of 0.42):
    from_config / from_pretrained / save_pretrained are diffusers' own. Values this module does not
    implement (act_fn other than SiLU, block types other than DownEncoderBlock2D / UpDecoderBlock2D)
    raise ValueError naming the option. config.scaling_factor (0.18215 for SD1/LDM) is what latents are
    multiplied by before the UNet; this module does not apply it (as diffusers' does not).

    forward(sample, sample_posterior=False, return_dict=True, generator=None) =
    decode(posterior.sample(generator) or mode()).
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D"]
    _group_offload_block_modules = ["quant_conv", "post_quant_conv", "encoder", "decoder"]

    @register_to_config
    def __init__(self, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1, act_fn="silu",
                 latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215, shift_factor=None,
                 latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=True, use_post_quant_conv=True,
                 mid_block_add_attention=True):
        super().__init__()
        cfg = self.config
        check_options(_NAME, cfg, UNSUPPORTED)
        levels = len(cfg.block_out_channels)
        for key, types, allowed in (("down_block_types", cfg.down_block_types, "DownEncoderBlock2D"),
                                    ("up_block_types", cfg.up_block_types, "UpDecoderBlock2D")):
            if len(types) != levels:
                raise ValueError(f"{_NAME}: {key} must have one entry per block_out_channels ({levels}), got "
                                 f"{len(types)}")
            bad = [t for t in types if t != allowed]
            if bad:
                raise ValueError(f"{_NAME}: {key} {bad} are not supported (supported: {allowed})")
        bad_groups = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
        if bad_groups:
            raise ValueError(f"{_NAME}: norm_num_groups {cfg.norm_num_groups} must divide every "
                             f"block_out_channels entry, got {list(cfg.block_out_channels)}")
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        latent = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, kernel_size=1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, kernel_size=1) if cfg.use_post_quant_conv else None
        self.use_slicing = self.use_tiling = False
        # diffusers' tiling attributes (users set them to change the tile size)
        size = cfg.sample_size[0] if isinstance(cfg.sample_size, (list, tuple)) else cfg.sample_size
        self.tile_sample_min_size = size
        self.tile_latent_min_size = int(size / (2 ** (levels - 1)))
        self.tile_overlap_factor = 0.25

    # ------------------------------------------------------------------------------------------
    # diffusers' memory savers: slicing (one image at a time) and tiling (overlapping tiles, blended)

    def enable_tiling(self):
        """Encode / decode large inputs as overlapping tiles of config.sample_size pixels, blended
        linearly over a quarter of a tile (diffusers' tiling: same tiles, same blend, same results)."""
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    def enable_slicing(self):
        """Encode / decode a batch one image at a time (less peak memory, the same results)."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def _moments(self, x):
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled(x, self.tile_sample_min_size, self.tile_latent_min_size, self._encode_tile)
        return self._encode_tile(x)

    def _encode_tile(self, x):
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _image(self, z):
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled(z, self.tile_latent_min_size, self.tile_sample_min_size, self._decode_tile)
        return self._decode_tile(z)

    def _decode_tile(self, z):
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def _tiled(self, x, tile_in, tile_out, fn):
        """diffusers' tiled_encode / tiled_decode: tiles of `tile_in` every 3/4 tile, each blended with
        its (already blended) upper and left neighbours over `tile_out / 4` rows / columns, then cropped."""
        step = int(tile_in * (1 - self.tile_overlap_factor))
        blend = int(tile_out * self.tile_overlap_factor)
        keep = tile_out - blend
        rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], step)]
                for i in range(0, x.shape[2], step)]
        out = []
        for i, row in enumerate(rows):
            for j in range(len(row)):
                tile = row[j]
                if i > 0:
                    tile = _blend(rows[i - 1][j], tile, blend, dim=2)
                if j > 0:
                    tile = _blend(row[j - 1], tile, blend, dim=3)
                row[j] = tile  # later neighbours blend with the blended tile, as in diffusers
            out.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        return torch.cat(out, dim=2)

    # ------------------------------------------------------------------------------------------

    def encode(self, x, return_dict=True):
        """Image (B, in_channels, H, W), roughly in [-1, 1] -> AutoencoderKLOutput(latent_dist=posterior
        over (B, latent, H/f, W/f)), or (posterior,) with return_dict=False (diffusers' contract)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"{_NAME}.encode: x must be (B, {self.config.in_channels}, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._moments(one) for one in x.split(1)])
        else:
            moments = self._moments(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z, return_dict=True, generator=None):
        """Latent (B, latent_channels, h, w) (unscaled: divide by scaling_factor first) ->
        DecoderOutput(sample=image), or (image,) with return_dict=False. `generator` is accepted for
        diffusers' signature and unused (the KL decoder draws no noise)."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"{_NAME}.decode: z must be (B, {self.config.latent_channels}, h, w), got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        if self.use_slicing and z.shape[0] > 1:
            image = torch.cat([self._image(one) for one in z.split(1)])
        else:
            image = self._image(z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, sample, sample_posterior=False, return_dict=True, generator=None):
        """decode(posterior.sample(generator) if sample_posterior else posterior.mode()), as diffusers."""
        posterior = self.encode(sample).latent_dist
        image = self.decode(posterior.sample(generator) if sample_posterior else posterior.mode()).sample
        return DecoderOutput(sample=image) if return_dict else (image,)


def _blend(a, b, extent, dim):
    """b's first `extent` rows (dim=2) / columns (dim=3) faded in from a's last ones (diffusers'
    blend_v / blend_h)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    # Weights in float64 then rounded to the tensor's dtype, as Python-scalar weights are.
    w = (torch.arange(extent, dtype=torch.float64) / extent).view(shape)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w).to(b.dtype).to(b.device) \
        + b.narrow(dim, 0, extent) * w.to(b.dtype).to(b.device)
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


DEFAULTS = defaults(AutoencoderKL)  # diffusers' constructor defaults (what a config.json leaves out)
