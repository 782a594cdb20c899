"""Convert instantiated diffusers models into diffkern's, weights and all.

diffusers is not imported here: the diffusers model is recognised by its class name (anywhere in
its MRO, so subclasses convert too) and read through its public config and state_dict.
"""

from __future__ import annotations

import torch

from diffkern.models.autoencoder_kl import AutoencoderKL
from diffkern.models.unet_2d import UNet2DModel
from diffkern.models.unet_2d_condition import UNet2DConditionModel
from diffkern.models.unclip.prior import PriorTransformer
from diffkern.models.unclip.text_proj import UnCLIPTextProjModel

# diffusers class name -> our class with the same config keys and state_dict.
_CONVERTIBLE = {
    "UNet2DConditionModel": UNet2DConditionModel,
    "AutoencoderKL": AutoencoderKL,
    "PriorTransformer": PriorTransformer,
    "UnCLIPTextProjModel": UnCLIPTextProjModel,
    "UNet2DModel": UNet2DModel,
}


def _our_class(module):
    for klass in type(module).__mro__:
        if klass.__name__ in _CONVERTIBLE and klass.__module__.split(".")[0] == "diffusers":
            return _CONVERTIBLE[klass.__name__]
    return None


def from_diffusers(module):
    """diffkern's equivalent of a diffusers model named in _CONVERTIBLE (UNet2DConditionModel,
    AutoencoderKL, ...).

    Same config, the same weights (copied: the two models share no storage), the same dtype and
    device per tensor, the same train/eval mode and VAE tiling / slicing switches.

    Raises:
        TypeError: `module` is not one of the supported diffusers models.
        ValueError: its config uses an option diffkern does not implement (the message names it).
    """
    cls = _our_class(module)
    if cls is None:
        raise TypeError(f"from_diffusers: module must be a diffusers {', '.join(sorted(_CONVERTIBLE))}, "
                        f"got {type(module).__module__}.{type(module).__qualname__}")
    # Build without allocating (the meta device), then take copies of the diffusers tensors as
    # they are: no float32 detour for a half-precision checkpoint, no second copy on the host.
    with torch.device("meta"):
        ours = cls.from_config(module.config)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    ours.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in list(ours.named_parameters()) + list(ours.named_buffers()) if t.is_meta]
    if left:  # only a non-persistent buffer could be missed by a strict load
        raise RuntimeError(f"from_diffusers: tensors not set by the state dict: {left}")
    # Run-time switches a user may have set on the diffusers model (VAE tiling / slicing) carry over.
    for flag in ("use_tiling", "use_slicing", "tile_overlap_factor", "tile_sample_min_size", "tile_latent_min_size"):
        if flag in vars(ours) and hasattr(module, flag):
            setattr(ours, flag, getattr(module, flag))
    return ours.train(module.training)
