"""GLIDE's noised CLIP: a ViT image encoder conditioned on the diffusion timestep, a causal text
encoder, and the CLIP-guidance gradient for the samplers.

    clip = create_clip_model(tokenizer=ClipTokenizer.from_path("bpe_simple_vocab_16e6.txt.gz"))
    clip.image_encoder.load_state_dict(torch.load("clip_image_enc.pt", weights_only=True))
    clip.text_encoder.load_state_dict(torch.load("clip_text_enc.pt", weights_only=True))
    x0 = diffusion.p_sample_loop(model_fn, shape, cond_fn=clip.cond_fn(["a corgi"], grad_scale=3.0))

Facts from OpenAI's glide_text2im/clip (config.yaml, encoders.py, model_creation.py):

- config: 64 x 64 images in 4 x 4 patches (257 tokens with the timestep token), width 512 output
  embeddings, text: 8 heads x 64 = 512 wide, 12 blocks, 77 tokens, 65536 embedding rows; image: 12
  heads x 64 = 768 wide, 12 blocks, 1000 timestep embeddings (w_t, the noised CLIP's "class token"),
  logit scale 100 (fixed, not in the checkpoints).
- keys: blocks.input.* (text: w_voc, w_pos; image: patch_proj (conv weight, no bias), w_pos, w_t, ln),
  blocks.block_{i}.f_attn.{ln, f_q, f_k (no bias), f_v, f_c}, blocks.block_{i}.f_mlp.{ln, f_1, f_2},
  blocks.output.{ln, f (no bias)}; linear weights are `w` (out, in), biases `b`, LayerNorm `g` / `b`.
- blocks are pre-norm residual: x + f_c(attention(ln(x))), then x + f_2(gelu(f_1(ln(x)))). OpenAI pads
  the sequence to a multiple of 32 and masks the pad keys with -1e10; that equals plain attention over
  the real tokens (causal for the text), which is what runs here.
- the image encoder reads (x + 1) * 127.5 normalised by CLIP's channel means / stds; its embedding is
  the projected first token. The text embedding is the projected token at length - 1 (the end token).
- cond_fn's gradient: d/dx of exp(logit_scale) * sum(z_text . z_image(x_t, t)) with unit-norm
  embeddings (norm + 1e-12), times grad_scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffkern import ops

CLIP_CONFIG = {
    "logit_scale": 100.0,
    "beta_schedule": "squaredcos_cap_v2",
    "n_timesteps": 1000,
    "image_size": 64,
    "patch_size": 4,
    "n_vocab": 65536,
    "max_text_len": 77,
    "n_embd": 512,
    "n_head_state_text": 64,
    "n_head_text": 8,
    "n_xf_blocks_text": 12,
    "n_head_state_image": 64,
    "n_head_image": 12,
    "n_xf_blocks_image": 12,
}
# CLIP's pixel statistics (0..255 scale), from OpenAI's CLIP; float32 tensors there (and here), so
# their float32-rounded values are the constants even when the model runs in float64
IMAGE_CHANNEL_MEANS = (122.77093945, 116.74601272, 104.09373519)
IMAGE_CHANNEL_STDS = (68.50053285, 66.63215831, 70.32316309)


class LayerNorm(nn.Module):
    """LayerNorm with OpenAI's parameter names g / b, computed in at least float32 (as theirs)."""

    def __init__(self, n_state, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(n_state))
        self.b = nn.Parameter(torch.zeros(n_state))

    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.layer_norm(x.to(dtype), self.g.shape, self.g.to(dtype), self.b.to(dtype), self.eps)


class Affine(nn.Module):
    """Linear layer with OpenAI's names: weight `w` (n_out, n_in), optional bias `b`."""

    def __init__(self, n_in, n_out, bias=True):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in).normal_(std=math.sqrt(2 / (n_in + n_out))))
        self.b = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x):
        return F.linear(x, self.w.to(x.dtype), None if self.b is None else self.b.to(x.dtype))


