"""Load released text-to-image checkpoints into diffkern's modules.

    from diffkern.models.loading import load
    pipe = load("stable-diffusion-v1-5")                     # diffusers pipeline folder
    unet = load("stable-diffusion-v1-5/unet", dtype=torch.float16)   # one component folder
    pipe = load("v2-1_768-ema-pruned.safetensors", prediction_type="v_prediction",
                tokenizer="stable-diffusion-2-1/tokenizer")  # CompVis / Stability single file

Three formats, told apart by the path: a folder with model_index.json (diffusers pipeline), a
folder with config.json (one diffusers component) or a file (.ckpt / .pt / .pth / .bin / .safetensors,
CompVis layout, see diffkern.models.compvis).

Safety: safetensors files are read with safetensors; pickles only with torch.load(weights_only=True),
which refuses any object but tensors and plain containers. Every problem with a file (unreadable,
truncated, keys that do not fit the model) is one CheckpointError naming the file and listing all
the keys at fault.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from diffkern.models import compvis, compvis_text
from diffkern.models.compvis import CheckpointError
from diffkern.models.weights import (MODEL_CLASSES, folder_weights, key_problems, materialize,
                                     model_class, on_meta, plain_name, read_json_object, read_state_dict,
                                     reading)

__all__ = ["CheckpointError", "LoadedPipeline", "load", "load_component_folder", "read_state_dict"]

_TEXT_ENCODERS = ("CLIPTextModel", "LDMBertModel")
_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "BertTokenizer", "BertTokenizerFast")
# Pipeline parts a diffkern pipeline never runs: left out (None) with a note, not an error.
_NOT_LOADED = ("StableDiffusionSafetyChecker", "CLIPImageProcessor", "CLIPFeatureExtractor", "IFSafetyChecker",
               "IFWatermarker")
# DeepFloyd IF folders (IF-I-*, IF-II-*): T5 text encoder and tokenizer (diffkern.models.t5).
_T5_PARTS = ("T5EncoderModel", "T5Tokenizer", "T5TokenizerFast")
# Karlo (unCLIP) folders: CLIP towers with projection, through transformers (diffkern.models.unclip.folders).
_CLIP_TOWERS = ("CLIPTextModelWithProjection", "CLIPVisionModelWithProjection")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

@dataclass
class LoadedPipeline:
    """What `load` returns for a pipeline folder or a single-file checkpoint.

    scheduler_config is a diffusers scheduler config dict: `DDIMScheduler.from_config(...)` of
    diffkern.schedulers (or diffusers) builds a sampler from it. components holds every part by its
    model_index name (LDM text2im calls its text encoder "bert" and its VAE "vqvae"; unet/vae/
    text_encoder point to those too). notes says what was assumed or left out.
    """

    unet: torch.nn.Module | None
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    tokenizer: object | None
    scheduler_config: dict
    model_index: dict
    prediction_type: str
    source: Path
    components: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def load(path, *, dtype=None, device="cpu", variant=None, component=None, prediction_type=None,
         tokenizer=None):
    """Load a diffusers pipeline folder, a diffusers component folder or a CompVis single file.

    Args:
        path: a folder with model_index.json -> LoadedPipeline; a folder with config.json -> the
            module named by its "_class_name" (UNet2DConditionModel, AutoencoderKL) or its text
            encoder; a .ckpt/.pt/.pth/.bin/.safetensors CompVis / Stability Stable Diffusion 1.x or
            2.x file (optionally wrapped in {"state_dict": ...}) -> LoadedPipeline.
        dtype: floating dtype of the weights; None keeps the file's (fp32 files stay fp32, fp16
            files fp16). Conversion happens after reading, so any file loads in any dtype.
        device: where the modules end up.
        variant: diffusers weight variant ("fp16" -> diffusion_pytorch_model.fp16.safetensors);
            folders only. A missing variant file is an error, not a fallback to other weights.
        component: load one part only ("unet", "vae", "text_encoder", "tokenizer", "scheduler" or
            any model_index name) and return it; pipelines and single files only.
        prediction_type: "epsilon" | "v_prediction" | "sample". Weights cannot tell it (SD 2.x
            768-v and 2.x-base have identical tensors), so single files assume "epsilon" unless told;
            for folders it overrides the scheduler config's value.
        tokenizer: single files carry none; a tokenizer folder (vocab.json + merges.txt) or object.

    Raises:
        FileNotFoundError: `path` (or a file a folder must hold) does not exist.
        CheckpointError (a ValueError): unreadable / truncated file, or keys that are missing,
            unexpected or mis-shaped (all listed in one error, at most 20 per kind with counts).
        NotImplementedError: a model class or checkpoint family diffkern does not load.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load: path does not exist: {path}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"load: dtype must be None or a floating torch.dtype, got {dtype!r}")
    if prediction_type is not None and prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"load: prediction_type must be one of {_PREDICTION_TYPES} or None, "
                         f"got {prediction_type!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"load: device {device!r} is not a torch device: {e}") from None
    opts = dict(dtype=dtype, device=device)
    if path.is_dir():
        if tokenizer is not None:
            raise ValueError("load: tokenizer= is for single files; folders bring their own tokenizer")
        if (path / "model_index.json").is_file():
            return _load_pipeline_folder(path, variant=variant, component=component,
                                         prediction_type=prediction_type, **opts)
        if (path / "config.json").is_file():
            if component is not None or prediction_type is not None:
                raise ValueError("load: component= and prediction_type= do not apply to a component folder")
            return load_component_folder(path, variant=variant, **opts)
        if (path / "config.yml").is_file() and (path / "pytorch_model.bin").is_file():
            from diffkern.models.checkpoints.deepfloyd import load_deepfloyd_unet  # original DeepFloyd IF

            return load_deepfloyd_unet(path, **opts)
        raise FileNotFoundError(f"load: {path} holds neither model_index.json (a pipeline) nor config.json "
                                "(a component) nor config.yml + pytorch_model.bin (a DeepFloyd IF UNet)")
    if variant is not None:
        raise ValueError("load: variant= selects files inside diffusers folders; it does not apply to a "
                         "single file")
    return _load_single_file(path, component=component, prediction_type=prediction_type or "epsilon",
                            tokenizer=tokenizer, **opts)


