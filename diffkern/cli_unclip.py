"""`diffkern generate --model unclip`: DALL-E 2 / Karlo (--karlo), a family of diffkern.cli.

    diffkern generate --karlo ./karlo-v1-alpha --prompt "a red frog on a green leaf" --output frog.png
    diffkern generate --karlo ./karlo-v1-alpha-image-variations --image frog.png --num-images 4 --output var.png
    diffkern generate --karlo ./karlo-v1-alpha-image-variations --interpolate a.png b.png --steps-between 3
    diffkern generate --karlo ./karlo-v1-alpha-image-variations --image cat.png --text-diff "a cat" "a dog"
    diffkern generate --karlo ./karlo-original-files --karlo-clip ./clip-vit-large-patch14 --prompt "..."

--image / --interpolate / --text-diff are the paper's manipulations (diffkern.pipelines.UnCLIPManipulations:
DDIM-inverted x_T, slerps); --variation-mode noise gives Karlo's / diffusers' white-noise variations instead.
"""

from __future__ import annotations

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
    output_paths,
    pick_device,
    write_images,
)

NAME = "unCLIP / Karlo"
SELECT = "--karlo"
SHARED = ()
# --prompts: the per-line keys UnCLIPRunner takes ("steps" = decoder steps)
LINE_KEYS = ("steps", "guidance")
DEFAULTS = {"guidance": 8.0, "prior_guidance": 4.0, "prior_steps": 25, "decoder_steps": 25, "super_res_steps": 7,
            "ddim_eta": 1.0, "steps_between": 3, "thetas": "0,0.25,0.5", "inversion_iterations": 3,
            "variation_mode": "inverted"}
ORIGINAL_FILES = ("prior-ckpt-step=01000000-of-01000000.ckpt", "decoder-ckpt-step=01000000-of-01000000.ckpt",
                  "improved-sr-ckpt-step=1.2M.ckpt", "ViT-L-14_stats.th")

WHERE_TO_PUT_WEIGHTS = f"""\
diffkern downloads nothing: put Karlo's weights on this machine, then pass their folder to --karlo. Either
  - the diffusers folder kakaobrain/karlo-v1-alpha (text-to-image; model_index.json: UnCLIPPipeline), or
    kakaobrain/karlo-v1-alpha-image-variations (for --image / --interpolate / --text-diff: it holds the CLIP
    image encoder), e.g. `huggingface-cli download kakaobrain/karlo-v1-alpha --local-dir ./karlo-v1-alpha`, or
  - a folder with Kakao Brain's original files {', '.join(ORIGINAL_FILES)}
    (github.com/kakaobrain/karlo), plus --karlo-clip with a local openai/clip-vit-large-patch14 folder.
Example: diffkern generate --karlo ./karlo-v1-alpha --prompt "a red frog on a green leaf" --output frog.png"""


def add_arguments(group):
    """unCLIP's own options (every default None: a given one is noticed by the other families)."""
    group.add_argument("--karlo", help="Karlo diffusers folder (karlo-v1-alpha or -image-variations) or a folder "
                       "with the original .ckpt files")
    group.add_argument("--karlo-clip", default=None, help="CLIP ViT-L/14 folder, for the original .ckpt files")
    group.add_argument("--image", default=None, help="image file: variations of it (with --text-diff: edit it)")
    group.add_argument("--interpolate", nargs=2, metavar=("A", "B"), default=None,
                       help="two image files: images along the slerp of their CLIP embeddings")
    group.add_argument("--steps-between", type=int, default=None, help="--interpolate: images between A and B "
                       "(default 3)")
    group.add_argument("--text-diff", nargs=2, metavar=("CURRENT", "TARGET"), default=None,
                       help="with --image: move its CLIP embedding from the CURRENT caption toward TARGET")
    group.add_argument("--thetas", default=None, help="--text-diff: comma-separated slerp amounts in [0, 1] "
                       "(default 0,0.25,0.5)")
    group.add_argument("--prior-steps", type=int, default=None, help="prior steps (default 25)")
    group.add_argument("--decoder-steps", type=int, default=None, help="decoder steps (default 25)")
    group.add_argument("--super-res-steps", type=int, default=None, help="super-resolution steps (default 7)")
    group.add_argument("--prior-guidance", type=float, default=None, help="prior guidance (default 4.0; "
                       "--guidance is the decoder's, default 8.0)")
    group.add_argument("--ddim-eta", type=float, default=None, help="--image: DDIM eta of the variations "
                       "(default 1.0; 0 reconstructs the image)")
    group.add_argument("--inversion-iterations", type=int, default=None,
                       help="fixed-point iterations per DDIM inversion step (default 3)")
    group.add_argument("--variation-mode", choices=["inverted", "noise"], default=None,
                       help="--image: from the inverted x_T (the paper, default) or from white noise (Karlo)")