class AttentionResblock(nn.Module):
    """x + f_c(multi-head attention(ln(x))); keys have no bias (a key bias cancels in the softmax)."""

    def __init__(self, n_state, n_heads, causal):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.ln = LayerNorm(n_state)
        self.f_q, self.f_k, self.f_v = Affine(n_state, n_state), Affine(n_state, n_state, bias=False), \
            Affine(n_state, n_state)
        self.f_c = Affine(n_state, n_state)

    def forward(self, m):
        B, S, W = m.shape
        r = self.ln(m)
        q, k, v = (f(r).view(B, S, self.n_heads, W // self.n_heads).transpose(1, 2)
                   for f in (self.f_q, self.f_k, self.f_v))
        r = ops.attention(q, k, v, causal=self.causal)  # scale 1/sqrt(head width), as OpenAI's
        return m + self.f_c(r.transpose(1, 2).reshape(B, S, W))


class FullyConnectedResblock(nn.Module):
    """x + f_2(gelu(f_1(ln(x)))), 4x wide, exact (erf) GELU."""

    def __init__(self, n_state):
        super().__init__()
        self.ln = LayerNorm(n_state)
        self.f_1 = Affine(n_state, 4 * n_state)
        self.f_2 = Affine(4 * n_state, n_state)

    def forward(self, m):
        return m + self.f_2(F.gelu(self.f_1(self.ln(m))))


class TransformerBlock(nn.Module):
    def __init__(self, n_state, n_heads, causal):
        super().__init__()
        self.f_attn = AttentionResblock(n_state, n_heads, causal)
        self.f_mlp = FullyConnectedResblock(n_state)

    def forward(self, x):
        return self.f_mlp(self.f_attn(x))


class TextEmbedding(nn.Module):
    def __init__(self, n_vocab, n_context, n_state):
        super().__init__()
        self.w_voc = nn.Parameter(torch.empty(n_vocab, n_state).normal_(std=0.02))
        self.w_pos = nn.Parameter(torch.empty(n_context, n_state).normal_(std=0.01))

    def forward(self, tokens):
        return F.embedding(tokens, self.w_voc) + self.w_pos[None, : tokens.shape[1]]


class ImageEmbedding(nn.Module):
    """Patches (a stride-p convolution without bias) after a timestep token w_t[t] (or a learned
    pred_state for an un-noised CLIP, n_timestep = 0), plus positions, then LayerNorm."""

    def __init__(self, image_size, patch_size, n_state, n_timestep):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size, self.patch_size, self.n_timestep = image_size, patch_size, n_timestep
        n_patch = image_size // patch_size
        if n_timestep:
            self.w_t = nn.Parameter(torch.empty(n_timestep, n_state).normal_(std=n_state**-0.5))
        else:
            self.pred_state = nn.Parameter(torch.empty(n_state).normal_(std=n_state**-0.5))
        self.patch_proj = nn.Parameter(torch.empty(n_state, 3, patch_size, patch_size).normal_(std=0.02))
        self.w_pos = nn.Parameter(torch.empty(1 + n_patch**2, n_state).normal_(std=n_state**-0.5))
        means, stds = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGE_CHANNEL_MEANS, IMAGE_CHANNEL_STDS))
        self.register_buffer("channel_means", means, persistent=False)
        self.register_buffer("channel_stds", stds, persistent=False)
        self.ln = LayerNorm(n_state)

    def forward(self, x, t=None):
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        if (t is None) != (self.n_timestep == 0) or (t is not None and tuple(t.shape) != (x.shape[0],)):
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"t must be a (B,) tensor of timesteps for a noised CLIP (n_timestep="
                             f"{self.n_timestep}) and None otherwise, got {got}")
        x = (x - self.channel_means.to(x.dtype)) / self.channel_stds.to(x.dtype)
        x = F.conv2d(x, self.patch_proj.to(x.dtype), stride=self.patch_size).flatten(2).transpose(1, 2)
        if self.n_timestep:
            first = F.embedding(t, self.w_t)[:, None]
        else:
            first = self.pred_state.expand(x.shape[0], 1, -1)
        return self.ln(torch.cat([first.to(x.dtype), x], dim=1) + self.w_pos.to(x.dtype))


class FeatureExtractor(nn.Module):
    """ln then f (no bias) of one token per sample: the first (image) or the one at length - 1 (text)."""

    def __init__(self, n_state, n_embd):
        super().__init__()
        self.ln = LayerNorm(n_state)
        self.f = Affine(n_state, n_embd, bias=False)

    def forward(self, h, lengths=None):
        token = h[:, 0] if lengths is None else h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        return self.f(self.ln(token))


class TextEncoder(nn.Module):
    """CLIP text transformer (causal); forward(tokens (B, max_text_len), lengths (B,)) -> (B, n_embd)."""

    def __init__(self, n_vocab, max_text_len, n_embd, n_head, n_xf_blocks, n_head_state=64):
        super().__init__()
        self.max_text_len, self.n_xf_blocks = max_text_len, n_xf_blocks
        n_state = n_head * n_head_state
        blocks = {"input": TextEmbedding(n_vocab, max_text_len, n_state)}
        blocks.update({f"block_{i}": TransformerBlock(n_state, n_head, causal=True)
                       for i in range(n_xf_blocks)})
        blocks["output"] = FeatureExtractor(n_state, n_embd)
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, tokens, lengths):
        if tokens.dim() != 2 or tokens.shape[1] > self.max_text_len:
            raise ValueError(f"tokens must be (B, <= {self.max_text_len}), got {tuple(tokens.shape)}")
        if tuple(lengths.shape) != (tokens.shape[0],):
            raise ValueError(f"lengths must be ({tokens.shape[0]},), got {tuple(lengths.shape)}")
        h = self.blocks["input"](tokens.long())
        for i in range(self.n_xf_blocks):
            h = self.blocks[f"block_{i}"](h)
        return self.blocks["output"](h, lengths.long())


