"""Reading weight files and building modules from state dicts, safely (used by diffkern.models.loading
and the GLIDE pipeline).

Safety: safetensors files are read with safetensors; pickles only with torch.load(weights_only=True),
which refuses any object but tensors and plain containers. A file that cannot be read is one
CheckpointError naming it; keys that do not fit a module are listed all at once (key_problems).
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path

import torch

from diffkern.models import compvis
from diffkern.models.compvis import CheckpointError

# diffusers model class name -> (module, class) of ours with the same config keys and state dict.
MODEL_CLASSES = {
    "UNet2DConditionModel": ("diffkern.models.unet_2d_condition", "UNet2DConditionModel"),
    "AutoencoderKL": ("diffkern.models.autoencoder_kl", "AutoencoderKL"),
    "UNet2DModel": ("diffkern.models.unet_2d", "UNet2DModel"),
    "PriorTransformer": ("diffkern.models.unclip.prior", "PriorTransformer"),
    "UnCLIPTextProjModel": ("diffkern.models.unclip.text_proj", "UnCLIPTextProjModel"),
}
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Classes that Lightning training checkpoints pickle (as dict keys of their callback state). They are
# unpickled as inert stand-ins so weights_only=True can read the file; nothing of theirs is used.
_TRAINING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)


class _InertTrainingObject:
    def __setstate__(self, state):
        pass


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------

def read_state_dict(path):
    """{name: tensor} of a .safetensors or (weights_only) pickle file, unwrapped from "state_dict".

    Raises FileNotFoundError for a missing path and CheckpointError naming the file for anything
    that cannot be read as tensors (corrupt or truncated files included).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_state_dict: no such file: {path}")
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint extension {suffix!r} "
                              f"(expected .safetensors or one of {_PICKLE_SUFFIXES})")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            stand_ins = [(_InertTrainingObject, name) for name in _TRAINING_GLOBALS]
            with torch.serialization.safe_globals(stand_ins):
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure on a bad file is the file's problem, said with its name
        hint = ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            hint = (" diffkern reads pickles with weights_only=True only (a pickle can run code); the file "
                    "pickles other objects: convert it to .safetensors with a tool you trust.")
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: "
                              f"{first_line(e)}).{hint}") from e
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a dict of tensors")
    # Training metadata (step counters, strings) can sit beside the tensors; only tensors are weights.
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {compvis._cap(map(str, sd))})")
    return tensors


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read the JSON file ({type(e).__name__}: "
                              f"{first_line(e)})") from e


def read_json_object(path):
    """read_json of a file that must hold a JSON object (config.json, model_index.json, ...): CheckpointError
    naming the file when it holds a list, a string or a number instead."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({{...}}), got a {type(value).__name__}")
    return value


@contextlib.contextmanager
def reading(where):
    """Around a third-party reader (transformers' from_pretrained, a tokenizer, safetensors): whatever it raises
    on a bad file becomes one CheckpointError naming `where` (missing files stay FileNotFoundError,
    unsupported classes NotImplementedError)."""
    try:
        yield
    except (CheckpointError, FileNotFoundError, NotImplementedError):
        raise
    except Exception as e:  # a reader's error on a bad file is the file's problem, said with its name
        hint = ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            hint = " (pickles are read with weights_only=True: convert the file to .safetensors with a tool you trust)"
        raise CheckpointError(f"{where}: cannot load it ({type(e).__name__}: {first_line(e)}){hint}") from e


def plain_name(name, where):
    """A component / shard file name inside its folder: no path separators, no '..' (CheckpointError)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or Path(name).name != name:
        raise CheckpointError(f"{where}: {name!r} is not a plain name inside the folder")
    return name


def first_line(error):
    text = str(error).strip().splitlines()
    return text[0][:300] if text else "no message"


def folder_weights(folder, stem, variant):
    """Read `stem[.variant].safetensors` (or .bin, or a sharded index) from a diffusers folder."""
    tag = f".{variant}" if variant else ""
    for suffix in (".safetensors", ".bin"):
        single = folder / f"{stem}{tag}{suffix}"
        if single.is_file():
            return read_state_dict(single)
        index = folder / f"{stem}{suffix}.index{tag}.json"
        if index.is_file():
            return _sharded(folder, index)
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"{folder}: no {stem}{tag}.safetensors or {stem}{tag}.bin (variant={variant!r}); "
                            f"files there: {present}")


