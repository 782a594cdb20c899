"""Image and mask inputs of the DeepFloyd IF pipelines, read exactly as diffusers reads them.

Stage I's image-to-image and inpainting take images resized (PIL) to the UNet's sample size;
stage II takes its low-resolution image as given (PIL in [0, 255] -> [-1, 1]; arrays and tensors
are taken to be in [-1, 1] already, the raw output of stage I with output_type="pt").
"""

from __future__ import annotations

import numpy as np
import torch


def _pil():
    from PIL import Image

    return Image


def _is_image(x):
    return isinstance(x, (torch.Tensor, np.ndarray, _pil().Image))


def image_batch(image, name="image"):
    """How many images `image` holds (diffusers' check_inputs count); TypeError for other types."""
    first = image[0] if isinstance(image, list) and image else image
    if not _is_image(first):
        raise ValueError(f"{name}: expected a torch.Tensor, PIL.Image.Image, np.ndarray or a list of them, "
                         f"got {type(first).__name__}")
    if isinstance(image, list):
        return len(image)
    return 1 if isinstance(image, _pil().Image) else image.shape[0]


def resize_to_sample_size(image, size):
    """DeepFloyd's resize: the short side to `size`, the long one to a multiple of 8 keeping the
    aspect ratio, bicubic."""
    w, h = image.size
    ratio = w / h
    new_w, new_h = size, size
    if ratio >= 1:
        new_w = int(round(size / 8 * ratio) * 8)
    else:
        new_h = int(round(size / 8 / ratio) * 8)
    return image.resize((new_w, new_h), resample=_pil().BICUBIC, reducing_gap=None)


def _arrays_to_pt(arrays):
    if arrays.ndim == 3:
        arrays = arrays[..., None]
    return torch.from_numpy(arrays.transpose(0, 3, 1, 2))


def stage1_image(image, sample_size):
    """Image-to-image / inpainting input of stage I -> (B, 3, H, W) in [-1, 1] (float32 for PIL)."""
    images = image if isinstance(image, list) else [image]
    if isinstance(images[0], _pil().Image):
        arrays = [np.array(resize_to_sample_size(i.convert("RGB"), sample_size)).astype(np.float32)
                  / 127.5 - 1 for i in images]
        return _arrays_to_pt(np.stack(arrays))
    if isinstance(images[0], np.ndarray):
        arrays = np.concatenate(images) if images[0].ndim == 4 else np.stack(images)
        return _arrays_to_pt(arrays)
    return torch.cat(images) if images[0].ndim == 4 else torch.stack(images)


def stage2_image(image):
    """Super-resolution input (the low-resolution image) -> (B, 3, h, w) tensor."""
    if not isinstance(image, (torch.Tensor, list)):
        image = [image]
    if isinstance(image[0], _pil().Image):
        arrays = np.stack([np.array(i).astype(np.float32) / 127.5 - 1.0 for i in image])
        return torch.from_numpy(arrays.transpose(0, 3, 1, 2))
    if isinstance(image[0], np.ndarray):
        arrays = np.stack(image)
        if arrays.ndim == 5:
            arrays = arrays[0]
        return torch.from_numpy(arrays.transpose(0, 3, 1, 2))
    if isinstance(image, list):
        dims = image[0].ndim
        if dims not in (3, 4):
            raise ValueError(f"image: tensors must have 3 or 4 dimensions, got {dims}")
        return torch.stack(image) if dims == 3 else torch.cat(image)
    return image


def binarize(mask):
    mask = mask.clone() if isinstance(mask, torch.Tensor) else mask.copy()  # never modify the caller's mask
    mask[mask < 0.5] = 0
    mask[mask >= 0.5] = 1
    return mask


def stage1_mask(mask_image, sample_size):
    """Inpainting mask -> (B, 1, H, W) of 0 / 1 (1 = repaint), thresholded at 0.5 as diffusers."""
    masks = mask_image if isinstance(mask_image, list) else [mask_image]
    if isinstance(masks[0], torch.Tensor):
        m = torch.cat(masks) if masks[0].ndim == 4 else torch.stack(masks)
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[None] if m.shape[0] == 1 else m[:, None]
        return binarize(m)
    if isinstance(masks[0], _pil().Image):
        arrays = [np.array(resize_to_sample_size(m.convert("L"), sample_size))[None, None] for m in masks]
        return torch.from_numpy(binarize(np.concatenate(arrays).astype(np.float32) / 255.0))
    if isinstance(masks[0], np.ndarray):
        return torch.from_numpy(binarize(np.concatenate([m[None, None] for m in masks])))
    raise ValueError(f"mask_image: expected a torch.Tensor, PIL.Image.Image, np.ndarray or a list of them, "
                     f"got {type(masks[0]).__name__}")
