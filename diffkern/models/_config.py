"""Model configs that read like diffusers': a dict with attribute access, checked against a schema."""

from __future__ import annotations

from torch import nn


class ModelConfig(dict):
    """A plain dict of a model's constructor arguments, also readable as attributes
    (``unet.config.in_channels``), as diffusers' ``FrozenDict`` configs are, so code written for
    diffusers models (pipelines, schedulers' helpers) reads ours unchanged."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("ModelConfig is read-only through attributes; build a new model to change it")

    def __repr__(self):
        return f"ModelConfig({dict.__repr__(self)})"


def resolve_config(model_name, defaults, given, fixed=None):
    """Fill `given` with `defaults` and check it; returns a ModelConfig.

    - Keys starting with "_" (diffusers' "_class_name", "_diffusers_version", ...) are dropped.
    - A key that is not in `defaults` is an error naming it: it is an option we do not know, and
      silently ignoring it could build a different network than the checkpoint's.
    - fixed: {key: allowed values}; a value outside them is an option we do not support.
    """
    unknown = sorted(k for k in given if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"{model_name}: unknown config option(s) {unknown}")
    config = dict(defaults)
    config.update({k: v for k, v in given.items() if not k.startswith("_")})
    for key, allowed in (fixed or {}).items():
        if config[key] not in allowed:
            raise ValueError(f"{model_name}: {key}={config[key]!r} is not supported "
                             f"(supported: {', '.join(repr(a) for a in allowed)})")
    return ModelConfig(config)


def per_level(model_name, key, value, levels):
    """An int (or None) repeated per UNet level, or a per-level list checked for length."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{model_name}: {key} must have one entry per level ({levels}), "
                             f"got {list(value)}")
        return list(value)
    return [value] * levels


class ConfiguredModel(nn.Module):
    """Base of the models built from a diffusers-style config: `from_config`, `.dtype`, `.device`, and
    config keys readable as attributes (``unet.in_channels``), as diffusers' models allow."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("config")
            if config is not None and name in config:
                return config[name]
            raise

    @classmethod
    def from_config(cls, config):
        """Build from a diffusers config dict (or any mapping, e.g. a diffusers FrozenDict)."""
        return cls(**dict(config))

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device
