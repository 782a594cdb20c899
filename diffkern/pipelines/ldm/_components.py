"""diffkern components inside diffusers' own pipeline classes (the house rule of issue 21).

The LDM and SDXL pipelines of diffkern subclass diffusers' pipelines: __call__, from_pretrained,
save_pretrained, `to`, progress bars and outputs are diffusers'. What changes is what runs: the UNets,
autoencoders (KL and VQ) and schedulers are diffkern's. DiffkernComponentsMixin makes
`from_pretrained(folder)` load those parts with diffkern (and the rest, text encoders and tokenizers,
with diffusers / transformers as usual), and `from_diffusers_pipeline(pipe)` converts a built
diffusers pipeline, weights and all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["DiffkernComponentsMixin", "diffkern_component", "convert_component", "read_model_index"]

# model_index.json class names diffkern builds itself (the rest load through diffusers / transformers).
_OWN_MODELS = ("UNet2DConditionModel", "AutoencoderKL", "UNet2DModel", "VQModel")


def read_model_index(folder):
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    with open(path) as f:
        return json.load(f)


def _scheduler_class(name):
    from diffkern.schedulers import SCHEDULERS

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} has no diffkern implementation (diffkern has: "
                         f"{', '.join(sorted(SCHEDULERS))}); pass scheduler= explicitly")
    return SCHEDULERS[name]


def diffkern_component(folder, class_name, *, dtype=None, variant=None):
    """The diffkern module for one component folder of a diffusers pipeline, or None when diffkern
    does not build that class (text encoders, tokenizers, feature extractors)."""
    folder = Path(folder)
    if class_name == "VQModel":
        from diffkern.models.vq_model import VQModel

        model = VQModel.from_pretrained(folder, torch_dtype=dtype, variant=variant)
        return model.eval()
    if class_name == "ClassEmbedder":
        from diffkern.pipelines.ldm.class_conditional import ClassEmbedder

        return ClassEmbedder.from_pretrained(folder, torch_dtype=dtype, variant=variant).eval()
    if class_name in _OWN_MODELS:
        from diffkern.models.loading import load_component_folder

        return load_component_folder(folder, dtype=dtype, variant=variant)
    if class_name.endswith("Scheduler"):
        with open(folder / "scheduler_config.json") as f:
            return _scheduler_class(class_name).from_config(json.load(f))
    return None


def convert_component(module):
    """diffkern's equivalent of a diffusers UNet / KL or VQ autoencoder / scheduler (same weights, same
    config); anything else is returned as it is."""
    from diffkern.models import from_diffusers
    from diffkern.models.vq_model import VQModel

    name = type(module).__name__
    if type(module).__module__.split(".")[0] != "diffusers":
        return module
    if name == "VQModel":
        with torch.device("meta"):
            ours = VQModel.from_config(module.config)
        ours.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()}, strict=True,
                             assign=True)
        return ours.train(module.training)
    if name in _OWN_MODELS:
        return from_diffusers(module)
    if name.endswith("Scheduler"):
        return _scheduler_class(name).from_config(module.config)
    return module


class DiffkernComponentsMixin:
    """Put first in the bases of a diffusers pipeline subclass:

        class StableDiffusionXLPipeline(DiffkernComponentsMixin, diffusers.StableDiffusionXLPipeline): ...
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' from_pretrained on a local pipeline folder, with the UNet, autoencoder and
        scheduler built by diffkern (scheduler: the diffkern class of the name scheduler_config.json
        gives). Components passed as keyword arguments are used as they are; torch_dtype and variant
        apply to every part, as in diffusers."""
        folder = Path(pretrained_model_name_or_path)
        index = read_model_index(folder)
        dtype, variant = kwargs.get("torch_dtype"), kwargs.get("variant")
        if isinstance(dtype, dict):
            raise ValueError("torch_dtype: one dtype for every component, not a dict, in diffkern pipelines")
        # diffusers' loader accepts only its own classes for the parts it knows (ModelMixin, SchedulerMixin):
        # it loads the others (text encoders, tokenizers) and ours are put in when the pipeline is rebuilt.
        ours = {}
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, (list, tuple)):
                continue
            if name in kwargs:
                if kwargs[name] is not None and type(kwargs[name]).__module__.split(".")[0] == "diffkern":
                    ours[name] = kwargs[name]
                    kwargs[name] = None
                continue
            if spec[0] is None:
                continue
            module = diffkern_component(folder / name, spec[1], dtype=dtype, variant=variant)
            if module is not None:
                ours[name], kwargs[name] = module, None
        pipe = super().from_pretrained(str(folder), **kwargs)
        return cls._rebuilt(pipe, ours)

    @classmethod
    def _rebuilt(cls, pipe, parts):
        import inspect

        parts = {**pipe.components, **parts}
        # and the pipeline's own settings (force_zeros_for_empty_prompt, requires_aesthetics_score, ...)
        for key in inspect.signature(cls.__init__).parameters:
            if key not in parts and key in pipe.config and not key.startswith("_"):
                parts[key] = pipe.config[key]
        ours = cls(**parts)
        ours.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return ours

    @classmethod
    def from_diffusers_pipeline(cls, pipe):
        """This pipeline with `pipe`'s components, the UNet, autoencoder and scheduler converted to
        diffkern's (copies of the weights; the text encoders and tokenizers are shared)."""
        return cls._rebuilt(pipe, {k: convert_component(v) for k, v in pipe.components.items()})


