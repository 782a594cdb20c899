"""The diffusers ConfigMixin / SchedulerMixin / BaseOutput contract, without importing diffusers:
frozen configs, scheduler_config.json round trips, compatibles, dict-like step outputs."""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, fields

import numpy as np
import torch

logger = logging.getLogger("diffkern.schedulers")

CONFIG_NAME = "scheduler_config.json"
# diffusers' KarrasDiffusionSchedulers: the classes that share a config and can replace each other
KARRAS_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
)
_FALLBACK_DIFFUSERS_VERSION = "0.42.1"  # what we test against, written when diffusers is absent


class FrozenConfig(dict):
    """Read-only config dict with attribute access, like diffusers' FrozenDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _immutable(self, *args, **kwargs):
        raise TypeError(
            "scheduler config is frozen; build a new scheduler with from_config(config, key=value)"
        )

    __setitem__ = __delitem__ = __setattr__ = setdefault = update = pop = popitem = clear = _immutable

    def __reduce__(self):  # copy/pickle without going through the frozen __setitem__
        return (type(self), (dict(self),))


class BaseOutput(OrderedDict):
    """Ordered dict + dataclass, as diffusers' BaseOutput: attribute, key and index access; None
    fields are not keys (so neither in to_tuple nor in indexing)."""

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                self[f.name] = v

    def __getitem__(self, k):
        if isinstance(k, str):
            return dict(self.items())[k]
        return self.to_tuple()[k]

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def _no(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} does not support removing or merging keys")

    __delitem__ = setdefault = pop = update = _no

    def __reduce__(self):
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def to_tuple(self):
        """The non-None fields in order."""
        return tuple(self[k] for k in self.keys())


@dataclass
class SchedulerOutput(BaseOutput):
    """Result of `step`: the sample at the previous timestep and (where the sampler has one) the
    predicted x0; diffusers' SchedulerOutput / DDPMSchedulerOutput / EulerDiscreteSchedulerOutput."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def diffusers_version():
    """The installed diffusers' version (no import), else the version these classes mirror."""
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # not installed: configs still carry a plausible version key
        return _FALLBACK_DIFFUSERS_VERSION


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, tuple):
        return list(v)
    return v


def read_config_file(path, subfolder=None):
    """The dict in `path` (a scheduler_config.json, or a folder holding one, or its `subfolder`)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        file = path
    else:
        folder = os.path.join(path, subfolder) if subfolder else path
        file = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(file):
            raise OSError(
                f"no {CONFIG_NAME} in {folder!r} (diffkern loads local folders only; download a hub "
                "repository first, e.g. with huggingface_hub.snapshot_download)"
            )
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise OSError(f"{file!r} is not valid JSON: {e}") from None


class ConfigMixin:
    """Config handling of every diffkern scheduler (diffusers' ConfigMixin + SchedulerMixin API).

    `config` is a property over `_internal_dict` because diffusers pipelines replace that
    attribute to patch old configs (e.g. StableDiffusionPipeline's steps_offset fix)."""

    config_name = CONFIG_NAME
    has_compatibles = True
    _compatibles = KARRAS_SCHEDULERS
    _defaults: dict = {}

    @property
    def config(self):
        return self._internal_dict

    @config.setter
    def config(self, value):
        self._internal_dict = value if isinstance(value, FrozenConfig) else FrozenConfig(value)

    def register_to_config(self, **kwargs):
        """Merge keys into the (frozen) config, as diffusers' register_to_config does after init."""
        cfg = dict(self._internal_dict)
        cfg.update(kwargs)
        self._internal_dict = FrozenConfig(cfg)

    @classmethod
    def _all_known_keys(cls):
        from diffkern.schedulers import SCHEDULERS  # the registry lives in the package (no cycle at call time)

        keys = set()
        for c in SCHEDULERS.values():
            keys |= set(c._defaults)
        return keys

    @classmethod
    def extract_init_dict(cls, config, **kwargs):
        """(init kwargs, unused) from a config dict: private `_` keys and other schedulers' keys are
        dropped silently, any other unknown key is dropped with diffusers' warning."""
        if config is not None and hasattr(config, "config") and not isinstance(config, dict):
            config = config.config
        config = dict(config or {})
        used_defaults = set(config.pop("_use_default_values", []) or [])
        init = {}
        unexpected = {}
        others = cls._all_known_keys()
        for k, v in config.items():
            if k.startswith("_") or k in used_defaults:
                continue
            if k in cls._defaults:
                init[k] = v
            elif k not in others:
                unexpected[k] = v
        if unexpected:
            logger.warning(
                f"The config attributes {unexpected} were passed to {cls.__name__}, but are not expected "
                f"and will be ignored. Please verify your {cls.config_name} configuration file."
            )
        unused = {}
        for k, v in kwargs.items():
            if k in cls._defaults:
                init[k] = v
            else:
                unused[k] = v
        return init, unused

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build from a diffusers/diffkern config (dict, FrozenDict, or an object with `.config`) plus
        keyword overrides; unknown keys are ignored with diffusers' warning, invalid values raise
        ValueError naming the key."""
        init, unused = cls.extract_init_dict(config, **kwargs)
        if unused and not return_unused_kwargs:
            logger.warning(f"{cls.__name__}.from_config: ignoring unexpected arguments {sorted(unused)}")
        obj = cls(**init)
        return (obj, unused) if return_unused_kwargs else obj

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder=None, return_unused_kwargs=False, **kwargs):
        """The config dict of a local folder / file (diffusers' ConfigMixin.load_config, local only)."""
        cfg = read_config_file(pretrained_model_name_or_path, subfolder)
        return (cfg, kwargs) if return_unused_kwargs else cfg

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False,
                        **kwargs):
        """Load from a local folder holding scheduler_config.json (or its `subfolder`, e.g. "scheduler")."""
        if pretrained_model_name_or_path is None:
            raise ValueError(f"{cls.__name__}.from_pretrained: pretrained_model_name_or_path is required")
        for hub_only in ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision"):
            kwargs.pop(hub_only, None)
        cfg = read_config_file(pretrained_model_name_or_path, subfolder)
        return cls.from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self):
        """The config as diffusers writes it: sorted keys, `_class_name` and `_diffusers_version`."""
        d = {k: _jsonable(v) for k, v in self.config.items()}
        d["_class_name"] = type(self).__name__
        d["_diffusers_version"] = diffusers_version()
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path):
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def save_config(self, save_directory, push_to_hub=False, **kwargs):
        """Write scheduler_config.json into `save_directory` (created if needed); loadable by
        diffusers' from_pretrained as well as ours."""
        if push_to_hub:
            raise NotImplementedError("diffkern schedulers do not push to the hub; save, then upload")
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, self.config_name))

    def save_pretrained(self, save_directory, push_to_hub=False, **kwargs):
        """Same as save_config (a scheduler has no weights)."""
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def _get_compatibles(cls):
        from diffkern.schedulers import SCHEDULERS

        names = set(cls._compatibles) | {cls.__name__}
        return [SCHEDULERS[n] for n in sorted(names) if n in SCHEDULERS]

    @property
    def compatibles(self):
        """The diffkern scheduler classes that can load this one's config (diffusers' compatibles)."""
        return self._get_compatibles()

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"
