"""What every `diffkern generate` family module shares: the usage error and small helpers.

The family modules (diffkern.cli_sd, diffkern.cli_glide, ...) import from here, never from
diffkern.cli: cli.py imports the families, so the helpers live below both (no import circle).
"""

from __future__ import annotations

import contextlib
import os
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


def _nearest_existing(path):
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(folder, option):
    """UsageError unless `folder` is (or can be made as) a folder this process can write into; makes nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option}: {folder} exists and is not a folder")
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise UsageError(f"{option}: {folder} cannot be made: {base} is a file, not a folder")
    import tempfile

    try:  # a real probe: permission bits say nothing to root or about read-only mounts
        fd, probe = tempfile.mkstemp(dir=base, prefix=".diffkern-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{option}: cannot write in {base} ({e.strerror or e})") from None


def check_output(output, n=1):
    """The paths of output_paths(output, n), after checking they can be written (before any model is loaded)."""
    paths = output_paths(output, n)
    for path in paths:
        if path.is_dir():
            raise UsageError(f"--output: {path} is a folder; give an image file name (e.g. {path / 'out.png'})")
    check_writable_dir(paths[0].parent, "--output")
    for path in paths:
        if path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"--output: {path} exists and is not writable")
    return paths


def check_image(path, option):
    """UsageError unless `path` is an image file PIL can read (checked before any model is loaded)."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UsageError(f"{option}: no such file: {path}")
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UsageError(f"{option}: {path} is not a readable image ({e})") from None


def check_positive(args, *dests, minimum=1):
    """UsageError naming the option for each given (not None) int option below `minimum`."""
    for dest in dests:
        value = getattr(args, dest, None)
        if value is not None and value < minimum:
            raise UsageError(f"{flag(dest)}: must be at least {minimum}, got {value}")


def check_finite(args, *dests):
    """UsageError naming the option for a given float option that is NaN or infinite."""
    import math

    for dest in dests:
        value = getattr(args, dest, None)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag(dest)}: must be a finite number, got {value}")


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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        except (OSError, ValueError) as e:  # the disk filled, the folder went away, ...: one line, not a traceback
            raise UsageError(f"--output: cannot write {path} ({e})") from None
        print(f"wrote {path}")
    return paths


def backend_context(backend):
    """diffkern.use_backend(backend), or nothing without one."""
    import diffkern

    return diffkern.use_backend(backend) if backend else contextlib.nullcontext()
