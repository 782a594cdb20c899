"""Tiny random-weight components shared by the pipeline, text-encoder and CLI tests.

Everything is built offline: tokenizers from a few-word vocabulary written to a folder, diffusers /
transformers models from tiny configs (the sizes diffusers' own pipeline tests use), seeded so that
two builds are equal. Pipelines then run in about a second at 32x32 pixels.
"""

from __future__ import annotations

import json

import torch

WORDS = ["a", "an", "the", "cat", "dog", "photo", "of", "red", "blue", "painting", "on", "moon", "astronaut"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# SD 1.x's scheduler config (a PNDM config, as the checkpoints ship it): DDIM/DDPM take what they know.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
}


def write_clip_vocab(folder):
    """vocab.json + merges.txt of a CLIP BPE tokenizer knowing WORDS and single letters."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in list(LETTERS) + [c + "</w>" for c in LETTERS] + [w + "</w>" for w in WORDS]:
        vocab.setdefault(piece, len(vocab))
    merges = ["#version: 0.2"]
    for w in WORDS:  # left-to-right merges building each word, ending in its "</w>" form
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            line = f"{parts[0]} {parts[1]}"
            if line not in merges:
                merges.append(line)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return len(vocab)


def clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    write_clip_vocab(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def bert_tokenizer(folder):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [c for c in LETTERS if c not in WORDS]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), model_max_length=77)


def tiny_clip(vocab_size=128, layers=3, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                         layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=layers,
                         vocab_size=vocab_size, max_position_embeddings=77)
    return CLIPTextModel(cfg).eval()


def tiny_ldmbert(vocab_size=64, seed=0):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    torch.manual_seed(seed)
    cfg = LDMBertConfig(vocab_size=vocab_size, max_position_embeddings=77, encoder_layers=2,
                        encoder_ffn_dim=37, encoder_attention_heads=4, head_dim=8, d_model=32)
    return LDMBertModel(cfg).eval()


def tiny_unet(v2=False, seed=0):
    """SD1-like (conv projections, 2 heads per level) or SD2-like (linear projections, per-level heads)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=(2, 4) if v2 else 2,
        use_linear_projection=v2,
    ).eval()


def tiny_vae(levels=2, seed=0):
    """2 levels: downscale 2 (32x32 pixels <-> 16x16 latents); 4 levels: downscale 8, as released VAEs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8] * levels, in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        sample_size=32,
    ).eval()


def diffkern_modules(**modules):
    """diffkern's UNet / VAE converted from diffusers' (same weights), other components as they are."""
    from diffkern.models import from_diffusers

    return {k: from_diffusers(v) if k in ("unet", "vae") else v for k, v in modules.items()}


def max_diff(a, b):
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def tiny_inpaint_unet(seed=0):
    """tiny_unet's SD1 shape with 9 input channels: latents 4 + mask 1 + masked-image latents 4."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=9, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2,
    ).eval()
