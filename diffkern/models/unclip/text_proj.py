"""unCLIP's conditioning of the decoder on CLIP (DALL-E 2 sec. 2.1), as diffusers' UnCLIPTextProjModel.

"We project and add CLIP embeddings to the existing timestep embedding, and project CLIP embeddings
into four extra tokens of context that are concatenated to the sequence of outputs from the GLIDE text
encoder." Keys and config equal diffusers' (Karlo: the decoder checkpoint's text_seq_proj, clip_tok_proj,
text_feat_proj, clip_emb and cf_param).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

_NAME = "UnCLIPTextProjModel"


class UnCLIPTextProjModel(ModelMixin, ConfigMixin):
    """CLIP image + text embeddings -> the decoder's context tokens and additive time embedding.

    UnCLIPTextProjModel(*, clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim,
    cross_attention_dim): diffusers' ModelMixin + ConfigMixin with diffusers' constructor (Karlo:
    time_embed_dim 1280, cross_attention_dim 1536: 7,878,400 parameters).

    forward(*, image_embeddings (B, D), prompt_embeds (B', D), text_encoder_hidden_states (B', T, D),
            do_classifier_free_guidance) -> (context (B', extra + T, cross_attention_dim),
            additive time embedding (B', time_embed_dim)).
    With guidance, B' = 2B: the learned unconditional image embedding is prepended to the batch
    (the prompt side is already [uncond; cond]), as in diffusers.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, *, clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim,
                 cross_attention_dim):
        super().__init__()
        cfg = self.config
        for key in ("time_embed_dim", "cross_attention_dim"):
            if not isinstance(cfg[key], int) or cfg[key] <= 0:
                raise ValueError(f"{_NAME}: {key} must be a positive int, got {cfg[key]!r}")
        dim, extra = cfg.clip_embeddings_dim, cfg.clip_extra_context_tokens
        self.clip_extra_context_tokens = extra
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(dim))
        self.embedding_proj = nn.Linear(dim, cfg.time_embed_dim)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(dim, cfg.time_embed_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(dim, extra * cfg.cross_attention_dim)
        self.encoder_hidden_states_proj = nn.Linear(dim, cfg.cross_attention_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cfg.cross_attention_dim)

    def forward(self, *, image_embeddings, prompt_embeds, text_encoder_hidden_states, do_classifier_free_guidance):
        dim = self.config.clip_embeddings_dim
        for name, t, rank in (("image_embeddings", image_embeddings, 2), ("prompt_embeds", prompt_embeds, 2),
                              ("text_encoder_hidden_states", text_encoder_hidden_states, 3)):
            if not isinstance(t, torch.Tensor) or t.dim() != rank or t.shape[-1] != dim:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{_NAME}: {name} must have rank {rank} and last dim {dim} "
                                 f"(clip_embeddings_dim), got {got}")
        if do_classifier_free_guidance:
            uncond = self.learned_classifier_free_guidance_embeddings[None].expand(image_embeddings.shape[0], -1)
            image_embeddings = torch.cat([uncond, image_embeddings], dim=0)
        B = prompt_embeds.shape[0]
        if image_embeddings.shape[0] != B or text_encoder_hidden_states.shape[0] != B:
            raise ValueError(f"{_NAME}: batch sizes differ: image_embeddings {image_embeddings.shape[0]} "
                             f"(after guidance), prompt_embeds {B}, text_encoder_hidden_states "
                             f"{text_encoder_hidden_states.shape[0]}")
        time = (self.clip_image_embeddings_project_to_time_embeddings(image_embeddings)
                + self.embedding_proj(prompt_embeds))
        # The projection's columns are read token-minor ((B, width, tokens) then transposed), as the
        # checkpoints were trained: token j is every `extra`-th column starting at j.
        extra = self.clip_extra_context_tokens_proj(image_embeddings)
        extra = extra.reshape(B, -1, self.clip_extra_context_tokens).permute(0, 2, 1)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_encoder_hidden_states))
        return torch.cat([extra, text], dim=1), time
