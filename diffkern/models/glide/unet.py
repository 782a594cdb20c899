"""OpenAI's ADM UNet and GLIDE's text-conditioned Text2ImUNet, on diffkern ops, with OpenAI's keys.

UNetModel is the improved-diffusion / guided-diffusion / GLIDE torso:

    time_embed        Linear(model_channels, 4 mc), SiLU, Linear(4 mc, 4 mc) on the [cos | sin] embedding
    input_blocks      [conv_in] + per level: num_res_blocks x (ResBlock [+ AttentionBlock]),
                      then (except at the last level) a Downsample or a ResBlock(down=True)
    middle_block      ResBlock, AttentionBlock, ResBlock
    output_blocks     per level, reversed: (num_res_blocks + 1) x (ResBlock on [h, skip]
                      [+ AttentionBlock]), the last one followed by an Upsample or ResBlock(up=True)
    out               GroupNorm32 + SiLU (out.0, fused), zero-initialised conv (out.2)

Text2ImUNet adds GLIDE's text transformer (keys token_embedding, positional_embedding,
padding_embedding, transformer.*, final_ln, transformer_proj) and the super-resolution (low_res) and
inpainting (inpaint_image, inpaint_mask) inputs of OpenAI's SuperResText2ImUNet,
InpaintText2ImUNet and SuperResInpaintText2ImUnet, selected by the super_res / inpaint flags of one
class. diffkern.models.glide.create_model builds it from OpenAI's option names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffkern.models.glide.blocks import (AttentionBlock, Downsample, GroupNorm32, ResBlock,
                                          TimestepEmbedSequential, Upsample, timestep_embedding)
from diffkern.models.glide.text import LayerNorm, Transformer

GLIDE_N_VOCAB = 50257  # GLIDE's tokenizer is GPT-2's BPE: 50257 tokens


class UNetModel(nn.Module):
    """ADM UNet (OpenAI's UNetModel, 2-D). Arguments as OpenAI's:

    in_channels, model_channels, out_channels (6 = eps and the variance interpolation when the
    variance is learned), num_res_blocks, attention_resolutions (downsample rates ds, e.g. (2, 4, 8)
    for attention at 32, 16, 8 px of a 64 px model), dropout, channel_mult, conv_resample,
    num_classes (class-conditional: label_emb), use_fp16, num_heads, num_head_channels (overrides
    num_heads when not -1), num_heads_upsample (-1: num_heads), use_scale_shift_norm,
    resblock_updown, encoder_channels (width of the text tokens every AttentionBlock attends to).

    use_fp16=True converts the torso to float16 at construction (OpenAI's convert_to_fp16, see there);
    OpenAI leaves that call to the user. forward(x, timesteps, y=None) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, num_classes=None, use_fp16=False,
                 num_heads=1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 resblock_updown=False, encoder_channels=None):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.dtype = torch.float32

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(cin, cout, **updown):
            return ResBlock(cin, emb_dim, dropout, out_channels=cout,
                            use_scale_shift_norm=use_scale_shift_norm, **updown)

        def attn(ch, heads):
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  encoder_channels=encoder_channels)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch, activation="silu"), nn.Identity(),
                                 nn.Conv2d(input_ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)  # OpenAI's zero_module
        nn.init.zeros_(self.out[2].bias)
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self):
        """Convert the torso (input, middle and output blocks) to float16, as OpenAI does: conv
        weights and biases only. The time embedding, the ResBlocks' emb_layers Linears, every norm's
        affine parameters and the `out` head stay float32; activations run in float16 from the first
        conv to the last output block. Also sets self.dtype (OpenAI sets it from use_fp16 only)."""
        self._convert_torso(torch.float16)

    def convert_to_fp32(self):
        """Undo convert_to_fp16."""
        self._convert_torso(torch.float32)

    def _convert_torso(self, dtype):
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.to(dtype)
        self.dtype = dtype

    def _check_x(self, x, channels, name="x"):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: {name} must be (B, {channels}, H, W), got {got}")

    def _time_embedding(self, x, timesteps):
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"{type(self).__name__}: timesteps must be a scalar or ({x.shape[0]},), "
                             f"got {tuple(timesteps.shape)}")
        sinusoid = timestep_embedding(timesteps, self.model_channels)
        return self.time_embed(sinusoid.to(self.time_embed[0].weight))

    def _torso(self, x, emb, encoder_out=None):
        """Input, middle and output blocks in self.dtype, then `out` in x's dtype."""
        h, skips = x.to(self.dtype), []
        for block in self.input_blocks:
            h = block(h, emb, encoder_out)
            skips.append(h)
        h = self.middle_block(h, emb, encoder_out)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, encoder_out)
        return self.out(h.to(x.dtype))

    def forward(self, x, timesteps, y=None):
        """x: (B, in_channels, H, W), H and W divisible by 2 ** (len(channel_mult) - 1); timesteps:
        (B,) or a scalar; y: (B,) class labels, exactly when num_classes was given."""
        self._check_x(x, self.in_channels)
        if (y is None) != (self.num_classes is None):
            raise ValueError(f"UNetModel: y must be given exactly when the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        emb = self._time_embedding(x, timesteps)
        if y is not None:
            emb = emb + self.label_emb(y)
        return self._torso(x, emb)


class Text2ImUNet(UNetModel):
    """GLIDE's text-conditional UNet (OpenAI's Text2ImUNet and its super-res / inpaint subclasses).

    Text: tokens (B, text_ctx) -> token_embedding + positional_embedding; with xf_padding the
    positions where mask is False take padding_embedding instead (no attention mask: GLIDE attends
    to every position); the transformer (+ final_ln) gives xf_out (B, text_ctx, xf_width). The last
    position, through transformer_proj, is added to the time embedding; the whole sequence,
    as (B, xf_width, text_ctx), is every AttentionBlock's encoder_out. xf_width=0 builds no text
    branch (an unconditional ADM UNet).

    Args (besides UNetModel's, with in_channels = the image channels, 3):
        text_ctx, xf_width, xf_layers, xf_heads, xf_final_ln, xf_padding: OpenAI's options.
        n_vocab: token vocabulary (GLIDE's GPT-2 BPE: 50257).
        super_res: also take low_res, bilinearly resized to x's size and concatenated (in_channels x2).
        inpaint: also take inpaint_image and inpaint_mask, concatenated as image * mask, mask
            (in_channels x2 + 1; x3 + 1 with super_res, low_res last).
        cache_text_emb: accepted for OpenAI's signature and ignored: the text is encoded on every
            call (cheap beside the UNet); call encode_text once yourself to reuse it.

    forward(x, timesteps, tokens=None, mask=None, *, low_res=None, inpaint_image=None,
    inpaint_mask=None) -> (B, out_channels, H, W).
    """

    def __init__(self, text_ctx, xf_width, xf_layers, xf_heads, xf_final_ln, *, n_vocab=GLIDE_N_VOCAB,
                 xf_padding=False, cache_text_emb=False, super_res=False, inpaint=False, in_channels=3,
                 use_fp16=False, **unet_kwargs):
        self.image_channels = in_channels
        in_channels = in_channels * (1 + int(super_res) + int(inpaint)) + int(inpaint)
        super().__init__(in_channels=in_channels, encoder_channels=xf_width or None, **unet_kwargs)
        self.text_ctx, self.xf_width, self.xf_padding = text_ctx, xf_width, xf_padding
        self.super_res, self.inpaint, self.cache_text_emb = super_res, inpaint, cache_text_emb
        if xf_width:
            self.transformer = Transformer(text_ctx, xf_width, xf_layers, xf_heads)
            self.final_ln = LayerNorm(xf_width) if xf_final_ln else None
            self.token_embedding = nn.Embedding(n_vocab, xf_width)
            # OpenAI leaves these two uninitialised (torch.empty); small normals keep fresh models finite.
            self.positional_embedding = nn.Parameter(0.01 * torch.randn(text_ctx, xf_width))
            self.transformer_proj = nn.Linear(xf_width, 4 * self.model_channels)
            if xf_padding:
                self.padding_embedding = nn.Parameter(0.01 * torch.randn(text_ctx, xf_width))
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self):
        """UNetModel's conversion plus the text branch as OpenAI converts it: transformer Linears,
        transformer_proj and token_embedding to float16; LayerNorms stay float32. OpenAI's call on
        positional_embedding / padding_embedding (Parameter.to) returns a copy it discards, so in
        the released setup those stay float32; they stay float32 here too."""
        super().convert_to_fp16()
        self._convert_text(torch.float16)

    def convert_to_fp32(self):
        """Undo convert_to_fp16."""
        super().convert_to_fp32()
        self._convert_text(torch.float32)

    def _convert_text(self, dtype):
        if self.xf_width:
            if dtype == torch.float16:
                self.transformer.convert_to_fp16()
            else:
                self.transformer.convert_to_fp32()
            self.transformer_proj.to(dtype)
            self.token_embedding.to(dtype)

    def encode_text(self, tokens, mask=None):
        """tokens (B, text_ctx) int, mask (B, text_ctx) bool (True = real token; required with
        xf_padding) -> (xf_proj (B, 4 model_channels), xf_out (B, xf_width, text_ctx))."""
        if not self.xf_width:
            raise ValueError("Text2ImUNet: this model has no text branch (xf_width=0)")
        if tokens is None:
            raise ValueError("Text2ImUNet: tokens are required (the model is text-conditional)")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] != self.text_ctx:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"Text2ImUNet: tokens must be (B, text_ctx={self.text_ctx}), got {got}")
        xf_in = self.token_embedding(tokens.long()) + self.positional_embedding[None]
        if self.xf_padding:
            if mask is None:
                raise ValueError("Text2ImUNet: mask is required with xf_padding (True marks real tokens)")
            if not isinstance(mask, torch.Tensor) or mask.shape != tokens.shape:
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"Text2ImUNet: mask must have the shape of tokens {tuple(tokens.shape)}, "
                                 f"got {got}")
            xf_in = torch.where(mask.bool()[..., None], xf_in, self.padding_embedding[None])
        xf_out = self.transformer(xf_in.to(self.dtype))
        if self.final_ln is not None:
            xf_out = self.final_ln(xf_out)
        xf_proj = self.transformer_proj(xf_out[:, -1])
        return xf_proj, xf_out.permute(0, 2, 1)

    def _conditioned_input(self, x, low_res, inpaint_image, inpaint_mask):
        """x with the inpainting and low-res inputs concatenated on channels, in OpenAI's order."""
        C = self.image_channels
        self._check_x(x, C)
        B, _, H, W = x.shape
        parts = [x]
        if self.inpaint:
            inpaint_image = torch.zeros_like(x) if inpaint_image is None else inpaint_image
            inpaint_mask = torch.zeros_like(x[:, :1]) if inpaint_mask is None else inpaint_mask
            for name, t, c in (("inpaint_image", inpaint_image, C), ("inpaint_mask", inpaint_mask, 1)):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, c, H, W):
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"Text2ImUNet: {name} must be ({B}, {c}, {H}, {W}), got {got}")
            parts += [inpaint_image * inpaint_mask, inpaint_mask]
        elif inpaint_image is not None or inpaint_mask is not None:
            raise ValueError("Text2ImUNet: inpaint_image / inpaint_mask given to a model built "
                             "without inpaint")
        if self.super_res:
            if not isinstance(low_res, torch.Tensor) or low_res.dim() != 4 or low_res.shape[:2] != (B, C):
                got = tuple(low_res.shape) if isinstance(low_res, torch.Tensor) else type(low_res).__name__
                raise ValueError(f"Text2ImUNet: low_res must be ({B}, {C}, h, w) for this super-resolution "
                                 f"model, got {got}")
            parts.append(F.interpolate(low_res, (H, W), mode="bilinear", align_corners=False))
        elif low_res is not None:
            raise ValueError("Text2ImUNet: low_res given to a model built without super_res")
        return torch.cat(parts, dim=1) if len(parts) > 1 else x

    def forward(self, x, timesteps, tokens=None, mask=None, *, low_res=None, inpaint_image=None,
                inpaint_mask=None):
        """x: (B, 3, H, W) noisy image; timesteps: (B,) or a scalar; tokens, mask: (B, text_ctx);
        low_res: (B, 3, h, w) (super_res models); inpaint_image (B, 3, H, W), inpaint_mask
        (B, 1, H, W) (inpaint models; zeros when omitted, as OpenAI's)."""
        h = self._conditioned_input(x, low_res, inpaint_image, inpaint_mask)
        emb = self._time_embedding(h, timesteps)
        xf_out = None
        if self.xf_width:
            xf_proj, xf_out = self.encode_text(tokens, mask)
            emb = emb + xf_proj.to(emb)
        elif tokens is not None:
            raise ValueError("Text2ImUNet: tokens given to a model without a text branch (xf_width=0)")
        return self._torso(h, emb, xf_out)
