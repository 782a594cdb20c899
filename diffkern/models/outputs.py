"""Model outputs that behave like diffusers' (diffusers.utils.BaseOutput): attribute, key and index
access, `to_tuple()`, and a dict of the fields that are not None."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch


class BaseOutput(OrderedDict):
    """A dataclass that is also an ordered dict of its non-None fields, as diffusers' BaseOutput:
    ``out.sample``, ``out["sample"]`` and ``out[0]`` are the same tensor; ``out.to_tuple()`` lists the
    non-None fields in order."""

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                super().__setitem__(field.name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self):
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def to_tuple(self):
        return tuple(self[k] for k in self.keys())


@dataclass
class UNet2DConditionOutput(BaseOutput):
    """`sample`: (B, out_channels, H, W), the model's prediction."""

    sample: torch.Tensor = None


@dataclass
class DecoderOutput(BaseOutput):
    """`sample`: the decoded images (B, C, H, W)."""

    sample: torch.Tensor = None
    commit_loss: torch.Tensor | None = None


@dataclass
class AutoencoderKLOutput(BaseOutput):
    """`latent_dist`: the posterior (DiagonalGaussianDistribution) of the encoded images."""

    latent_dist: object = None