def selected_by(args):
    """--model auto: unCLIP when --karlo is given."""
    return args.karlo is not None


def _mode(args):
    modes = [m for m, given in (("interpolate", args.interpolate), ("image", args.image)) if given is not None]
    if len(modes) > 1:
        raise UsageError("--image, --interpolate: give one of them")
    if args.text_diff is not None and args.image is None:
        raise UsageError("--text-diff: give the --image to edit")
    mode = "text_diff" if args.text_diff is not None else (modes[0] if modes else "text")
    if mode == "text" and not args.prompt:
        raise UsageError("--prompt: give the text to draw (or --image / --interpolate)")
    if mode != "text" and args.prompt:
        raise UsageError(f"--prompt: not used with --{mode.replace('_', '-')}")
    return mode


def _check(args, batch):
    if not args.karlo:
        raise UsageError("no Karlo weights given (--karlo PATH).\n" + WHERE_TO_PUT_WEIGHTS)
    if not Path(args.karlo).is_dir():
        raise UsageError(f"Karlo weights not found: {args.karlo}\n" + WHERE_TO_PUT_WEIGHTS)
    mode = "text" if batch else _mode(args)
    if args.num_images < 1:
        raise UsageError("--num-images: must be positive")
    for name in ("prior_steps", "decoder_steps", "super_res_steps"):
        if getattr(args, name) < 2:  # the unCLIP spacing divides by steps - 1
            raise UsageError(f"--{name.replace('_', '-')}: must be at least 2, got {getattr(args, name)}")
    for name in ("steps_between", "inversion_iterations"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(args, name)}")
    check_finite(args, "guidance", "prior_guidance", "ddim_eta")
    if args.ddim_eta < 0:
        raise UsageError(f"--ddim-eta: must be >= 0, got {args.ddim_eta}")
    if mode == "text_diff":
        _thetas(args)
    if args.image is not None:
        check_image(args.image, "--image")
    for path in args.interpolate or []:
        check_image(path, "--interpolate")
    if not batch:
        check_output(args.output)  # its name, folder and permissions, before anything is loaded
    if args.backend is not None:
        check_backend(args.backend)
    return mode


def _thetas(args):
    import math

    try:
        thetas = [float(t) for t in args.thetas.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--thetas: expected comma-separated numbers, got {args.thetas!r}") from None
    if not thetas or not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in thetas):
        raise UsageError(f"--thetas: expected comma-separated numbers in [0, 1], got {args.thetas!r}")
    return thetas


def check_line(spec, args):
    """A --prompts line's "steps" (decoder steps) must be at least 2 (checked before loading)."""
    steps = spec.get("steps")
    if isinstance(steps, int) and steps < 2:
        return f'"steps": must be at least 2 for unCLIP, got {steps}'
    return None


def _load(args, device, mode):
    import torch

    from diffkern.models.unclip.folders import unclip_pipeline_class
    from diffkern.pipelines import UnCLIPImageVariationPipeline, UnCLIPPipeline, load_karlo

    dtype = getattr(torch, DTYPES[args.dtype])
    folder = Path(args.karlo)
    kind = unclip_pipeline_class(folder)
    try:
        if kind is not None:
            want = "UnCLIPPipeline" if mode == "text" else "UnCLIPImageVariationPipeline"
            if kind != want:
                which = "karlo-v1-alpha" if want == "UnCLIPPipeline" else "karlo-v1-alpha-image-variations"
                raise UsageError(f"--karlo: {folder} is a {kind} folder; this mode needs {which} ({want})")
            cls = UnCLIPPipeline if kind == "UnCLIPPipeline" else UnCLIPImageVariationPipeline
            return cls.from_pretrained(folder, dtype=dtype, device=device)
        missing = [f for f in ORIGINAL_FILES if not (folder / f).is_file()]
        if missing:
            raise UsageError(f"--karlo: {folder} is neither a Karlo diffusers folder (model_index.json) nor holds "
                             f"the original files (missing: {', '.join(missing)}).\n" + WHERE_TO_PUT_WEIGHTS)
        if mode != "text":
            raise UsageError("--image / --interpolate / --text-diff need the CLIP image encoder: use the diffusers "
                             "folder karlo-v1-alpha-image-variations")
        if not args.karlo_clip or not Path(args.karlo_clip).is_dir():
            raise UsageError("--karlo-clip: the original files need a local openai/clip-vit-large-patch14 folder")
        return load_karlo(*(folder / f for f in ORIGINAL_FILES), clip=args.karlo_clip, dtype=dtype, device=device)
    except (OSError, ValueError, NotImplementedError) as e:
        raise UsageError(f"cannot load Karlo from {folder}: {e}") from e