def load_component_folder(folder, *, dtype=None, device="cpu", variant=None):
    """The module of one diffusers component folder (config.json + weights), class by "_class_name"."""
    folder = Path(folder)
    config = read_json_object(folder / "config.json")
    name = config.get("_class_name")
    if name is None and (config.get("architectures") or config.get("model_type")):
        return _load_text_encoder(folder, dtype=dtype, device=device, variant=variant)
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f"{folder / 'config.json'}: \"_class_name\" must be a string, got {name!r}")
    cls = model_class(name)
    sd = folder_weights(folder, "diffusion_pytorch_model", variant)
    factory = lambda: cls.from_config(config)  # noqa: E731
    module = on_meta(factory, str(folder))
    problems = key_problems(module, sd, str(folder))
    if problems:
        raise CheckpointError(f"{folder}: the weights do not fit {name}:\n  " + "\n  ".join(problems))
    return materialize(module, factory, sd, dtype=dtype, device=device)


def _load_text_encoder(folder, *, dtype, device, variant):
    from diffkern.models import text_encoders

    if variant is None:
        return text_encoders.load_text_encoder(str(folder), dtype=dtype, device=device)
    if not any(folder.glob(f"model.{variant}.*")):
        present = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"{folder}: no model.{variant}.safetensors or model.{variant}.bin "
                                f"(variant={variant!r}); files there: {present}")
    if "CLIPTextModel" not in (read_json_object(folder / "config.json").get("architectures") or []):
        raise NotImplementedError(f"{folder}: weight variants are supported for CLIPTextModel text "
                                  "encoders only")
    from transformers import CLIPTextModel

    with reading(f"{folder} (text encoder, variant {variant!r})"):
        model = CLIPTextModel.from_pretrained(folder, variant=variant, dtype=dtype or "auto",
                                              local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Pipeline folders
# ---------------------------------------------------------------------------------------------

def _load_part(name, cls, folder, *, dtype, device, variant, notes):
    if cls in MODEL_CLASSES:
        return load_component_folder(folder, dtype=dtype, device=device, variant=variant)
    if cls in _TEXT_ENCODERS:
        return _load_text_encoder(folder, dtype=dtype, device=device, variant=variant)
    if cls in _CLIP_TOWERS:
        from diffkern.models.unclip.folders import load_clip_tower

        return load_clip_tower(cls, folder, dtype, device)
    if cls in _T5_PARTS:
        from diffkern.models import t5

        if cls == "T5EncoderModel":
            return t5.load_t5(str(folder), dtype=dtype, device=device, variant=variant)
        return t5.load_t5_tokenizer(str(folder))
    if cls in _TOKENIZERS:
        from diffkern.models import text_encoders

        return text_encoders.load_tokenizer(str(folder))
    if cls.endswith("Scheduler"):
        return read_json_object(folder / "scheduler_config.json")
    if cls in _NOT_LOADED:
        notes.append(f"{name} ({cls}) not loaded: diffkern pipelines do not run it")
        return None
    supported = ", ".join((*MODEL_CLASSES, *_TEXT_ENCODERS, *_TOKENIZERS, *_T5_PARTS, *_CLIP_TOWERS, "schedulers"))
    raise NotImplementedError(f"{name}: class {cls!r} is not loadable by diffkern (supported: {supported})")


def _load_pipeline_folder(folder, *, dtype, device, variant, component, prediction_type):
    index = read_json_object(folder / "model_index.json")
    parts = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2}
    for name, (_, cls) in parts.items():
        plain_name(name, f"{folder / 'model_index.json'}: component")
        if cls is not None and not isinstance(cls, str):
            raise CheckpointError(f"{folder / 'model_index.json'}: {name!r} names its class {cls!r}, not a string")
    if component is not None:
        if component not in parts:
            raise ValueError(f"load: component {component!r} is not in {folder / 'model_index.json'} "
                             f"(it lists {sorted(parts)})")
        parts = {component: parts[component]}
    components, notes = {}, []
    for name, (_, cls) in parts.items():
        if cls is None:  # e.g. a pipeline saved with safety_checker=None
            components[name] = None
            continue
        sub = folder / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{folder}: model_index.json lists {name!r} but there is no {name}/")
        components[name] = _load_part(name, cls, sub, dtype=dtype, device=device, variant=variant,
                                      notes=notes)
    scheduler = dict(components.get("scheduler") or {})
    if prediction_type is not None:
        scheduler["prediction_type"] = prediction_type
        notes.append(f"prediction_type={prediction_type!r} set by the caller")
    if component is not None:
        return scheduler if component == "scheduler" else components[component]
    return LoadedPipeline(
        unet=components.get("unet"), vae=components.get("vae", components.get("vqvae")),
        text_encoder=components.get("text_encoder", components.get("bert")),
        tokenizer=components.get("tokenizer"), scheduler_config=scheduler, model_index=index,
        prediction_type=scheduler.get("prediction_type", "epsilon"), source=folder, components=components,
        notes=notes)


