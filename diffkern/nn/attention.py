"""Multi-head self/cross attention modules on diffkern.ops.attention."""

from torch import nn

from diffkern import ops
from diffkern.nn.group_norm import GroupNorm


def mask_to_bias(mask, dtype):
    """diffusers' attention masks -> an ops.attention bias broadcasting over heads and queries.

    A (B, S) keep-mask (1 = attend) becomes (1 - mask) * -10000, as diffusers converts it; a (B, 1, S)
    tensor is taken as that bias already (the UNet converts once at the top). Returns (B, 1, 1, S)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = ((1 - mask.to(dtype)) * -10000.0)[:, None, :]
    return mask[:, :, None, :].to(dtype)


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


class AddedKVAttention(nn.Module):
    """Self-attention over a feature map's pixels plus text keys/values placed before them:
    diffusers' Attention(added_kv_proj_dim=...) with AttnAddedKVProcessor, the attention of the
    SimpleCrossAttn blocks (DeepFloyd IF, the unCLIP decoder; GLIDE's `encoder_kv`).

        h = group_norm(x) as (B, HW, C);  text = norm_cross(context)
        keys   = [add_k_proj(text) | to_k(h)]   (only to_k's part is dropped with only_cross_attention)
        values = [add_v_proj(text) | to_v(h)]
        out = x + to_out(softmax(to_q(h) keys^T / sqrt(dim_head) + bias) values)

    The text keys go to ops.attention as `kv_prefix` (never concatenated with the pixel keys).

    Args:
        query_dim: channels of the feature map.
        heads, dim_head: heads x dim_head is the inner width.
        added_kv_proj_dim: width of the text tokens (the UNet's cross_attention_dim).
        norm_num_groups: groups of `group_norm` (eps 1e-5, as diffusers builds it).
        only_cross_attention: no to_k / to_v: the pixels attend to the text only (IF stage II).
        cross_attention_norm: None, "layer_norm" (query_dim wide, as diffusers builds it) or "group_norm"
            (`norm_cross` on the text, added_kv_proj_dim channels in 32 groups).

    forward(x (B, C, H, W), context (B, T, added_kv_proj_dim) or None, attention_mask=None):
    attention_mask covers the text keys: a (B, 1, T) additive bias as diffusers' UNet hands it over
    ((1 - mask) * -10000), or a (B, T) keep-mask converted the same way; the pixel keys are never
    masked. Without context the feature map is its own "text", as in diffusers.
    """

    def __init__(self, query_dim, heads, dim_head, added_kv_proj_dim, *, norm_num_groups=32,
                 only_cross_attention=False, cross_attention_norm=None, cross_attention_norm_num_groups=32,
                 dropout=0.0, backend=None):
        super().__init__()
        if cross_attention_norm not in (None, "layer_norm", "group_norm"):
            raise ValueError(f"AddedKVAttention: cross_attention_norm must be None, 'layer_norm' or 'group_norm', "
                             f"got {cross_attention_norm!r}")
        inner = heads * dim_head
        self.heads, self.dim_head, self.backend = heads, dim_head, backend
        self.only_cross_attention = only_cross_attention
        self.group_norm = GroupNorm(norm_num_groups, query_dim, eps=1e-5)
        self.to_q = nn.Linear(query_dim, inner, bias=True)
        if not only_cross_attention:
            self.to_k = nn.Linear(query_dim, inner, bias=True)
            self.to_v = nn.Linear(query_dim, inner, bias=True)
        self.add_k_proj = nn.Linear(added_kv_proj_dim, inner)
        self.add_v_proj = nn.Linear(added_kv_proj_dim, inner)
        self.norm_cross = None
        if cross_attention_norm == "layer_norm":
            # diffusers sizes it by the attention's cross_attention_dim, which these blocks set to the
            # channels: it only applies when the text is as wide as the feature map.
            self.norm_cross = nn.LayerNorm(query_dim)
        elif cross_attention_norm == "group_norm":
            self.norm_cross = GroupNorm(cross_attention_norm_num_groups, added_kv_proj_dim, eps=1e-5)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=True), nn.Dropout(dropout)])

    def _split(self, t):
        B, S, _ = t.shape
        return t.view(B, S, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x, context=None, attention_mask=None):
        B, C, H, W = x.shape
        pixels = x.view(B, C, H * W).transpose(1, 2)
        if context is None:
            context = pixels
        elif self.norm_cross is not None:
            if isinstance(self.norm_cross, nn.LayerNorm):
                context = self.norm_cross(context)
            else:  # GroupNorm over the channels of the tokens
                context = self.norm_cross(context.transpose(1, 2)).transpose(1, 2)
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)
        q = self._split(self.to_q(h))
        tk, tv = self._split(self.add_k_proj(context)), self._split(self.add_v_proj(context))
        bias = mask_to_bias(attention_mask, q.dtype)  # (B, 1, 1, T): every head and query
        if self.only_cross_attention:
            out = ops.attention(q, tk, tv, attn_bias=bias, backend=self.backend)
        else:
            if bias is not None:  # the pixel keys are always visible (diffusers pads the mask with zeros)
                bias = nn.functional.pad(bias, (0, H * W), value=0.0)
            k, v = self._split(self.to_k(h)), self._split(self.to_v(h))
            out = ops.attention(q, k, v, attn_bias=bias, kv_prefix=(tk, tv), backend=self.backend)
        out = out.transpose(1, 2).reshape(B, H * W, self.heads * self.dim_head)
        out = self.to_out[1](self.to_out[0](out))
        return out.transpose(1, 2).reshape(B, C, H, W) + x
