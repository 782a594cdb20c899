"""`diffkern generate --model sdxl`: Stable Diffusion XL (--sdxl), a family of diffkern.cli.

    diffkern generate --sdxl ./stable-diffusion-xl-base-1.0 --prompt "a lighthouse at dusk" --output lh.png
    diffkern generate --sdxl ./sdxl-base --refiner ./sdxl-refiner --high-noise-frac 0.8 --prompt "..."
    diffkern generate --sdxl ./sdxl-base --sdxl-init-image photo.png --sdxl-strength 0.5 --prompt "oil"
    diffkern generate --sdxl ./sdxl-base --sdxl-init-image photo.png --mask-image mask.png --prompt "a cat"

The pipelines are diffkern.pipelines.StableDiffusionXL{,Img2Img,Inpaint}Pipeline (diffusers' own __call__
on diffkern's UNet, VAE and scheduler). With --refiner the base denoises the first --high-noise-frac of the
schedule and hands its latents to the refiner (denoising_end / denoising_start), sharing the second text
encoder and the VAE.
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

NAME = "Stable Diffusion XL"
SELECT = "--sdxl"
SHARED = ("negative_prompt", "steps", "height", "width")
DEFAULTS = {"steps": 50, "guidance": 5.0, "strength": 0.3, "high_noise_frac": 0.8}

WHERE_TO_PUT_WEIGHTS = """\
diffkern downloads nothing: put an SDXL diffusers folder (the one holding model_index.json) on this machine,
e.g. `huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0 --local-dir ./sdxl-base` (and
stabilityai/stable-diffusion-xl-refiner-1.0 for --refiner), then pass it to --sdxl.
Example: diffkern generate --sdxl ./sdxl-base --prompt "a lighthouse at dusk" --output lighthouse.png"""


def add_arguments(group):
    """SDXL's own options (every default None: a given one is noticed by the other families)."""
    group.add_argument("--sdxl", help="SDXL diffusers folder (base, refiner or inpainting)")
    group.add_argument("--refiner", default=None, help="SDXL refiner folder: the base hands its latents over")
    group.add_argument("--high-noise-frac", type=float, default=None,
                       help="--refiner: the share of the schedule the base runs (default 0.8)")
    group.add_argument("--prompt-2", default=None,
                       help="the second text encoder's prompt (default: --prompt)")
    group.add_argument("--sdxl-scheduler", default=None, metavar="NAME",
                       help="sampler: a short name or diffusers class name (default: the folder's)")
    group.add_argument("--mask-image", default=None,
                       help="with --sdxl-init-image: inpaint where the mask is white")
    group.add_argument("--sdxl-init-image", dest="sdxl_init_image", default=None,
                       help="image file: image-to-image (or inpainting with --mask-image) from it")
    group.add_argument("--sdxl-strength", dest="sdxl_strength", type=float, default=None,
                       help="image-to-image / inpainting strength in [0, 1] (default 0.3; inpainting 0.99)")


def selected_by(args):
    """--model auto: SDXL when --sdxl is given."""
    return args.sdxl is not None


def _check(args):
    for option, path in (("--sdxl", args.sdxl), ("--refiner", args.refiner)):
        if option == "--sdxl" and not path:
            raise UsageError("no SDXL folder given (--sdxl PATH).\n" + WHERE_TO_PUT_WEIGHTS)
        if path is not None and not (Path(path) / "model_index.json").is_file():
            raise UsageError(f"{option}: {path} is not a diffusers pipeline folder (no model_index.json)\n"
                             + WHERE_TO_PUT_WEIGHTS)
    if not args.prompt:
        raise UsageError("--prompt: give the text to draw")
    for dest in ("height", "width"):
        value = getattr(args, dest)
        if value is not None and value % 8:
            raise UsageError(f"--{dest}: must be a multiple of 8 (the VAE downsamples by 8), got {value}")
    check_finite(args, "guidance", "sdxl_strength", "high_noise_frac")
    if args.sdxl_strength is not None and not 0.0 <= args.sdxl_strength <= 1.0:
        raise UsageError(f"--sdxl-strength: must be in [0, 1], got {args.sdxl_strength}")
    if not 0.0 < args.high_noise_frac < 1.0:
        raise UsageError(f"--high-noise-frac: must be in (0, 1), got {args.high_noise_frac}")
    if args.mask_image is not None and args.sdxl_init_image is None:
        raise UsageError("--mask-image: give the --sdxl-init-image to inpaint")
    if args.refiner is not None and args.sdxl_init_image is not None:
        raise UsageError("--refiner: goes with text-to-image, not --sdxl-init-image")
    for option, path in (("--sdxl-init-image", args.sdxl_init_image), ("--mask-image", args.mask_image)):
        if path is not None:
            check_image(path, option)
    if args.sdxl_scheduler is not None:
        from diffkern.schedulers import ALIASES, SCHEDULERS

        if args.sdxl_scheduler.lower() not in ALIASES and args.sdxl_scheduler not in SCHEDULERS:
            raise UsageError(f"--sdxl-scheduler: unknown scheduler {args.sdxl_scheduler!r}; choose a short "
                             f"name ({', '.join(sorted(ALIASES))}) or a class name "
                             f"({', '.join(sorted(SCHEDULERS))})")
    if args.backend is not None:
        check_backend(args.backend)


