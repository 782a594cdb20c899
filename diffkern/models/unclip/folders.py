"""Karlo's diffusers folders (kakaobrain/karlo-v1-alpha, karlo-v1-alpha-image-variations): the components
of an UnCLIPPipeline / UnCLIPImageVariationPipeline folder, diffkern models where diffkern has them.

prior, text_proj, decoder, super_res_first/last -> diffkern models (loading.load_component_folder, the
same key checks and CheckpointError); text_encoder / image_encoder -> transformers CLIP towers with
projection; tokenizer and feature_extractor -> transformers; schedulers -> diffkern UnCLIPScheduler.
"""

from __future__ import annotations

from pathlib import Path

from diffkern.models.weights import MODEL_CLASSES, CheckpointError, plain_name, read_json_object, reading

UNCLIP_PIPELINES = ("UnCLIPPipeline", "UnCLIPImageVariationPipeline")
_CLIP_TOWERS = ("CLIPTextModelWithProjection", "CLIPVisionModelWithProjection")


def unclip_pipeline_class(folder):
    """"UnCLIPPipeline" / "UnCLIPImageVariationPipeline" when `folder` is such a diffusers folder, else None."""
    index = Path(folder) / "model_index.json"
    if not Path(folder).is_dir() or not index.is_file():
        return None
    name = read_json_object(index).get("_class_name")
    return name if name in UNCLIP_PIPELINES else None


def load_clip_tower(cls, folder, dtype=None, device="cpu"):
    """A transformers CLIPTextModelWithProjection / CLIPVisionModelWithProjection folder, frozen, in eval mode."""
    import transformers

    with reading(f"{folder} ({cls})"):
        model = getattr(transformers, cls).from_pretrained(str(folder), local_files_only=True, dtype=dtype or "auto")
    return model.to(device).eval().requires_grad_(False)


def load_unclip_folder(folder, *, dtype=None, device="cpu", variant=None):
    """{component name: component} of a Karlo diffusers folder (model_index.json names and classes).

    Raises FileNotFoundError for a listed component without its folder, CheckpointError (from the
    component loader) for weights that do not fit, NotImplementedError for a class no loader knows.
    """
    from diffkern.models.loading import load_component_folder
    from diffkern.models.text_encoders import load_tokenizer
    from diffkern.schedulers import UnCLIPScheduler

    folder = Path(folder)
    index = read_json_object(folder / "model_index.json")
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue
        cls = spec[1]
        plain_name(name, f"{folder / 'model_index.json'}: component")
        if cls is not None and not isinstance(cls, str):
            raise CheckpointError(f"{folder / 'model_index.json'}: {name!r} names its class {cls!r}, not a string")
        sub = folder / name
        if cls is None:
            out[name] = None
            continue
        if not sub.is_dir():
            raise FileNotFoundError(f"{folder}: model_index.json lists {name!r} but there is no {name}/")
        if cls in MODEL_CLASSES:
            out[name] = load_component_folder(sub, dtype=dtype, device=device, variant=variant)
        elif cls in _CLIP_TOWERS:
            out[name] = load_clip_tower(cls, sub, dtype, device)
        elif cls in ("CLIPTokenizer", "CLIPTokenizerFast"):
            out[name] = load_tokenizer(str(sub))
        elif cls.startswith("CLIPImageProcessor") or cls == "CLIPFeatureExtractor":
            import transformers  # transformers 5 may save the PIL variant's name (CLIPImageProcessorPil)

            with reading(f"{sub} ({cls})"):
                out[name] = getattr(transformers, cls, transformers.CLIPImageProcessor).from_pretrained(str(sub))
        elif cls.endswith("Scheduler"):
            read_json_object(sub / "scheduler_config.json")  # a bad file is named before the scheduler reads it
            with reading(f"{sub} ({cls})"):
                out[name] = UnCLIPScheduler.from_pretrained(str(sub))
        else:
            raise NotImplementedError(f"{folder}: component {name!r} of class {cls!r} is not loadable by diffkern")
    return out
