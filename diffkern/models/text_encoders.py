"""Text encoders of Latent Diffusion and Stable Diffusion, and the prompt encoding the pipelines share.

- SD 1.x / 2.x: transformers' CLIPTextModel, used as it is (frozen). SD1 conditions on
  `last_hidden_state` (final LayerNorm applied); SD2's diffusers checkpoints ship the OpenCLIP
  text tower cut to 23 layers, so its `last_hidden_state` already is the penultimate layer.
- LDM text-to-image (CompVis/ldm-text2im-large-256 "bert"): `LDMBertModel`, a pre-LayerNorm
  transformer encoder on diffkern.ops.attention with the state-dict keys of diffusers' LDMBertModel.
- `encode_prompt`: tokenize and encode exactly as diffusers' StableDiffusionPipeline does.
- `load_text_encoder` / `load_tokenizer`: build either from a checkpoint's folder.
"""

from __future__ import annotations

import logging
import os
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from diffkern import ops
from diffkern.models._config import ModelConfig

logger = logging.getLogger(__name__)

# Tuple-like so that code written for transformers' outputs (`encoder(ids)[0]`, `.last_hidden_state`,
# `.hidden_states`) reads ours unchanged, diffusers' LDMTextToImagePipeline included.
TextEncoderOutput = namedtuple("TextEncoderOutput", ["last_hidden_state", "hidden_states"])