def _sharded(folder, index):
    """The tensors of a sharded checkpoint: every shard its index names (a {"weight_map": {tensor: shard}}
    object), each read once; CheckpointError naming the index for a malformed map, a missing shard, or a
    tensor the map promises that its shard does not hold."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected a non-empty \"weight_map\" object {{tensor name: shard file}}, got "
                              f"{type(weight_map).__name__ if weight_map is not None else 'none'}")
    bad = [f"{k!r}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"{index}: weight_map values must be shard file names: {compvis._cap(bad)}")
    sd = {}
    for shard in sorted(set(weight_map.values())):
        plain_name(shard, f"{index}: weight_map shard")
        if not (folder / shard).is_file():
            raise CheckpointError(f"{index}: names the shard {shard}, which is not in {folder}")
        sd.update(read_state_dict(folder / shard))
    missing = sorted(k for k in weight_map if k not in sd)
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} tensors it maps are in none of the shards: "
                              f"{compvis._cap(missing)}")
    return sd


# ---------------------------------------------------------------------------------------------
# Building modules from state dicts
# ---------------------------------------------------------------------------------------------

def model_class(name):
    """Our class for a diffusers model class name (UNet2DConditionModel, AutoencoderKL)."""
    if name not in MODEL_CLASSES:
        raise NotImplementedError(f"model class {name!r} is not loadable by diffkern (supported: "
                                  f"{', '.join(MODEL_CLASSES)})")
    module, cls = MODEL_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def on_meta(factory, what):
    """Build a module without allocating its weights; config errors name `what`."""
    try:
        with torch.device("meta"):
            return factory()
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError, AttributeError, AssertionError) as e:
        # a config value the constructor cannot use (a zero head width, a wrong type, a missing entry ...)
        raise CheckpointError(f"{what}: its config is not supported by diffkern: {type(e).__name__}: "
                              f"{first_line(e)}") from e


def key_problems(module, sd, what, file_name=None):
    """Lines listing the missing, unexpected and mis-shaped keys of `sd` for `module` ([] if none).

    file_name(key) -> the key's name in the file, shown beside the module's name when they differ.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    def shown(k):
        other = k if file_name is None else file_name(k)
        return k if other == k else f"{k} (file: {other})"

    missing = [shown(k) for k in expected if k not in sd]
    unexpected = [shown(k) for k in sd if k not in expected]
    misshaped = [f"{shown(k)}: file {tuple(sd[k].shape)} vs model {expected[k]}"
                 for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    lines = []
    for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            lines.append(f"{what}: {len(keys)} {kind}: {compvis._cap(keys)}")
    return lines


def materialize(module, factory, sd, *, dtype, device):
    """Give a meta-built `module` the weights of `sd` (checked before), in `dtype` on `device`."""
    target = dtype or _float_dtype(sd) or torch.float32
    sd = {k: v.to(target) if v.is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    tensors = list(module.parameters()) + list(module.buffers())
    if any(t.is_meta for t in tensors):
        # A non-persistent buffer (e.g. CLIP's position ids) is computed at construction and in no
        # state dict: build for real then, paying one random initialisation.
        module = factory().to(target)
        module.load_state_dict(sd, strict=True)
    return module.to(device=device, dtype=target).eval()


def _float_dtype(sd):
    """The most common floating dtype among a state dict's tensors (None when it has none)."""
    counts = {}
    for value in sd.values():
        if torch.is_tensor(value) and value.is_floating_point():
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    return max(counts, key=counts.get) if counts else None
