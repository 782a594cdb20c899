"""`diffkern generate` for Stable Diffusion 1.x / 2.x and LDM text2im (--checkpoint): a family of diffkern.cli.

    diffkern generate --checkpoint ./stable-diffusion-v1-5 --prompt "a red fox in the snow" --output fox.png
    diffkern generate --checkpoint ./sd15 --prompt "oil painting" --init-image photo.png --strength 0.6
    diffkern generate --checkpoint ./sd15 --prompts prompts.jsonl --outdir out/ --batch-size 4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffkern.cli_common import (
    DTYPES,
    UsageError,
    backend_context,
    check_backend,
    check_finite,
    check_image,
    check_output,
    fill_defaults,
    pick_device,
    write_images,
)

NAME = "Stable Diffusion / LDM"
SELECT = "--checkpoint"
# cli.py's shared sampling options this family takes
SHARED = ("negative_prompt", "steps", "height", "width")
# scheduler None: the one the checkpoint folder names (PNDM for SD 1.5), as diffusers runs it
DEFAULTS = {"steps": 50, "guidance": 7.5, "eta": 0.0, "strength": 0.8}
# --prompts: the per-line keys SDRunner takes (checked with check_line before the model is loaded)
LINE_KEYS = ("steps", "guidance", "height", "width", "negative_prompt")

WHERE_TO_PUT_WEIGHTS = """\
diffkern downloads nothing: put the weights on this machine, then pass their path to --checkpoint.
Either
  - a diffusers pipeline folder (the one holding model_index.json), e.g. a download of
    runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 or CompVis/ldm-text2im-large-256
    (for instance `huggingface-cli download runwayml/stable-diffusion-v1-5 --local-dir ./sd15`), or
  - a single Stable Diffusion 1.x / 2.x file (.ckpt or .safetensors, e.g. v1-5-pruned-emaonly.safetensors);
    single files carry no tokenizer: add --tokenizer with a CLIP tokenizer folder (vocab.json + merges.txt).
Example: diffkern generate --checkpoint ./sd15 --prompt "a red fox in the snow" --output fox.png
(GLIDE takes --base base.pt instead of --checkpoint: see `diffkern generate --help`.)"""


def add_arguments(group):
    """SD / LDM's own options (every default None: a given one is noticed by the other families)."""
    group.add_argument("--checkpoint", help="diffusers pipeline folder, or a single .ckpt / .safetensors file")
    group.add_argument("--scheduler", type=_scheduler_name, default=None, metavar="NAME",
                       help="sampler: a short name (" + ", ".join(_scheduler_aliases()) + ") or a diffusers "
                       "class name (EulerDiscreteScheduler, ...); default: the one the checkpoint folder names")
    group.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0: deterministic)")
    group.add_argument("--init-image", default=None, help="image file: run image-to-image from it")
    group.add_argument("--strength", type=float, default=None,
                       help="image-to-image strength in [0, 1] (default 0.8)")
    group.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                       help="override the checkpoint's (single SD 2.x 768-v files need v_prediction)")


def _scheduler_aliases():
    from diffkern.schedulers import ALIASES

    return sorted(ALIASES)


def _scheduler_name(name):
    """argparse type of --scheduler: an alias of diffkern.schedulers.ALIASES or a SCHEDULERS class name."""
    import argparse

    from diffkern.schedulers import ALIASES, SCHEDULERS

    if name.lower() in ALIASES or name in SCHEDULERS:
        return name
    raise argparse.ArgumentTypeError(f"unknown scheduler {name!r}: choose a short name ({', '.join(sorted(ALIASES))}) "
                                     f"or a class name ({', '.join(sorted(SCHEDULERS))})")


def selected_by(args):
    """--model auto: SD when --checkpoint is given (it is also the default family)."""
    return args.checkpoint is not None


