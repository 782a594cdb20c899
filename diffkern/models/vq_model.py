"""The VQ-regularised autoencoder of Latent Diffusion (diffusers' VQModel), on diffkern ops.

VQModel stands on diffusers: it is a ModelMixin + ConfigMixin subclass with diffusers' exact constructor
(@register_to_config), state_dict keys and outputs (VQEncoderOutput, DecoderOutput with commit_loss), so
`VQModel.from_pretrained(folder / "vqvae")`, `save_pretrained` and `from_config` are diffusers' own and
the model drops into diffusers' LDMPipeline / LDMSuperResolutionPipeline. The encoder and decoder are
diffkern's KL-autoencoder ones (diffkern.models.autoencoder_kl: fused GroupNorm + SiLU, diffkern
attention); the quantizer is diffusers' VectorQuantizer itself (a nearest-codebook lookup: argmin of
torch.cdist, legacy commitment loss with beta = 0.25), so the codes chosen are diffusers' bit for bit.

    vq = VQModel.from_pretrained("ldm-celebahq-256/vqvae")
    h = vq.encode(image).latents              # (B, vq_embed_dim, H/f, W/f), before quantization
    image = vq.decode(h).sample               # quantize -> post_quant_conv -> decoder
    image = vq.decode(h, force_not_quantize=True).sample   # skip the codebook (LDM samples do not)

Supported: norm_type "group" (the LDM autoencoders; "spatial" is Kandinsky's MoVQ) with
DownEncoderBlock2D / UpDecoderBlock2D blocks and a SiLU activation; other values raise ValueError naming
the option. lookup_from_codebook (decode from code indices, with `shape`) works as in diffusers.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, VectorQuantizer
from diffusers.models.autoencoders.vq_model import VQEncoderOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffkern.models.autoencoder_kl import Decoder, Encoder

__all__ = ["VQModel", "VQEncoderOutput", "DecoderOutput"]

_NAME = "VQModel"
_SUPPORTED = dict(norm_type=("group",), act_fn=("silu", "swish"))


class VQModel(ModelMixin, ConfigMixin):
    """VQ-VAE: encode(x).latents -> unquantized h; decode(h).sample -> image (quantizing first).

    Constructor, config keys and defaults are diffusers' VQModel's (0.42). scaling_factor is carried
    for pipelines (diffusers' LDM pipelines do not apply it to VQ latents; neither does this model).
    """

    config_name = "config.json"
    _skip_layerwise_casting_patterns = ["quantize"]
    _supports_group_offloading = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple = ("DownEncoderBlock2D",),
        up_block_types: tuple = ("UpDecoderBlock2D",),
        block_out_channels: tuple = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",
        mid_block_add_attention=True,
        lookup_from_codebook=False,
        force_upcast=False,
    ):
        super().__init__()
        for key, allowed in _SUPPORTED.items():
            value = locals()[key]
            if value not in allowed:
                raise ValueError(f"{_NAME}: {key}={value!r} is not supported (supported: "
                                 f"{', '.join(map(repr, allowed))})")
        levels = len(block_out_channels)
        for key, types, allowed in (("down_block_types", down_block_types, "DownEncoderBlock2D"),
                                    ("up_block_types", up_block_types, "UpDecoderBlock2D")):
            if len(types) != levels:
                raise ValueError(f"{_NAME}: {key} must have one entry per block_out_channels ({levels}), "
                                 f"got {len(types)}")
            bad = [t for t in types if t != allowed]
            if bad:
                raise ValueError(f"{_NAME}: {key} {bad} are not supported (supported: {allowed})")
        bad_groups = [c for c in block_out_channels if c % norm_num_groups]
        if bad_groups:
            raise ValueError(f"{_NAME}: norm_num_groups {norm_num_groups} must divide every "
                             f"block_out_channels entry, got {list(block_out_channels)}")
        # diffkern's KL encoder / decoder read these fields; the encoder's output is single (double_z=False).
        blocks = SimpleNamespace(in_channels=in_channels, out_channels=out_channels,
                                 block_out_channels=tuple(block_out_channels),
                                 layers_per_block=layers_per_block,
                                 norm_num_groups=norm_num_groups, latent_channels=latent_channels,
                                 mid_block_add_attention=mid_block_add_attention)
        self.encoder = Encoder(blocks)
        self.encoder.conv_out = nn.Conv2d(block_out_channels[-1], latent_channels, kernel_size=3, padding=1)
        vq_embed_dim = vq_embed_dim if vq_embed_dim is not None else latent_channels
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, vq_embed_dim, beta=0.25, remap=None,
                                        sane_index_shape=False)
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder(blocks)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Image (B, in_channels, H, W) in [-1, 1] -> VQEncoderOutput(latents=h), h unquantized
        (B, vq_embed_dim, H/f, W/f); (h,) with return_dict=False."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"{_NAME}.encode: x must be (B, {self.config.in_channels}, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        h = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True, shape=None):
        """h (B, vq_embed_dim, h, w) -> DecoderOutput(sample=image, commit_loss=(B,) or scalar loss).

        Quantizes h to its nearest codebook vectors first unless force_not_quantize; with
        force_not_quantize and config.lookup_from_codebook, h holds code indices and `shape` is
        (B, h, w, vq_embed_dim) (diffusers' contract). return_dict=False gives (image, commit_loss)."""
        if not isinstance(h, torch.Tensor):
            raise ValueError(f"{_NAME}.decode: h must be a tensor, got {type(h).__name__}")
        if not force_not_quantize:
            quant, commit_loss, _ = self.quantize(h)
        elif self.config.lookup_from_codebook:
            quant = self.quantize.get_codebook_entry(h, shape)
            commit_loss = torch.zeros((h.shape[0])).to(h.device, dtype=h.dtype)
        else:
            quant = h
            commit_loss = torch.zeros((h.shape[0])).to(h.device, dtype=h.dtype)
        embed = self.quantize.vq_embed_dim
        if quant.dim() != 4 or quant.shape[1] != embed:
            raise ValueError(f"{_NAME}.decode: h must be (B, {embed}, h, w), got {tuple(quant.shape)}")
        dec = self.decoder(self.post_quant_conv(quant))
        return DecoderOutput(sample=dec, commit_loss=commit_loss) if return_dict else (dec, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """decode(encode(sample).latents): the reconstruction (quantized), with its commitment loss."""
        dec = self.decode(self.encode(sample).latents)
        return dec if return_dict else (dec.sample, dec.commit_loss)