# ---------------------------------------------------------------------------------------------
# CompVis / Stability single files
# ---------------------------------------------------------------------------------------------

# The noise schedule every SD 1.x / 2.x model was trained with (v1-inference.yaml / v2-inference.yaml:
# linear_start 0.00085, linear_end 0.012, 1000 steps, sqrt-linear betas), in diffusers' words.
_SD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                 "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
_PART_PREFIXES = {"unet": compvis.UNET_PREFIX, "vae": compvis.VAE_PREFIX, "text_encoder": "cond_stage_model."}
_SINGLE_FILE_PARTS = tuple(_PART_PREFIXES)


def _scheduler_for(ignored, prediction_type, notes):
    config = dict(_SD_SCHEDULER, prediction_type=prediction_type)
    betas = ignored.get("betas")
    if betas is not None:
        betas = betas.double().flatten()
        expected = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, len(betas),
                                  dtype=torch.float64) ** 2
        if not torch.allclose(betas, expected, rtol=1e-5, atol=0):
            config.update(num_train_timesteps=len(betas), trained_betas=betas.tolist())
            notes.append("the file's betas differ from SD's schedule: scheduler_config holds them as "
                         "trained_betas")
    return config


def _single_file_plans(parts, wanted, *, sample_size, notes):
    """{name: (module factory, diffusers-layout state dict, file-name function)} for `wanted` parts."""
    plans = {}
    if "unet" in wanted and parts["unet"]:
        ucfg = compvis.infer_unet_config(parts["unet"], sample_size=sample_size)
        plans["unet"] = (partial(model_class("UNet2DConditionModel").from_config, ucfg),
                         compvis.unet_from_compvis(parts["unet"], ucfg, strict=False),
                         lambda k: compvis.UNET_PREFIX + compvis.unet_compvis_name(k, ucfg))
    if "vae" in wanted and parts["vae"]:
        vcfg = dict(compvis.infer_vae_config(parts["vae"]), sample_size=8 * sample_size)
        levels = len(vcfg["block_out_channels"])
        plans["vae"] = (partial(model_class("AutoencoderKL").from_config, vcfg),
                        compvis.vae_from_compvis(parts["vae"], strict=False),
                        lambda k: compvis.VAE_PREFIX + compvis.vae_compvis_name(k, levels))
    if "text_encoder" in wanted and ("clip" in parts or "openclip" in parts):
        from transformers import CLIPTextConfig, CLIPTextModel

        sd, tcfg = compvis_text.text_encoder_from_compvis(parts, strict=False)
        if "openclip" in parts:
            notes.append("text_encoder: OpenCLIP ViT-H read at its penultimate layer (SD 2.x), as a "
                         f"{tcfg['num_hidden_layers']}-layer CLIPTextModel with gelu")
            file_name = None  # OpenCLIP fuses q/k/v in one tensor: no one-to-one file name to show
        else:
            file_name = _clip_file_name
        plans["text_encoder"] = (lambda: CLIPTextModel(CLIPTextConfig(**tcfg)), sd, file_name)
    return plans


