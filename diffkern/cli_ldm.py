"""`diffkern generate --model ldm`: the Latent Diffusion release (--ldm), a family of diffkern.cli.

    diffkern generate --ldm ./ldm-celebahq-256 --num-images 4 --output face.png          # unconditional
    diffkern generate --ldm ./ldm-super-resolution-4x-openimages --low-res small.png --output big.png
    diffkern generate --ldm models/ldm/cin256-v2/model.ckpt \\
        --ldm-config configs/latent-diffusion/cin256-v2.yaml --class-label 88 --guidance 3.0 --steps 20 \\
        --output macaw.png                                                          # class-conditional
    diffkern generate --ldm ./ldm-inpainting --ldm-image photo.png --ldm-mask mask.png --output filled.png
    diffkern generate --ldm models/ldm/text2img-large/model.ckpt --ldm-config txt2img-1p4B-eval.yaml \\
        --tokenizer ./bert-base-uncased --prompt "a virus monster playing guitar"

--ldm takes a diffusers folder (model_index.json: LDMPipeline, LDMSuperResolutionPipeline, or diffkern's
LDMClassConditionalPipeline / LDMInpaintPipeline) or an original CompVis model.ckpt with its --ldm-config
(diffkern.models.checkpoints.latent_diffusion: cin256 and the text-to-image model). The diffusers
text-to-image folder (ldm-text2im-large-256) runs under --checkpoint (the sd family).
"""

from __future__ import annotations

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

NAME = "Latent Diffusion"
SELECT = "--ldm"
SHARED = ("steps",)
DEFAULTS = {"steps": 50, "ldm_eta": 0.0}

WHERE_TO_PUT_WEIGHTS = """\
diffkern downloads nothing: put the weights on this machine, then pass them to --ldm. Either
  - a diffusers folder (the one holding model_index.json), e.g. CompVis/ldm-celebahq-256 or
    CompVis/ldm-super-resolution-4x-openimages (`huggingface-cli download ... --local-dir ./folder`), or
  - an original CompVis release file (models/ldm/<name>/model.ckpt) with --ldm-config <its .yaml>.
Example: diffkern generate --ldm ./ldm-celebahq-256 --steps 50 --output face.png"""


def add_arguments(group):
    """LDM's own options (every default None: a given one is noticed by the other families)."""
    group.add_argument("--ldm", help="LDM diffusers folder, or a CompVis model.ckpt (with --ldm-config)")
    group.add_argument("--ldm-config", default=None, help="the CompVis .yaml of a --ldm model.ckpt")
    group.add_argument("--class-label", type=int, nargs="+", default=None, metavar="N",
                       help="class-conditional model: ImageNet class index(es), one image each")
    group.add_argument("--low-res", default=None, help="super-resolution model: the image to upscale 4x")
    group.add_argument("--ldm-image", default=None, help="inpainting model: the image to fill")
    group.add_argument("--ldm-mask", default=None, help="inpainting model: the mask (white = fill)")
    group.add_argument("--ldm-eta", type=float, default=None, help="DDIM eta (default 0)")


def selected_by(args):
    """--model auto: LDM when --ldm is given."""
    return args.ldm is not None


def _check(args):
    if not args.ldm:
        raise UsageError("no LDM weights given (--ldm PATH).\n" + WHERE_TO_PUT_WEIGHTS)
    path = Path(args.ldm)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"--ldm: {path} is not a diffusers pipeline folder (no model_index.json)\n"
                             + WHERE_TO_PUT_WEIGHTS)
        if args.ldm_config is not None:
            raise UsageError("--ldm-config: goes with a CompVis model.ckpt, not a diffusers folder")
    elif path.is_file():
        if args.ldm_config is None or not Path(args.ldm_config).is_file():
            raise UsageError(f"--ldm-config: a CompVis checkpoint needs its .yaml config (got "
                             f"{args.ldm_config})")
    else:
        raise UsageError(f"--ldm: not found: {path}\n" + WHERE_TO_PUT_WEIGHTS)
    check_finite(args, "guidance", "ldm_eta")
    if args.ldm_eta < 0:
        raise UsageError(f"--ldm-eta: must be >= 0, got {args.ldm_eta}")
    if (args.ldm_image is None) != (args.ldm_mask is None):
        raise UsageError("--ldm-image, --ldm-mask: inpainting takes both")
    images = (("--low-res", args.low_res), ("--ldm-image", args.ldm_image), ("--ldm-mask", args.ldm_mask))
    for option, image in images:
        if image is not None:
            check_image(image, option)
    if args.backend is not None:
        check_backend(args.backend)


