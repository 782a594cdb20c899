"""Text-encoder key conversion of CompVis / Stability single files (see diffkern.models.compvis):
SD 1.x's OpenAI CLIP (`cond_stage_model.transformer.*`, already transformers' layout) and SD 2.x's
OpenCLIP (`cond_stage_model.model.*`: fused in_proj split into q/k/v, read at its penultimate layer,
as diffusers ships it), to transformers' CLIPTextModel names, with the configs inferred from shapes.
"""

from diffkern.models.compvis import CheckpointError, _cap, _indices, _need, _rename_sub


def clip_from_compvis(sd):
    """SD 1.x text encoder (prefix `cond_stage_model.transformer.` stripped) -> CLIPTextModel names.

    The checkpoint already stores a transformers CLIPTextModel; only the position-ids buffer,
    which old transformers versions saved, is dropped. Keys come back as `text_model.*`.
    """
    out = {}
    for key, value in sd.items():
        if key.endswith("embeddings.position_ids"):
            continue
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    return out


def infer_clip_config(sd):
    """CLIPTextConfig kwargs for an SD 1.x text encoder (output of clip_from_compvis).

    OpenAI CLIP uses 64-channel heads and quick_gelu; bos/eos/pad ids are those of the released
    openai/clip-vit-large-patch14 config that SD 1.x pipelines ship.
    """
    return _clip_config(sd, "quick_gelu")


def _clip_config(sd, act):
    tokens = _need(sd, "text_model.embeddings.token_embedding.weight", "text_encoder")
    hidden = int(tokens.shape[1])
    if hidden % 64:
        raise CheckpointError(f"text_encoder: hidden size {hidden} is not a multiple of the 64-channel "
                              "CLIP heads")
    return {
        "vocab_size": int(tokens.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(_need(sd, "text_model.encoder.layers.0.mlp.fc1.weight",
                                       "text_encoder").shape[0]),
        "num_hidden_layers": len(_indices(sd, "text_model.encoder.layers.")),
        "num_attention_heads": hidden // 64,
        "max_position_embeddings": int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


_OPENCLIP_BLOCK = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                   ("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."),
                   ("mlp.c_proj.", "mlp.fc2."))
_OPENCLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                 "positional_embedding": "text_model.embeddings.position_embedding.weight",
                 "ln_final.weight": "text_model.final_layer_norm.weight",
                 "ln_final.bias": "text_model.final_layer_norm.bias"}


def openclip_from_compvis(sd, *, layer="penultimate", strict=True):
    """SD 2.x OpenCLIP text encoder (prefix `cond_stage_model.model.` stripped) -> CLIPTextModel names.

    The fused attention input projection `attn.in_proj_weight` (3D, D) is split into q, k, v.
    layer="penultimate" (SD 2.x) drops the last residual block, so a 24-block ViT-H/14 becomes the
    23-layer CLIPTextModel diffusers ships (its final layer norm then applies to block 23's output,
    as in SD 2.x's FrozenOpenCLIPEmbedder); layer="last" keeps all blocks.
    """
    if layer not in ("penultimate", "last"):
        raise ValueError(f"openclip_from_compvis: layer must be 'penultimate' or 'last', got {layer!r}")
    blocks = _indices(sd, "transformer.resblocks.")
    keep = len(blocks) - 1 if layer == "penultimate" else len(blocks)
    out, unmapped = {}, []
    for key, value in sd.items():
        if key in ("logit_scale", "text_projection", "attn_mask"):
            continue  # contrastive head and a buffer: not part of the token-state encoder
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
            continue
        parts = key.split(".", 3)  # transformer, resblocks, N, sub
        if len(parts) != 4 or parts[:2] != ["transformer", "resblocks"] or not parts[2].isdigit():
            unmapped.append(key)
            out[key] = value
            continue
        index, sub = int(parts[2]), parts[3]
        if index >= keep:
            continue
        base = f"text_model.encoder.layers.{index}."
        if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = sub.rsplit("_", 1)[1]
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}.{kind}"] = chunk.contiguous()
            continue
        renamed = _rename_sub(sub, _OPENCLIP_BLOCK, True)
        if renamed is None:
            unmapped.append(key)
            out[key] = value
        else:
            out[base + renamed] = value
    if strict and unmapped:
        raise CheckpointError(f"text_encoder: {len(unmapped)} keys fit no known module: {_cap(unmapped)}")
    return out


def infer_openclip_config(sd):
    """CLIPTextConfig kwargs for an SD 2.x text encoder (output of openclip_from_compvis).

    OpenCLIP ViT-H/14 uses gelu (not CLIP's quick_gelu) and 64-channel heads.
    """
    return _clip_config(sd, "gelu")


def text_encoder_from_compvis(parts, *, layer="penultimate", strict=True):
    """(CLIPTextModel state dict, CLIPTextConfig kwargs) from split_checkpoint's parts, either family."""
    if "clip" in parts:
        sd = clip_from_compvis(parts["clip"])
        return sd, infer_clip_config(sd)
    if "openclip" in parts:
        sd = openclip_from_compvis(parts["openclip"], layer=layer, strict=strict)
        return sd, infer_openclip_config(sd)
    raise CheckpointError("text_encoder: no cond_stage_model.transformer.* (CLIP) or "
                          "cond_stage_model.model.* (OpenCLIP) keys in the checkpoint")

