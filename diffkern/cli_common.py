"""What every `diffkern generate` family module shares: the usage error and small helpers.

The family modules (diffkern.cli_sd, diffkern.cli_glide, ...) import from here, never from
diffkern.cli: cli.py imports the families, so the helpers live below both (no import circle).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class UsageError(Exception):
    """A problem with the command line or its files: printed as one message, exit status 2."""


def flag(dest):
    """The command-line spelling of an argparse dest (num_images -> --num-images)."""
    return "--" + dest.replace("_", "-")


def fill_defaults(args, defaults):
    """Set each option the user left at None to the family's default (None marks "not given", so that
    --model auto can tell which family's options were passed)."""
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def output_paths(output, n):
    """The files to write: `output`, or NAME-0.EXT ... for n > 1 (UsageError without an image suffix)."""
    from PIL import Image

    path = Path(output)
    if path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--output: {output!r} needs an image extension PIL can write (.png, .jpg, ...)")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def check_backend(name):
    """UsageError unless `name` is a backend some diffkern op has."""
    from diffkern import _dispatch  # importing diffkern registers the ops

    known = sorted({b for op in _dispatch.registered_ops() for b in _dispatch.op_family(op).backends})
    if name not in known:
        raise UsageError(f"--backend: unknown backend {name!r}; choose from {', '.join(known)}")


def pick_device(requested):
    """--device, else cuda when torch sees one; UsageError for cuda without one."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return device


def write_images(images, paths):
    """Save PIL images to their paths (folders made), saying each."""
    for image, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"wrote {path}")
    return paths


def backend_context(backend):
    """diffkern.use_backend(backend), or nothing without one."""
    import diffkern

    return diffkern.use_backend(backend) if backend else contextlib.nullcontext()