def _images_of(pipe, args, mode, generator):
    from PIL import Image

    from diffkern.pipelines import UnCLIPManipulations

    steps = dict(super_res_num_inference_steps=args.super_res_steps)
    if mode == "text":
        return pipe(args.prompt, num_images_per_prompt=args.num_images, prior_num_inference_steps=args.prior_steps,
                    decoder_num_inference_steps=args.decoder_steps, generator=generator,
                    prior_guidance_scale=args.prior_guidance, decoder_guidance_scale=args.guidance, **steps).images
    if mode == "image" and args.variation_mode == "noise":
        return pipe(Image.open(args.image).convert("RGB"), num_images_per_prompt=args.num_images,
                    decoder_num_inference_steps=args.decoder_steps, generator=generator,
                    decoder_guidance_scale=args.guidance, **steps).images
    m = UnCLIPManipulations(pipe, num_inference_steps=args.decoder_steps, guidance_scale=args.guidance,
                            fixed_point_iterations=args.inversion_iterations)
    if mode == "image":
        return m.variations(Image.open(args.image).convert("RGB"), num_variations=args.num_images, eta=args.ddim_eta,
                            generator=generator, **steps).images
    if mode == "interpolate":
        a, b = (Image.open(p).convert("RGB") for p in args.interpolate)
        return m.interpolate(a, b, steps_between=args.steps_between, generator=generator, **steps).images
    thetas = _thetas(args)
    return m.text_diff(Image.open(args.image).convert("RGB"), *args.text_diff, thetas=thetas, generator=generator,
                       **steps).images


def generate(args):
    """One --prompt (or --image / --interpolate / --text-diff) to --output: the written paths."""
    import torch

    fill_defaults(args, DEFAULTS)
    mode = _check(args, batch=False)
    pipe = _load(args, pick_device(args.device), mode)
    try:
        with backend_context(args.backend):
            images = _images_of(pipe, args, mode, torch.Generator().manual_seed(args.seed))
    except ValueError as e:  # argument problems the pipeline found (thetas, image modes, ...)
        raise UsageError(str(e)) from e
    return write_images(images, output_paths(args.output, len(images)))


class UnCLIPRunner:
    """--prompts mode: text-to-image batches (steps = decoder steps, guidance = decoder guidance)."""

    accepts = ("steps", "guidance")

    def __init__(self, pipe, args):
        import diffkern

        self.pipe, self.args = pipe, args
        self.defaults = {"steps": args.decoder_steps, "guidance": args.guidance}
        self.metadata = {"model": Path(args.karlo).name, "scheduler": type(pipe.decoder_scheduler).__name__,
                         "diffkern_version": diffkern.__version__}

    def __call__(self, jobs, generators):
        s, a = jobs[0].settings, self.args
        return self.pipe([j.prompt for j in jobs], prior_num_inference_steps=a.prior_steps,
                         decoder_num_inference_steps=int(s["steps"]), super_res_num_inference_steps=a.super_res_steps,
                         generator=list(generators), prior_guidance_scale=a.prior_guidance,
                         decoder_guidance_scale=float(s["guidance"])).images


def make_runner(args, device):
    """A prompt file (--prompts, --outdir): text-to-image only."""
    fill_defaults(args, DEFAULTS)
    if args.image is not None or args.interpolate is not None or args.text_diff is not None:
        raise UsageError("--prompts: unCLIP batches are text-to-image; --image / --interpolate / --text-diff take "
                         "no prompt file")
    _check(args, batch=True)
    print("note: unCLIP --prompts runs text-to-image", file=sys.stderr)
    return UnCLIPRunner(_load(args, device, "text"), args)