def _load(path, args, device, **kind):
    import torch

    from diffkern.pipelines import load_pipeline

    try:
        pipe = load_pipeline(path, dtype=getattr(torch, DTYPES[args.dtype]), device=device,
                             scheduler=args.sdxl_scheduler, **kind)
    except (OSError, ValueError, NotImplementedError) as e:
        raise UsageError(f"cannot load {path}: {e}") from e
    if not type(pipe).__name__.startswith("StableDiffusionXL"):
        raise UsageError(f"--sdxl: {path} is a {type(pipe).__name__} folder, not SDXL")
    pipe.set_progress_bar_config(disable=args.quiet)
    return pipe


def generate(args):
    """One prompt (--prompt, --output): the written paths."""
    import torch
    from PIL import Image

    fill_defaults(args, DEFAULTS)
    _check(args)
    paths = check_output(args.output, args.num_images)
    device = pick_device(args.device)
    kw = dict(prompt=args.prompt, prompt_2=args.prompt_2, negative_prompt=args.negative_prompt,
              num_inference_steps=args.steps, guidance_scale=args.guidance,
              num_images_per_prompt=args.num_images, generator=torch.Generator().manual_seed(args.seed))
    sizes = dict(height=args.height, width=args.width)
    with backend_context(args.backend):
        if args.sdxl_init_image is not None:
            image = Image.open(args.sdxl_init_image).convert("RGB")
            inpaint = args.mask_image is not None
            pipe = _load(args.sdxl, args, device, img2img=not inpaint, inpaint=inpaint)
            strength = args.sdxl_strength if args.sdxl_strength is not None else (0.99 if inpaint else 0.3)
            extra = dict(image=image, strength=strength)
            if inpaint:
                extra.update(mask_image=Image.open(args.mask_image).convert("L"), **sizes)
            return write_images(_run(pipe, **kw, **extra).images, paths)
        base = _load(args.sdxl, args, device)
        if args.refiner is None:
            return write_images(_run(base, **kw, **sizes).images, paths)
        from diffkern.pipelines import StableDiffusionXLImg2ImgPipeline

        try:
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                args.refiner, text_encoder_2=base.text_encoder_2, vae=base.vae,
                torch_dtype=getattr(torch, DTYPES[args.dtype])).to(device)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load --refiner {args.refiner}: {e}") from e
        refiner.set_progress_bar_config(disable=args.quiet)
        latents = _run(base, **kw, **sizes, denoising_end=args.high_noise_frac, output_type="latent").images
        kw["generator"] = torch.Generator().manual_seed(args.seed)
        images = _run(refiner, **kw, image=latents, denoising_start=args.high_noise_frac).images
        return write_images(images, paths)


def _run(pipe, **kw):
    try:
        return pipe(**kw)
    except ValueError as e:  # argument problems diffusers' checks found (sizes, strength, ...)
        raise UsageError(str(e)) from e


def make_runner(args, device):
    """--prompts files are not served for SDXL yet (diffkern.distributed has no SDXL runner)."""
    raise UsageError("--prompts: SDXL takes one --prompt for now (diffkern.distributed has no SDXL runner)")
