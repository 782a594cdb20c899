"""GLIDE's text transformer (OpenAI's `xf.py`, itself CLIP's text transformer without the causal mask).

Keys as OpenAI's: resblocks.{i}.ln_1, attn.c_qkv, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj. Pre-norm
residual blocks of full (non-causal, unmasked) multi-head self-attention and a GELU MLP:

    x = x + c_proj(attention(c_qkv(ln_1(x))));   x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))

GLIDE feeds every one of the text_ctx positions to the transformer: padding positions are not masked
out, they carry a learned padding embedding instead (see Text2ImUNet).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from diffkern import ops


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever x's dtype (OpenAI keeps its parameters float32 under
    fp16 and casts the input up and the output back)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class MultiheadAttention(nn.Module):
    """Self-attention with OpenAI's fused, per-head interleaved c_qkv.

    c_qkv's 3*width outputs are laid out per head [q_h | k_h | v_h] (ch = width / heads each), i.e.
    ``qkv.view(B, T, heads, 3 * ch)`` split in three along the last axis, not [q | k | v]. The scale
    1/sqrt(sqrt(ch)) OpenAI applies to q and to k is 1/sqrt(ch) on the scores. q, k, v reach the
    attention op as strided views of c_qkv's output.
    """

    def __init__(self, width, heads):
        super().__init__()
        if heads <= 0 or width % heads:
            raise ValueError(f"MultiheadAttention: heads ({heads}) must divide width ({width})")
        self.width, self.heads = width, heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, W = x.shape
        ch = W // self.heads
        qkv = self.c_qkv(x).view(B, T, self.heads, 3, ch)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, heads, T, ch) views
        out = ops.attention(q, k, v, scale=ch ** -0.5)
        return self.c_proj(out.transpose(1, 2).reshape(B, T, W))


class MLP(nn.Module):
    """c_fc (width -> 4 width), exact (erf) GELU, c_proj back."""

    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: attention then MLP, each added to the residual stream."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """`layers` ResidualAttentionBlocks (key `resblocks`). forward(x: (B, T, width)) -> (B, T, width).

    n_ctx is recorded for OpenAI's signature only: nothing here depends on the sequence length."""

    def __init__(self, n_ctx, width, layers, heads):
        super().__init__()
        self.n_ctx, self.width, self.layers = n_ctx, width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"Transformer: x must be (B, T, {self.width}), got {tuple(x.shape)}")
        for block in self.resblocks:
            x = block(x)
        return x

    def convert_to_fp16(self):
        """Linear weights and biases to float16; LayerNorms stay float32 (OpenAI's xf convert)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.half()

    def convert_to_fp32(self):
        """Undo convert_to_fp16."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.float()
