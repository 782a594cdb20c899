"""Argument handling of the GLIDE pipeline: prompts as token ids, images and masks as tensors."""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F


def guidance_scale_value(value, auto):
    """A float or None; "auto" becomes `auto` (the notebook's choice for this call)."""
    if isinstance(value, str) and value == "auto":
        return auto
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"guidance_scale: expected a number, None or 'auto', got {value!r}")
    return float(value)


def check_generator(generator, n):
    if isinstance(generator, (list, tuple)) and len(generator) != n:
        raise ValueError(f"generator: expected one torch.Generator or a list of {n} (one per image), "
                         f"got a list of {len(generator)}")


def token_lists(tokens):
    """One prompt's ids (ints, a 1-D tensor) or several (a list of those, a 2-D tensor) -> lists of ints."""
    def is_row(t):
        return isinstance(t, (list, tuple)) or (isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim == 1)

    rows = None
    if isinstance(tokens, (torch.Tensor, np.ndarray)) and tokens.ndim in (1, 2):
        rows = tokens.tolist() if tokens.ndim == 2 else [tokens.tolist()]
    elif isinstance(tokens, (list, tuple)):
        nested = bool(tokens) and all(is_row(t) for t in tokens)
        rows = [t if isinstance(t, (list, tuple)) else t.tolist() for t in tokens] if nested else [tokens]
    try:
        return [[int(t) for t in row] for row in rows]
    except (TypeError, ValueError):
        raise TypeError("tokens: expected token ids (a list of ints, a 1-D tensor) or a list of them (or a "
                        f"2-D tensor), got {type(tokens).__name__}") from None


def padded_tokens(ids, text_ctx, model, device):
    """(P, text_ctx) tokens and mask: GLIDE pads with the end token (the vocabulary's last id), masked out."""
    n_vocab = model.token_embedding.num_embeddings
    rows, masks = [], []
    for row in ids:
        row = row[:text_ctx]
        if any(not 0 <= t < n_vocab for t in row):
            raise ValueError(f"tokens: ids must lie in [0, {n_vocab}), got {row}")
        pad = text_ctx - len(row)
        rows.append(row + [n_vocab - 1] * pad)
        masks.append([True] * len(row) + [False] * pad)
    return torch.tensor(rows, device=device), torch.tensor(masks, device=device)


def image_tensor(image, size, *, batched=False):
    """(1, 3, size, size) in [-1, 1] (float32; float64 kept) from a PIL image or a tensor in [-1, 1];
    batched: (B, 3, size, size), from a list of PIL images or a (B, 3, H, W) tensor too."""
    from PIL import Image

    if batched and isinstance(image, (list, tuple)) and image and \
            all(isinstance(i, Image.Image) for i in image):
        return torch.cat([image_tensor(i, size) for i in image])
    if isinstance(image, Image.Image):
        resized = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
        array = np.asarray(resized, dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or image.shape[-3] != 3 or \
            (image.dim() == 4 and image.shape[0] != 1 and not batched):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        want = "(3, H, W) / (B, 3, H, W) tensor in [-1, 1] or a list of PIL images" if batched else \
            "(3, H, W) / (1, 3, H, W) tensor in [-1, 1]"
        raise ValueError(f"image: expected a PIL image or a {want}, got {got}")
    image = image.reshape(-1, 3, *image.shape[-2:])
    image = image.float() if image.dtype != torch.float64 else image
    if tuple(image.shape[-2:]) != (size, size):
        image = F.interpolate(image, (size, size), mode="bicubic", align_corners=False)
    return image


def mask_tensor(mask, size):
    """(1, 1, size, size) float32 of 0 / 1 (nearest resize)."""
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
    if mask.dim() not in (2, 3, 4) or mask.numel() != mask.shape[-1] * mask.shape[-2]:
        raise ValueError(f"mask: expected (H, W), (1, H, W) or (1, 1, H, W), got {tuple(mask.shape)}")
    mask = mask.reshape(1, 1, *mask.shape[-2:])
    if tuple(mask.shape[-2:]) != (size, size):
        mask = F.interpolate(mask, (size, size), mode="nearest")
    return mask