# diffusers' LDMBertConfig defaults, i.e. the ldm-text2im-large-256 "bert".
LDMBERT_DEFAULTS = dict(
    vocab_size=30522, max_position_embeddings=77, encoder_layers=32, encoder_ffn_dim=5120,
    encoder_attention_heads=8, head_dim=64, d_model=1280, activation_function="gelu", pad_token_id=0,
)
# Keys of LDMBertConfig that change nothing at inference: dropouts and init (training only), the
# cache flag (encoder only), and scale_embedding, which diffusers' LDMBertEncoder never reads.
_LDMBERT_INERT = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "init_std",
                  "classifier_dropout", "use_cache", "scale_embedding")
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class LDMBertSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention on diffkern.ops.attention.

    Submodules carry diffusers' names (q_proj, k_proj, v_proj without bias; out_proj with bias)
    rather than reusing diffkern.nn.Attention (to_q ... to_out.0): with the checkpoint's names the
    state dict loads strictly and `state_dict()` writes it back unchanged, with no key-renaming hooks
    in either direction. The computation is nn.Attention's: views per head, one fused attention op.
    """

    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        # k, v, q: the checkpoint's order, so state_dict() lists keys exactly as diffusers' does
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, t):
        B, S, _ = t.shape
        return t.view(B, S, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, keep_mask=None):
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        out = ops.attention(q, k, v, attn_bias=keep_mask)
        B, _, S, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, S, self.heads * self.head_dim))


class LDMBertLayer(nn.Module):
    """Pre-LN encoder layer: x + attn(LN(x)), then x + fc2(act(fc1(LN(x))))."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.self_attn = LDMBertSelfAttention(d, cfg.encoder_attention_heads, cfg.head_dim)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = _ACTIVATIONS[cfg.activation_function]

    def forward(self, x, keep_mask=None):
        x = x + self.self_attn(self.self_attn_layer_norm(x), keep_mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class LDMBertEncoder(nn.Module):
    """Token + learned position embeddings, the layers, a final LayerNorm (diffusers' `model.*`)."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.layers = nn.ModuleList([LDMBertLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.layer_norm = nn.LayerNorm(cfg.d_model)


class LDMBertModel(nn.Module):
    """The LDM text-to-image text encoder, equal to diffusers' LDMBertModel at inference.

    LDMBertModel(**config) with diffusers' LDMBertConfig keys (see LDMBERT_DEFAULTS; d_model 1280,
    32 layers of 8 heads x 64, ffn 5120, 77 positions, vocab 30522 for the released model). Inference
    only: dropouts are not applied (the pipelines use the encoder frozen).

    forward(input_ids (B, S) int64 with S <= max_position_embeddings, attention_mask=None (B, S) with
    1 = attend, output_hidden_states=False) -> TextEncoderOutput(last_hidden_state (B, S, d_model),
    hidden_states): `[0]` is the conditioning, as diffusers' pipeline reads it. The LDM pipeline,
    like diffusers', passes no mask: padding tokens are attended.

    State dict: exactly diffusers' keys (model.embed_tokens, model.embed_positions,
    model.layers.N.{self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm},
    model.layer_norm, to_logits). `to_logits` (the pre-training head) is unused here and kept so the
    checkpoint loads strictly; pass with_logits=False to drop it (~39M parameters at full size) and
    load with strict=False.
    """

    def __init__(self, *, with_logits=True, **config):
        super().__init__()
        given = {k: v for k, v in config.items() if k not in _LDMBERT_INERT}
        unknown = sorted(k for k in given if not k.startswith("_") and k not in LDMBERT_DEFAULTS)
        if unknown:
            raise ValueError(f"LDMBertModel: unknown config option(s) {unknown}")
        cfg = ModelConfig({**LDMBERT_DEFAULTS, **{k: v for k, v in given.items() if not k.startswith("_")}})
        if cfg.activation_function not in _ACTIVATIONS:
            raise ValueError(f"LDMBertModel: activation_function={cfg.activation_function!r} is not "
                             f"supported (supported: {sorted(_ACTIVATIONS)})")
        self.config = cfg
        self.model = LDMBertEncoder(cfg)
        self.to_logits = nn.Linear(cfg.d_model, cfg.vocab_size) if with_logits else None

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def final_layer_norm(self, hidden):
        """The LayerNorm applied after the last layer (what clip_skip re-applies to an earlier layer)."""
        return self.model.layer_norm(hidden)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        if input_ids.dim() != 2:
            raise ValueError(f"LDMBertModel: input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
        S = input_ids.shape[1]
        if S > self.config.max_position_embeddings:
            raise ValueError(f"LDMBertModel: input_ids has {S} tokens, more than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        m = self.model
        positions = torch.arange(S, device=input_ids.device)
        x = m.embed_tokens(input_ids) + m.embed_positions(positions)
        keep = None
        if attention_mask is not None:
            keep = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        states = []
        for layer in m.layers:
            states.append(x)
            x = layer(x, keep)
        x = m.layer_norm(x)
        states.append(x)
        return TextEncoderOutput(x, tuple(states) if output_hidden_states else None)

    @classmethod
    def from_diffusers(cls, module, with_logits=True):
        """Our module with the weights of a diffusers LDMBertModel (same keys, loaded strictly)."""
        cfg = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        ours = cls(with_logits=with_logits, **{k: v for k, v in cfg.items() if k in LDMBERT_DEFAULTS})
        state = module.state_dict()
        if not with_logits:
            state = {k: v for k, v in state.items() if not k.startswith("to_logits.")}
        ours.load_state_dict(state, strict=True)
        p = next(module.parameters())
        return ours.to(device=p.device, dtype=p.dtype).eval()

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, with_logits=False):
        """Load a checkpoint's `bert` folder (config.json + model.safetensors or pytorch_model.bin).

        The module is built on the meta device and the weights assigned, so no time is spent on a
        random initialisation of ~500M parameters. with_logits=False skips the unused head.
        """
        from diffkern.models.weights import CheckpointError, key_problems, on_meta

        cfg = _read_json(os.path.join(folder, "config.json"))
        arch = {k: v for k, v in cfg.items() if k in LDMBERT_DEFAULTS}
        model = on_meta(lambda: cls(with_logits=with_logits, **arch), os.path.join(folder, "config.json"))
        state = _read_weights(folder)
        if not with_logits:
            state = {k: v for k, v in state.items() if not k.startswith("to_logits.")}
        problems = key_problems(model, state, str(folder))
        if problems:
            raise CheckpointError(f"{folder}: the weights do not fit its config.json's LDMBertModel:\n  "
                                  + "\n  ".join(problems))
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _read_json(path):
    """A JSON object file (CheckpointError naming it when unreadable or not an object)."""
    from diffkern.models.weights import read_json_object

    return read_json_object(path)


def _read_weights(folder):
    from diffkern.models.weights import read_state_dict

    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return read_state_dict(path)  # CheckpointError naming the file for anything unreadable
    raise FileNotFoundError(f"folder: no model.safetensors or pytorch_model.bin in {folder}")


def _final_layer_norm(text_encoder):
    # transformers >= 5 keeps final_layer_norm on CLIPTextModel itself; 4.x under .text_model.
    # LDMBertModel has a final_layer_norm method for the same purpose.
    for owner in (text_encoder, getattr(text_encoder, "text_model", None)):
        norm = getattr(owner, "final_layer_norm", None)
        if callable(norm):
            return norm
    raise ValueError(f"clip_skip: {type(text_encoder).__name__} has no final layer norm to re-apply; "
                     "clip_skip needs a CLIPTextModel or an LDMBertModel")


def _device_of(module):
    return next(module.parameters()).device


@torch.no_grad()
def encode_prompt(text_encoder, tokenizer, prompts, *, clip_skip=None, max_length=None):
    """Hidden states (B, max_length, D) conditioning a diffusion model on `prompts`.

    Tokenizes as diffusers' StableDiffusionPipeline does: padding="max_length",
    max_length=tokenizer.model_max_length (or `max_length`; 77 for the LDM bert), truncation (a
    warning names the dropped text). The attention mask is passed only when the encoder's config
    sets `use_attention_mask` (no SD checkpoint does: SD attends to the padding, as trained).

    clip_skip: None -> the encoder's output (last_hidden_state); k >= 1 -> the hidden state k layers
    before the last, through the final LayerNorm (diffusers' clip_skip, "clip skip k+1" in A1111).
    Note that diffusers' SD pipelines apply clip_skip to the prompt only, not to the negative prompt;
    our pipelines call this for both, so the two embeddings come from the same layer.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts: expected a str or a list of str, got {type(prompts).__name__}")
    if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 0):
        raise ValueError(f"clip_skip: expected None or an int >= 0, got {clip_skip!r}")
    if max_length is None:
        max_length = tokenizer.model_max_length
        limit = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
        if limit is not None and max_length > limit:  # BERT tokenizers default to a huge model_max_length
            max_length = limit
    tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    _warn_truncation(tokenizer, prompts, tokens.input_ids, max_length)
    device = _device_of(text_encoder)
    mask = None
    if getattr(getattr(text_encoder, "config", None), "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    ids = tokens.input_ids.to(device)
    if not clip_skip:  # 0 skips nothing
        return text_encoder(ids, attention_mask=mask)[0]
    out = text_encoder(ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states
    if clip_skip + 1 > len(hidden) - 1:
        raise ValueError(f"clip_skip: {clip_skip} skips more than the encoder's {len(hidden) - 1} layers")
    return _final_layer_norm(text_encoder)(hidden[-(clip_skip + 1)])


def _warn_truncation(tokenizer, prompts, ids, max_length):
    full = tokenizer(list(prompts), padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1]:
        dropped = tokenizer.batch_decode(full[:, max_length - 1:-1])
        logger.warning("prompt truncated to %d tokens; dropped: %s", max_length, dropped)


def load_text_encoder(folder, dtype=None, device=None):
    """The text encoder of a diffusers checkpoint folder (`text_encoder` or `bert`), frozen, in eval mode.

    CLIPTextModel configs load through transformers; LDMBertModel configs build ours.
    """
    from diffkern.models.weights import CheckpointError, reading

    cfg = _read_json(os.path.join(folder, "config.json"))
    archs = cfg.get("architectures") or [None]
    if not isinstance(archs, list):
        raise CheckpointError(f"{os.path.join(folder, 'config.json')}: \"architectures\" must be a list, got {archs!r}")
    arch = archs[0]
    if arch == "LDMBertModel" or cfg.get("model_type") == "ldmbert":
        return LDMBertModel.from_pretrained(folder, dtype=dtype, device=device)
    if arch in ("CLIPTextModel", "CLIPTextModelWithProjection") or cfg.get("model_type") == "clip_text_model":
        from transformers import CLIPTextModel

        with reading(f"{folder} (CLIPTextModel)"):
            model = CLIPTextModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
        return model.to(device).eval().requires_grad_(False)
    raise ValueError(f"folder: {folder} holds a {arch or cfg.get('model_type')!r} text encoder; "
                     "supported: CLIPTextModel (SD 1.x / 2.x) and LDMBertModel (LDM text2im)")


def load_tokenizer(folder):
    """The tokenizer of a checkpoint folder: CLIPTokenizer (vocab.json + merges.txt or tokenizer.json)
    or BertTokenizer (vocab.txt), by `tokenizer_class` in tokenizer_config.json, else by its files."""
    import transformers

    config_path = os.path.join(folder, "tokenizer_config.json")
    name = _read_json(config_path).get("tokenizer_class") if os.path.exists(config_path) else None
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{config_path}: \"tokenizer_class\" must be a string, got {name!r}")
    if name is None:
        name = "BertTokenizer" if os.path.exists(os.path.join(folder, "vocab.txt")) else "CLIPTokenizer"
    name = name.removesuffix("Fast")
    if name not in ("CLIPTokenizer", "BertTokenizer"):
        raise ValueError(f"folder: tokenizer class {name!r} in {folder} is not supported "
                         "(supported: CLIPTokenizer, BertTokenizer)")
    from diffkern.models.weights import reading

    with reading(f"{folder} ({name})"):
        return getattr(transformers, name).from_pretrained(folder, local_files_only=True)
