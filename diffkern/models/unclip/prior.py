"""The unCLIP diffusion prior (DALL-E 2, Ramesh et al. 2022, sec. 2.2) as diffusers' PriorTransformer.

A decoder-only transformer over the sequence

    [77 projected CLIP text tokens | projected text embedding | timestep embedding |
     projected noised image embedding | learned query ("prd")]

with learned positions, a causal mask plus the text key-padding mask (one additive bias for
diffkern.ops.attention), and the output read at the last token -> norm_out -> proj_to_clip_embeddings:
the predicted (normalised) CLIP image embedding x0. `post_process_latents` undoes the
normalisation with the stored CLIP statistics (clip_mean, clip_std).

diffusers' ModelMixin + ConfigMixin with diffusers' PriorTransformer constructor, keys and output, so a
diffusers `prior/` folder loads with from_pretrained; Karlo's original checkpoint goes through diffkern.models.checkpoints.karlo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.prior_transformer import PriorTransformerOutput
from torch import nn

from diffkern.models._config import NoAttentionProcessors, check_options, defaults
from diffkern.nn.attention import Attention
from diffkern.nn.resnet import timestep_embedding

_NAME = "PriorTransformer"

FIXED = dict(norm_in_type=(None, "layer"), embedding_proj_norm_type=(None, "layer"),
             encoder_hid_proj_type=(None, "linear"), added_emb_type=("prd", None),
             time_embed_act_fn=("silu", "swish", "gelu", "relu", "mish"))
_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "mish": nn.Mish}

# diffusers' mask value: a large finite negative, not -inf (a fully padded text row still averages).
_MASKED = -10000.0


class _TimeMLP(nn.Module):
    """linear_1 -> act -> linear_2 (diffusers' TimestepEmbedding with an out_dim)."""

    def __init__(self, in_dim, hidden, out_dim, act):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.act = _ACTIVATIONS[act]()
        self.linear_2 = nn.Linear(hidden, out_dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class _GELUProj(nn.Module):
    """Linear then exact (erf) GELU: diffusers' GELU activation module (key `proj`)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x))


class _FeedForward(nn.Module):
    """GELU MLP of width 4 x dim; keys net.0.proj, net.2 (net.1 is the dropout)."""

    def __init__(self, dim, dropout):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class PriorBlock(nn.Module):
    """Pre-LayerNorm self-attention block (diffusers' BasicTransformerBlock with activation_fn="gelu",
    attention_bias=True and no cross-attention; keys norm1, attn1, norm3, ff):

        x += attn1(norm1(x), bias);  x += ff(norm3(x))
    """

    def __init__(self, dim, heads, dim_head, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, qkv_bias=True, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = _FeedForward(dim, dropout)

    def forward(self, x, attn_bias=None):
        x = self.attn1(self.norm1(x), attn_bias=attn_bias) + x
        return self.ff(self.norm3(x)) + x


class PriorTransformer(NoAttentionProcessors, ModelMixin, ConfigMixin):
    """The unCLIP prior: predicts the CLIP image embedding from a noised one, the timestep and the text.

    diffusers' ModelMixin + ConfigMixin with diffusers' constructor (arguments and defaults of 0.42 =
    the Karlo prior, 1,022,030,080 parameters); values this module does not implement (FIXED) raise
    ValueError naming the option.

    forward(hidden_states (B, embedding_dim), timestep, proj_embedding (B, embedding_proj_dim),
            encoder_hidden_states (B, num_embeddings, embedding_dim) or None,
            attention_mask (B, num_embeddings) bool or None, return_dict=True)
    -> PriorTransformerOutput (or a 1-tuple). timestep: a number, a 0-d tensor or a (B,) tensor.

    As in diffusers, the causal mask applies only together with `attention_mask` (the pipelines always
    pass the text mask); masked keys get -10000 added (not -inf), causal and padding masks add up.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768,
                 num_embeddings=77, additional_embeddings=4, dropout=0.0, time_embed_act_fn="silu", norm_in_type=None,
                 embedding_proj_norm_type=None, encoder_hid_proj_type="linear", added_emb_type="prd",
                 time_embed_dim=None, embedding_proj_dim=None, clip_embed_dim=None):
        super().__init__()
        cfg = self.config
        check_options(_NAME, cfg, FIXED)
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        self.num_attention_heads, self.attention_head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.additional_embeddings = cfg.additional_embeddings
        self.inner_dim = inner
        time_embed_dim = cfg.time_embed_dim or inner
        proj_dim = cfg.embedding_proj_dim or cfg.embedding_dim
        clip_dim = cfg.clip_embed_dim or cfg.embedding_dim

        self.time_embedding = _TimeMLP(inner, time_embed_dim, inner, cfg.time_embed_act_fn)
        self.proj_in = nn.Linear(cfg.embedding_dim, inner)
        self.embedding_proj_norm = nn.LayerNorm(proj_dim) if cfg.embedding_proj_norm_type == "layer" else None
        self.embedding_proj = nn.Linear(proj_dim, inner)
        self.encoder_hidden_states_proj = (nn.Linear(cfg.embedding_dim, inner)
                                           if cfg.encoder_hid_proj_type == "linear" else None)
        seq = cfg.num_embeddings + cfg.additional_embeddings
        self.positional_embedding = nn.Parameter(torch.zeros(1, seq, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner)) if cfg.added_emb_type == "prd" else None
        self.transformer_blocks = nn.ModuleList([
            PriorBlock(inner, cfg.num_attention_heads, cfg.attention_head_dim, cfg.dropout)
            for _ in range(cfg.num_layers)])
        self.norm_in = nn.LayerNorm(inner) if cfg.norm_in_type == "layer" else None
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, clip_dim)
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, clip_dim))

    def _timesteps(self, timestep, batch, device):
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor([timestep], dtype=torch.long, device=device)
        elif timestep.dim() == 0:
            timestep = timestep[None].to(device)
        if timestep.dim() != 1 or timestep.shape[0] not in (1, batch):
            raise ValueError(f"{_NAME}: timestep must be a number, a 0-d tensor or a (B={batch},) tensor, "
                             f"got shape {tuple(timestep.shape)}")
        return timestep * torch.ones(batch, dtype=timestep.dtype, device=timestep.device)

    def _check(self, name, t, shape):
        if not isinstance(t, torch.Tensor) or t.dim() != len(shape) or any(
                want is not None and got != want for got, want in zip(t.shape, shape)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            want = "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{_NAME}: {name} must be {want}, got {got}")

    def attention_bias(self, attention_mask, dtype):
        """The additive bias of every block: text key padding + causal, (B, 1, S, S), as diffusers."""
        pad = (1 - attention_mask.to(dtype)) * _MASKED
        pad = F.pad(pad, (0, self.additional_embeddings), value=0.0)
        # Built per call, not a buffer: nothing for a meta-device build or a state dict to miss.
        S = pad.shape[1]
        causal = torch.full((S, S), _MASKED, dtype=torch.float32, device=pad.device).triu_(1)
        return (pad[:, None, :] + causal).to(dtype)[:, None]

    def forward(self, hidden_states, timestep, proj_embedding, encoder_hidden_states=None, attention_mask=None,
                return_dict=True):
        cfg = self.config
        self._check("hidden_states", hidden_states, (None, cfg.embedding_dim))
        B = hidden_states.shape[0]
        self._check("proj_embedding", proj_embedding, (B, cfg.embedding_proj_dim or cfg.embedding_dim))
        t = timestep_embedding(self._timesteps(timestep, B, hidden_states.device), self.inner_dim,
                               flip_sin_to_cos=True, downscale_freq_shift=0)
        time_emb = self.time_embedding(t.to(self.dtype))
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        tokens = []
        if self.encoder_hidden_states_proj is not None:
            if encoder_hidden_states is None:
                raise ValueError(f"{_NAME}: encoder_hidden_states is required (encoder_hid_proj_type="
                                 f"{cfg.encoder_hid_proj_type!r})")
            self._check("encoder_hidden_states", encoder_hidden_states, (B, None, cfg.embedding_dim))
            tokens.append(self.encoder_hidden_states_proj(encoder_hidden_states))
        elif encoder_hidden_states is not None:
            tokens.append(encoder_hidden_states)
        n_text = tokens[0].shape[1] if tokens else 0
        tokens += [self.embedding_proj(proj_embedding)[:, None], time_emb[:, None],
                   self.proj_in(hidden_states)[:, None]]
        x = tokens[-1]
        if self.prd_embedding is not None:
            tokens.append(self.prd_embedding.to(x.dtype).expand(B, -1, -1))
        h = torch.cat(tokens, dim=1)
        pos = self.positional_embedding.to(h.dtype)
        if pos.shape[1] < h.shape[1]:  # positions may cover the text only: zeros for the extra tokens
            pos = F.pad(pos, (0, 0, n_text + 2, 1 if self.prd_embedding is not None else 0))
        h = h + pos

        bias = None
        if attention_mask is not None:
            self._check("attention_mask", attention_mask, (B, cfg.num_embeddings))
            bias = self.attention_bias(attention_mask, h.dtype)
        if self.norm_in is not None:
            h = self.norm_in(h)
        for block in self.transformer_blocks:
            h = block(h, attn_bias=bias)
        h = self.norm_out(h)
        h = h[:, -1] if self.prd_embedding is not None else h[:, n_text + 2:]
        out = self.proj_to_clip_embeddings(h)
        return PriorTransformerOutput(predicted_image_embedding=out) if return_dict else (out,)

    def post_process_latents(self, prior_latents):
        """Sampled (normalised) embeddings -> CLIP image embeddings: x * clip_std + clip_mean."""
        device = prior_latents.device
        return prior_latents * self.clip_std.to(device) + self.clip_mean.to(device)


DEFAULTS = defaults(PriorTransformer)  # diffusers' constructor defaults (what a config.json leaves out)
