"""Config helpers of the diffusers-layout models (whose configs are diffusers' own: ConfigMixin).

- ModelConfig: a read-only-by-attribute dict, for the non-diffusers parts that still carry a config
  (LDM-BERT's, test doubles).
- check_options / per_level: the models' checks of diffusers config values they do not implement.
"""

from __future__ import annotations

import inspect


class ModelConfig(dict):
    """A plain dict of a model's constructor arguments, also readable as attributes
    (``model.config.in_channels``), as diffusers' ``FrozenDict`` configs are."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("ModelConfig is read-only through attributes; build a new model to change it")

    def __repr__(self):
        return f"ModelConfig({dict.__repr__(self)})"


def defaults(cls):
    """{argument: default} of a model's constructor: diffusers' defaults, which a config.json leaves out."""
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.default is not inspect.Parameter.empty}


def check_options(model_name, config, supported):
    """ValueError naming the option when config[key] is not one of supported[key] (values this
    diffkern model does not implement; diffusers' class would build something else)."""
    for key, allowed in supported.items():
        if config[key] not in allowed:
            raise ValueError(f"{model_name}: {key}={config[key]!r} is not supported by diffkern "
                             f"(supported: {', '.join(repr(a) for a in allowed)})")


def per_level(model_name, key, value, levels):
    """An int (or None) repeated per UNet level, or a per-level list checked for length."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{model_name}: {key} must have one entry per level ({levels}), "
                             f"got {list(value)}")
        return list(value)
    return [value] * levels



def _not_covered(model, option):
    raise NotImplementedError(
        f"{type(model).__name__}.{option}: diffusers' attention processors are not supported by diffkern's "
        "models: their attention runs on diffkern.ops.attention (pick its backend with diffkern.use_backend "
        "or the DIFFKERN_BACKEND environment variable)")


class NoAttentionProcessors:
    """diffusers' attention-processor API (attn_processors, set_attn_processor, attention slicing, xFormers,
    attention backends, QKV fusion, IP-Adapter / custom-diffusion processors) on a diffkern model:
    NotImplementedError naming the option, never a silent no-op."""

    @property
    def attn_processors(self):
        _not_covered(self, "attn_processors")

    def set_attn_processor(self, processor):
        _not_covered(self, "set_attn_processor")

    def set_default_attn_processor(self):
        _not_covered(self, "set_default_attn_processor")

    def set_attention_slice(self, slice_size="auto"):
        _not_covered(self, "set_attention_slice")

    def enable_xformers_memory_efficient_attention(self, attention_op=None):
        _not_covered(self, "enable_xformers_memory_efficient_attention")

    def set_attention_backend(self, backend):
        _not_covered(self, "set_attention_backend")

    def fuse_qkv_projections(self):
        _not_covered(self, "fuse_qkv_projections")