class ImageEncoder(nn.Module):
    """Noised CLIP ViT; forward(images (B, 3, S, S) in CLIP's 0..255 scale, t (B,)) -> (B, n_embd)."""

    def __init__(self, image_size, patch_size, n_embd, n_head, n_xf_blocks, n_head_state=64, n_timestep=0):
        super().__init__()
        self.n_xf_blocks = n_xf_blocks
        n_state = n_head * n_head_state
        blocks = {"input": ImageEmbedding(image_size, patch_size, n_state, n_timestep)}
        blocks.update({f"block_{i}": TransformerBlock(n_state, n_head, causal=False)
                       for i in range(n_xf_blocks)})
        blocks["output"] = FeatureExtractor(n_state, n_embd)
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, images, timesteps=None):
        h = self.blocks["input"](images, timesteps)
        for i in range(self.n_xf_blocks):
            h = self.blocks[f"block_{i}"](h)
        return self.blocks["output"](h)


def _unit(z):
    return z / (torch.linalg.norm(z, dim=-1, keepdim=True) + 1e-12)


class NoisedCLIP(nn.Module):
    """The pair of encoders, the fixed logit scale and the tokenizer; see the module docstring."""

    def __init__(self, config, text_encoder, image_encoder, tokenizer=None):
        super().__init__()
        self.config = dict(config)
        self.text_encoder, self.image_encoder, self.tokenizer = text_encoder, image_encoder, tokenizer
        self.register_buffer("logit_scale", torch.tensor(math.log(config["logit_scale"])), persistent=False)

    def encode_prompts(self, prompts):
        """(tokens (B, max_text_len), lengths (B,)) of a list of prompts, with the CLIP tokenizer."""
        if self.tokenizer is None:
            raise ValueError("prompts need a tokenizer: create_clip_model(tokenizer=ClipTokenizer.from_path("
                             "...)) or pass tokens and lengths")
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self.tokenizer.padded_tokens_and_len(self.tokenizer.encode(p), self.text_encoder.max_text_len)
                for p in prompts]
        device = self.logit_scale.device
        return (torch.tensor([r[0] for r in rows], dtype=torch.long, device=device),
                torch.tensor([r[1] for r in rows], dtype=torch.long, device=device))

    def text_embeddings(self, prompts=None, *, tokens=None, lengths=None):
        """Unit-norm text embeddings (B, n_embd) of prompts, or of tokens with their lengths."""
        if (prompts is None) == (tokens is None) or (tokens is None) != (lengths is None):
            raise ValueError("text_embeddings: pass prompts, or tokens and lengths")
        if prompts is not None:
            tokens, lengths = self.encode_prompts(prompts)
        return _unit(self.text_encoder(tokens, lengths))

    def image_embeddings(self, images, t):
        """Unit-norm embeddings (B, n_embd) of noised images x_t in [-1, 1] at timesteps t (B,)."""
        return _unit(self.image_encoder((images + 1) * 127.5, t))

    def cond_fn(self, prompts=None, grad_scale=1.0, *, tokens=None, lengths=None):
        """(x, t) -> grad_scale * d/dx [exp(logit_scale) * sum(z_text . z_image(x, t))], for the
        samplers' cond_fn (prompts or tokens + lengths give one text per sample, or one for all)."""
        with torch.no_grad():
            z_text = self.text_embeddings(prompts, tokens=tokens, lengths=lengths)
        dtype = self.logit_scale.dtype

        def cond_fn(x, t):
            with torch.enable_grad():
                x_var = x.detach().to(dtype).requires_grad_(True)
                z_image = self.image_embeddings(x_var, t)
                loss = torch.exp(self.logit_scale) * (z_text.to(z_image.dtype) * z_image).sum()
                grad = torch.autograd.grad(loss, x_var)[0]
            return (grad * grad_scale).to(x.dtype)

        return cond_fn


def create_clip_model(config=None, *, tokenizer=None, device=None, dtype=None, **overrides):
    """The noised CLIP of GLIDE (CLIP_CONFIG, with `config` / keyword overrides), random weights:
    load clip_image_enc.pt into .image_encoder and clip_text_enc.pt into .text_encoder."""
    cfg = dict(CLIP_CONFIG)
    cfg.update(config or {})
    unknown = sorted(set(overrides) - set(CLIP_CONFIG))
    if unknown:
        raise TypeError(f"create_clip_model: unknown options {unknown}; known: {sorted(CLIP_CONFIG)}")
    cfg.update(overrides)
    text = TextEncoder(cfg["n_vocab"], cfg["max_text_len"], cfg["n_embd"], cfg["n_head_text"],
                       cfg["n_xf_blocks_text"], cfg["n_head_state_text"])
    image = ImageEncoder(cfg["image_size"], cfg["patch_size"], cfg["n_embd"], cfg["n_head_image"],
                         cfg["n_xf_blocks_image"], cfg["n_head_state_image"], cfg["n_timesteps"])
    model = NoisedCLIP(cfg, text, image, tokenizer)
    if dtype is not None:  # the logit scale stays float32 unless asked: cond_fn computes in its dtype
        model = model.to(dtype)
    return model.to(device) if device is not None else model