_SDXL_I2I, _SDXL_INPAINT = "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"
# model_index.json "_class_name" -> (text-to-image / unconditional, img2img, inpaint) diffkern class names
_FOLDER_TABLE = {
    "StableDiffusionXLPipeline": ("StableDiffusionXLPipeline", _SDXL_I2I, _SDXL_INPAINT),
    _SDXL_I2I: (_SDXL_I2I, _SDXL_I2I, _SDXL_INPAINT),
    _SDXL_INPAINT: (_SDXL_INPAINT, _SDXL_I2I, _SDXL_INPAINT),
    "LDMPipeline": ("LDMPipeline", None, None),
    "LDMSuperResolutionPipeline": ("LDMSuperResolutionPipeline", None, None),
    "LDMClassConditionalPipeline": ("LDMClassConditionalPipeline", None, None),
    "LDMInpaintPipeline": ("LDMInpaintPipeline", None, "LDMInpaintPipeline"),
}


def folder_pipeline_class(path, *, img2img=False, inpaint=False):
    """The diffkern pipeline class for a diffusers folder of an LDM / SDXL pipeline (by model_index.json's
    _class_name), or None when the path is something else (load_pipeline's table)."""
    from pathlib import Path

    path = Path(path)
    if not (path / "model_index.json").is_file():
        return None
    name = read_model_index(path).get("_class_name")
    if name not in _FOLDER_TABLE:
        return None
    if img2img and inpaint:
        raise ValueError("img2img, inpaint: pick one pipeline, not both")
    choice = _FOLDER_TABLE[name][2 if inpaint else 1 if img2img else 0]
    if choice is None:
        raise ValueError(f"{path}: a {name} folder has no {'inpainting' if inpaint else 'image-to-image'} "
                         "pipeline")
    import diffkern.pipelines as pipelines

    return getattr(pipelines, choice)


def load_folder_pipeline(path, cls, *, dtype=None, device="cpu", variant=None, scheduler=None):
    """load_pipeline's route for LDM / SDXL folders: cls.from_pretrained(path) on `device`; scheduler None
    keeps the folder's (its diffkern class), a name (an alias of diffkern.schedulers.ALIASES or a class
    name) builds another on the folder's scheduler config, an instance is used as it is."""
    kwargs = {k: v for k, v in (("torch_dtype", dtype), ("variant", variant)) if v is not None}
    if scheduler is not None and not isinstance(scheduler, str):
        kwargs["scheduler"] = scheduler
    pipe = cls.from_pretrained(path, **kwargs)
    if isinstance(scheduler, str):
        from diffkern.pipelines._common import make_scheduler

        pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    return pipe.to(device)