def _clip_file_name(key):
    return compvis.CLIP_PREFIX + ("" if key.startswith("text_model.") else "text_model.") + key


def _align_text_model_prefix(module, sd):
    # transformers >= 5.6 flattened CLIPTextModel (no "text_model." level); the files keep it.
    if any(k.startswith("text_model.") for k in module.state_dict()):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _load_single_file(path, *, dtype, device, component, prediction_type, tokenizer):
    if component is not None and component not in (*_SINGLE_FILE_PARTS, "tokenizer", "scheduler"):
        raise ValueError(f"load: component must be one of {(*_SINGLE_FILE_PARTS, 'tokenizer', 'scheduler')} "
                         f"for a single file, got {component!r}")
    parts = compvis.split_checkpoint(read_state_dict(path))
    if any(k.startswith("conditioner.embedders.") for k in parts["unknown"]):
        raise NotImplementedError(f"{path}: an SDXL-family checkpoint (conditioner.embedders.*); diffkern "
                                  "loads Stable Diffusion 1.x / 2.x single files")
    if not (parts["unet"] or parts["vae"] or "clip" in parts or "openclip" in parts):
        raise CheckpointError(f"{path}: not a CompVis / Stability checkpoint: no model.diffusion_model., "
                              "first_stage_model. or cond_stage_model. keys (keys: "
                              f"{compvis._cap(parts['unknown'])})")
    proj_in = parts["unet"].get("middle_block.1.proj_in.weight")
    family = "2.x" if "openclip" in parts or (proj_in is not None and proj_in.ndim == 2) else "1.x"
    notes = [f"Stable Diffusion {family} checkpoint; prediction_type={prediction_type!r} (not stored in the "
             "weights: pass prediction_type='v_prediction' for SD 2.x 768-v models)"]
    if any(k.startswith("model_ema.") for k in parts["ignored"]):
        notes.append("the file also holds EMA weights (model_ema.*); the non-EMA model.diffusion_model.* "
                     "were loaded")
    wanted = _SINGLE_FILE_PARTS if component is None else [c for c in _SINGLE_FILE_PARTS if c == component]
    # 768-v is the one SD model trained at 768 pixels (96 latent pixels); a pipeline's default size only.
    sample_size = 96 if family == "2.x" and prediction_type == "v_prediction" else 64
    try:
        plans = _single_file_plans(parts, wanted, sample_size=sample_size, notes=notes)
    except CheckpointError as e:  # a tensor needed to infer a config is missing
        raise CheckpointError(f"{path}: {e}") from e
    except (KeyError, IndexError, ValueError, TypeError, ArithmeticError, AttributeError, RuntimeError) as e:
        # tensors of shapes no SD model has (a config inferred from them cannot be built)
        raise CheckpointError(f"{path}: the tensors do not describe a Stable Diffusion 1.x / 2.x model "
                              f"({type(e).__name__}: {e})") from e

    # Every problem of every part goes into one error, so one run shows all that is wrong.
    problems = []
    if parts["unknown"]:
        problems.append(f"{len(parts['unknown'])} unexpected keys outside the three models: "
                        f"{compvis._cap(parts['unknown'])}")
    for name in wanted:
        if name not in plans:
            problems.append(f"{name}: the file holds no {_PART_PREFIXES[name]}* keys")
    modules = {}
    for name, (factory, sd, file_name) in plans.items():
        modules[name] = on_meta(factory, f"{path}: {name}")
        if name == "text_encoder":
            sd = _align_text_model_prefix(modules[name], sd)
            plans[name] = (factory, sd, file_name)
        problems += key_problems(modules[name], sd, name, file_name)
    if "unet" in modules and "text_encoder" in modules:
        context = modules["unet"].config["cross_attention_dim"]
        width = modules["text_encoder"].config.hidden_size
        if context != width:
            problems.append(f"unet: cross_attention_dim {context} differs from the text encoder's width "
                            f"{width}")
    if problems:
        raise CheckpointError(f"{path}: the checkpoint does not fit the models inferred from it:\n  "
                              + "\n  ".join(problems))
    built = {name: materialize(modules[name], factory, sd, dtype=dtype, device=device)
             for name, (factory, sd, _) in plans.items()}

    if isinstance(tokenizer, (str, os.PathLike)):
        from diffkern.models import text_encoders

        tokenizer = text_encoders.load_tokenizer(str(tokenizer))
    elif tokenizer is None and component in (None, "tokenizer"):
        notes.append("tokenizer: None; single files carry no tokenizer: pass tokenizer=<folder> (SD 1.x: "
                     "openai/clip-vit-large-patch14, SD 2.x: the 2.x repo's tokenizer/ folder)")
    scheduler = _scheduler_for(parts["ignored"], prediction_type, notes)
    if component is not None:
        return {"tokenizer": tokenizer, "scheduler": scheduler}.get(component, built.get(component))
    index = {"_class_name": "StableDiffusionPipeline", "_source": "CompVis single file", "family": family}
    return LoadedPipeline(unet=built.get("unet"), vae=built.get("vae"),
                          text_encoder=built.get("text_encoder"), tokenizer=tokenizer,
                          scheduler_config=scheduler, model_index=index, prediction_type=prediction_type,
                          source=path, components=dict(built, tokenizer=tokenizer), notes=notes)