def _load(args, device):
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    try:
        if Path(args.ldm).is_dir():
            from diffkern.pipelines import load_pipeline

            pipe = load_pipeline(args.ldm, dtype=dtype, device=device)
        else:
            from diffkern.models.checkpoints.latent_diffusion import load_latent_diffusion

            pipe = load_latent_diffusion(args.ldm, args.ldm_config, dtype=dtype, device=device,
                                         tokenizer=args.tokenizer)
    except (OSError, ValueError, NotImplementedError) as e:  # CheckpointError is a ValueError
        raise UsageError(f"cannot load --ldm {args.ldm}: {e}") from e
    return pipe


# pipeline class -> (the options it needs, the ones it refuses)
_INPUTS = {
    "LDMPipeline": ((), ("class_label", "low_res", "ldm_image", "prompt")),
    "LDMSuperResolutionPipeline": (("low_res",), ("class_label", "ldm_image", "prompt")),
    "LDMClassConditionalPipeline": (("class_label",), ("low_res", "ldm_image", "prompt")),
    "LDMInpaintPipeline": (("ldm_image",), ("class_label", "low_res", "prompt")),
    "LDMTextToImagePipeline": (("prompt",), ("class_label", "low_res", "ldm_image")),
}


def generate(args):
    """One run (--output): the written paths."""
    import torch
    from PIL import Image

    fill_defaults(args, DEFAULTS)
    _check(args)
    n = len(args.class_label) * args.num_images if args.class_label else args.num_images
    paths = check_output(args.output, n)
    pipe = _load(args, pick_device(args.device))
    kind = type(pipe).__name__
    if kind not in _INPUTS:
        raise UsageError(f"--ldm: {args.ldm} is a {kind}; run it with its own family (see `diffkern "
                         "generate -h`)")
    needs, refuses = _INPUTS[kind]
    for dest in needs:
        if getattr(args, dest) is None:
            raise UsageError(f"--{dest.replace('_', '-')}: the {kind} needs it")
    for dest in refuses:
        if getattr(args, dest) is not None:
            raise UsageError(f"--{dest.replace('_', '-')}: not an input of the {kind}")
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # diffusers' LDM pipelines draw DDIM eta > 0 noise from the global RNG
    common = dict(num_inference_steps=args.steps, eta=args.ldm_eta, generator=generator)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=args.quiet)
    with backend_context(args.backend):
        try:
            if kind == "LDMPipeline":
                images = pipe(batch_size=args.num_images, **common).images
            elif kind == "LDMSuperResolutionPipeline":
                low = Image.open(args.low_res).convert("RGB")
                images = [im for _ in range(args.num_images) for im in pipe(low, **common).images]
            elif kind == "LDMClassConditionalPipeline":
                guidance = 1.0 if args.guidance is None else args.guidance
                images = pipe(args.class_label, guidance_scale=guidance, num_images_per_label=args.num_images,
                              **common).images
            elif kind == "LDMInpaintPipeline":
                image = Image.open(args.ldm_image).convert("RGB")
                mask = Image.open(args.ldm_mask).convert("L")
                images = [im for _ in range(args.num_images) for im in pipe(image, mask, **common).images]
            else:
                images = pipe(args.prompt, guidance_scale=1.0 if args.guidance is None else args.guidance,
                              num_images_per_prompt=args.num_images, progress=not args.quiet, **common).images
        except ValueError as e:
            raise UsageError(str(e)) from e
    return write_images(images, paths)


def make_runner(args, device):
    """--prompts files are not served for the LDM release (its models mostly take no prompt)."""
    raise UsageError("--prompts: the LDM family takes one run per command (--output)")
