"""Multi-head self/cross attention module on diffkern.ops.attention."""

from torch import nn

from diffkern import ops


class Attention(nn.Module):
    """Multi-head attention: q/k/v projections, diffkern.ops.attention, output projection.

    Attention(query_dim, context_dim=None, heads=8, dim_head=None, *, fused_qkv=False,
              prefix_dim=None, qkv_bias=False, out_bias=True, dropout=0.0, backend=None)

    - heads x dim_head = inner width (dim_head defaults to query_dim // heads).
    - context_dim: cross-attention keys/values come from `context` (B, M, context_dim) (SD/LDM
      text conditioning); None for self-attention.
    - fused_qkv: one `to_qkv` projection laid out [q | k | v] (self-attention only).
    - prefix_dim: `to_prefix_kv` projects `prefix` tokens (B, P, prefix_dim) to keys and values
      attended before the main ones and always visible: the `encoder_kv` of the ADM UNets of
      GLIDE, the DALL-E 2 decoder and Imagen.
    Parameter names follow diffusers' and CompVis' attention (to_q, to_k, to_v, to_out.0), so their
    state dicts load as they are; OpenAI checkpoints (fused conv qkv, per-head interleaved) go
    through the model converters.

    forward(x, context=None, prefix=None, attn_bias=None, causal=False) -> (B, N, query_dim).
    Heads are split by views (no copies); the op reads the strided tensors in place.
    """

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=None, *, fused_qkv=False, prefix_dim=None,
                 qkv_bias=False, out_bias=True, dropout=0.0, backend=None):
        super().__init__()
        dim_head = dim_head or query_dim // heads
        if dim_head <= 0:
            raise ValueError(f"Attention: dim_head must be positive, got {dim_head}")
        if fused_qkv and context_dim is not None:
            raise ValueError("Attention: fused_qkv is for self-attention; give context_dim=None")
        inner = heads * dim_head
        self.heads, self.dim_head, self.backend = heads, dim_head, backend
        self.is_cross = context_dim is not None
        if fused_qkv:
            self.to_qkv = nn.Linear(query_dim, 3 * inner, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
            self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
            self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_prefix_kv = nn.Linear(prefix_dim, 2 * inner, bias=True) if prefix_dim else None
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def _split(self, t):
        """(B, S, heads * dim_head) -> (B, heads, S, dim_head) view."""
        B, S, _ = t.shape
        return t.view(B, S, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x, context=None, prefix=None, attn_bias=None, causal=False):
        if self.is_cross and context is None:
            raise ValueError("Attention: this is a cross-attention layer; pass context")
        if hasattr(self, "to_qkv"):
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            src = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(src), self.to_v(src)
        kv_prefix = None
        if prefix is not None:
            if self.to_prefix_kv is None:
                raise ValueError("Attention: prefix given but the layer was built without prefix_dim")
            kp, vp = self.to_prefix_kv(prefix).chunk(2, dim=-1)
            kv_prefix = (self._split(kp), self._split(vp))
        out = ops.attention(self._split(q), self._split(k), self._split(v), attn_bias=attn_bias, causal=causal,
                            kv_prefix=kv_prefix, backend=self.backend)
        B, _, N, _ = out.shape
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.dim_head)
        return self.to_out[1](self.to_out[0](out))