def _check(args, batch):
    if not args.checkpoint:
        raise UsageError("no checkpoint given (--checkpoint PATH).\n" + WHERE_TO_PUT_WEIGHTS)
    if not Path(args.checkpoint).exists():
        raise UsageError(f"checkpoint not found: {args.checkpoint}\n" + WHERE_TO_PUT_WEIGHTS)
    other = _other_family(args.checkpoint)
    if other:
        raise UsageError(f"--checkpoint {args.checkpoint}: {other}")
    if not batch and not args.prompt:
        raise UsageError("--prompt: give the text to draw")
    if args.steps < 1 or args.num_images < 1:
        raise UsageError("--steps and --num-images must be positive")
    for dest in ("height", "width"):
        problem = _size_problem(dest, getattr(args, dest))
        if problem:
            raise UsageError(f"--{problem}")
    check_finite(args, "guidance", "eta", "strength")
    if not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength: must be in [0, 1], got {args.strength}")
    if args.eta < 0:
        raise UsageError(f"--eta: must be >= 0, got {args.eta}")
    if args.init_image is not None:
        if batch:
            raise UsageError("--init-image: image-to-image takes one --prompt, not --prompts")
        check_image(args.init_image, "--init-image")
    if args.backend is not None:
        check_backend(args.backend)


# folders whose pipeline has its own family option (their runners take other arguments than SD's)
_OTHER_FAMILIES = {"StableDiffusionXL": "--sdxl", "LDMPipeline": "--ldm", "LDMSuperResolutionPipeline": "--ldm"}


def _other_family(checkpoint):
    """A message when `checkpoint` is a diffusers folder of the SDXL or LDM families (None otherwise)."""
    index = Path(checkpoint) / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return None  # not a readable folder index: the loader says what is wrong with it
    for prefix, option in _OTHER_FAMILIES.items():
        if isinstance(name, str) and name.startswith(prefix):
            return f"a {name} folder: use `diffkern generate {option} {checkpoint}`"
    return None


def _size_problem(key, value):
    """What is wrong with a height / width (None: nothing): SD's UNet and VAE need multiples of 8."""
    if value is not None and (value < 8 or value % 8):
        return f"{key}: must be a positive multiple of 8 (the VAE downsamples by 8), got {value}"
    return None


def check_line(spec, args):
    """A --prompts line's values this family refuses (before the model is loaded): sizes not a multiple of 8."""
    for key in ("height", "width"):
        problem = _size_problem(key, spec.get(key))
        if problem:
            return f'"{problem.split(":")[0]}"' + problem[len(key):]
    return None


def _load(args, device, img2img=False):
    import torch

    from diffkern.pipelines import load_pipeline

    load_kwargs = {k: v for k, v in (("tokenizer", args.tokenizer), ("prediction_type", args.prediction_type))
                   if v is not None}
    try:
        pipe = load_pipeline(args.checkpoint, dtype=getattr(torch, DTYPES[args.dtype]), device=device,
                             scheduler=args.scheduler, img2img=img2img, **load_kwargs)
    except (OSError, ValueError, NotImplementedError) as e:  # file and format problems, said by the loader
        raise UsageError(f"cannot load checkpoint {args.checkpoint}: {e}") from e
    for note in getattr(pipe, "notes", []):
        print(f"note: {note}", file=sys.stderr)
    return pipe


def generate(args):
    """One prompt (--prompt, --output): the written paths."""
    import torch

    fill_defaults(args, DEFAULTS)
    _check(args, batch=False)
    paths = check_output(args.output, args.num_images)
    pipe = _load(args, pick_device(args.device), img2img=args.init_image is not None)
    kw = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
              guidance_scale=args.guidance, num_images_per_prompt=args.num_images, height=args.height,
              width=args.width, generator=torch.Generator().manual_seed(args.seed), eta=args.eta,
              output_type="pil", progress=not args.quiet)
    if args.init_image is not None:
        from PIL import Image

        inputs = (args.prompt, Image.open(args.init_image).convert("RGB"))
        kw["strength"] = args.strength
    else:
        inputs = (args.prompt,)
    try:
        with backend_context(args.backend):
            images = pipe(*inputs, **kw).images
    except ValueError as e:  # argument problems the pipeline found (sizes, strength, ...)
        raise UsageError(str(e)) from e
    return write_images(images, paths)


def make_runner(args, device):
    """A prompt file (--prompts, --outdir): the diffkern.distributed runner of the loaded pipeline."""
    from diffkern.distributed import SDRunner

    fill_defaults(args, DEFAULTS)
    _check(args, batch=True)
    if args.strength is not None and args.strength != DEFAULTS["strength"]:
        raise UsageError("--strength: image-to-image takes one --prompt, not --prompts")
    pipe = _load(args, device)
    return SDRunner(pipe, model=Path(args.checkpoint).name, scheduler=args.scheduler, steps=args.steps,
                    guidance=args.guidance, height=args.height, width=args.width,
                    negative_prompt=args.negative_prompt, extra={"eta": args.eta})
