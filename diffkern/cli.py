"""The `diffkern` command: generate images, run the benchmarks, show what was built.

    diffkern generate --checkpoint ./stable-diffusion-v1-5 --prompt "a red fox in the snow" --output fox.png
    diffkern generate --checkpoint ./sd15 --prompt "oil painting" --init-image photo.png --strength 0.6
    diffkern generate --base base.pt --upsampler upsample.pt --tokenizer ./glide_tokenizer \\
        --prompt "an oil painting of a corgi" --output corgi.png          # GLIDE 64 -> 256
    diffkern generate --base base_inpaint.pt --upsampler upsample_inpaint.pt --tokenizer ./glide_tokenizer \\
        --inpaint-image grass.png --mask mask.png --prompt "a corgi in a field" --output fill.png
    diffkern bench --device cpu --quick        # = python -m diffkern.bench
    diffkern info                              # = python -m diffkern.info

`generate` serves two families: Stable Diffusion 1.x / 2.x and LDM text2im (--checkpoint), and
GLIDE (--base; see diffkern.cli_glide). --model picks one; auto (the default) takes GLIDE when
--base or another GLIDE option is given without --checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

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

# Stable Diffusion / LDM options: argparse leaves them None so that one given to GLIDE is noticed.
SD_DEFAULTS = {"steps": 50, "guidance": 7.5, "scheduler": "ddim", "eta": 0.0, "strength": 0.8}
SD_ONLY = ("checkpoint", "negative_prompt", "steps", "height", "width", "scheduler", "eta", "init_image",
           "strength", "prediction_type")


class UsageError(Exception):
    """A problem with the command line or its files: printed as one message, exit status 2."""


def _generate_parser():
    from diffkern import cli_glide

    p = argparse.ArgumentParser(prog="diffkern generate",
                                description="Text-to-image with Stable Diffusion 1.x / 2.x or LDM text2im "
                                "(--checkpoint; also image-to-image) or with GLIDE (--base; also "
                                "CLIP guidance and inpainting), on diffkern's kernels.")
    p.add_argument("--model", choices=["auto", "sd", "glide"], default="auto",
                   help="model family (default auto: glide when --base is given, else sd)")
    p.add_argument("--prompt", help="the text to draw")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: "
                   "7.5 for sd, 3.0 for GLIDE text-to-image, 5.0 for GLIDE inpainting)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of a CPU torch.Generator (the same noise on any device)")
    p.add_argument("--num-images", "--batch-size", dest="num_images", type=int, default=1,
                   help="images to generate (default 1)")
    p.add_argument("--tokenizer", default=None, help="sd: CLIP tokenizer folder, for single-file "
                   "checkpoints; GLIDE: the folder of its GPT-2 BPE files (encoder.json.gz + vocab.bpe.gz)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights and compute dtype (default fp32; GLIDE: fp16 = OpenAI's use_fp16)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--backend", default=None, help="force one diffkern backend for every op that has it "
                   "(e.g. triton, sdpa, cpu, cuda, reference); see `diffkern info`")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", default="out.png", help="image file to write (default out.png); with "
                   "--num-images N > 1, NAME-0.png ... NAME-{N-1}.png")
    sd = p.add_argument_group("Stable Diffusion / LDM (--model sd)")
    sd.add_argument("--checkpoint", help="diffusers pipeline folder, or a single .ckpt / .safetensors file")
    sd.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    sd.add_argument("--steps", type=int, default=None, help="sampling steps (default 50)")
    sd.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    sd.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    sd.add_argument("--scheduler", choices=["ddim", "ddpm"], default=None, help="sampler (default ddim)")
    sd.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0: deterministic)")
    sd.add_argument("--init-image", default=None, help="image file: run image-to-image from it")
    sd.add_argument("--strength", type=float, default=None,
                    help="image-to-image strength in [0, 1] (default 0.8)")
    sd.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                    help="override the checkpoint's (single SD 2.x 768-v files need v_prediction)")
    cli_glide.add_arguments(p.add_argument_group("GLIDE (--model glide)"))
    return p


def flag(dest):
    """The command-line spelling of an argparse dest (num_images -> --num-images)."""
    return "--" + dest.replace("_", "-")


def _family(args):
    """"sd" or "glide" from --model and the options given; rejects the other family's options."""
    from diffkern.cli_glide import GLIDE_ONLY

    glide_given = [flag(n) for n in GLIDE_ONLY if getattr(args, n) is not None]
    sd_given = [flag(n) for n in SD_ONLY if getattr(args, n) is not None]
    family = args.model
    if family == "auto":
        if args.checkpoint is not None and args.base is not None:
            raise UsageError("give --checkpoint (Stable Diffusion / LDM) or --base (GLIDE), not both")
        family = "glide" if args.checkpoint is None and glide_given else "sd"
    if family == "sd" and glide_given:
        raise UsageError(f"{', '.join(glide_given)}: GLIDE options; give --base base.pt (GLIDE) instead of "
                         "--checkpoint, or leave them out")
    if family == "glide" and sd_given:
        hint = " (GLIDE's base model goes to --base)" if args.checkpoint is not None else \
            " (GLIDE samples with --base-respacing / --upsample-respacing; its sizes are the checkpoints')"
        raise UsageError(f"{', '.join(sd_given)}: Stable Diffusion / LDM options, not GLIDE's{hint}")
    return family


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


def _check_sd_args(args):
    if not args.checkpoint:
        raise UsageError("no checkpoint given (--checkpoint PATH).\n" + WHERE_TO_PUT_WEIGHTS)
    if not Path(args.checkpoint).exists():
        raise UsageError(f"checkpoint not found: {args.checkpoint}\n" + WHERE_TO_PUT_WEIGHTS)
    if not args.prompt:
        raise UsageError("--prompt: give the text to draw")
    if args.steps < 1 or args.num_images < 1:
        raise UsageError("--steps and --num-images must be positive")
    if args.init_image is not None and not Path(args.init_image).is_file():
        raise UsageError(f"--init-image: no such file: {args.init_image}")
    if args.backend is not None:
        check_backend(args.backend)


def generate_sd(args):
    """`diffkern generate` for Stable Diffusion / LDM checkpoints; returns the written paths."""
    import torch

    from diffkern.pipelines import load_pipeline

    for name, value in SD_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check_sd_args(args)
    paths = output_paths(args.output, args.num_images)
    device = pick_device(args.device)
    load_kwargs = {k: v for k, v in (("tokenizer", args.tokenizer), ("prediction_type", args.prediction_type))
                   if v is not None}
    try:
        pipe = load_pipeline(args.checkpoint, dtype=getattr(torch, DTYPES[args.dtype]), device=device,
                             scheduler=args.scheduler, img2img=args.init_image is not None, **load_kwargs)
    except (OSError, ValueError, NotImplementedError) as e:  # file and format problems, said by the loader
        raise UsageError(f"cannot load checkpoint {args.checkpoint}: {e}") from e
    for note in getattr(pipe, "notes", []):
        print(f"note: {note}", file=sys.stderr)
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


def generate(args):
    """Run `diffkern generate` with parsed arguments; returns the written paths."""
    if _family(args) == "glide":
        from diffkern.cli_glide import generate_glide

        return generate_glide(args)
    return generate_sd(args)


def main(argv=None):
    """Entry point of the `diffkern` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from diffkern.bench.__main__ import main as bench_main

        return bench_main(argv[1:]) or 0
    if argv[:1] == ["info"]:
        from diffkern.info import main as info_main

        return info_main(argv[1:]) or 0
    if argv[:1] != ["generate"]:
        print(__doc__.strip() + "\n\nCommands: generate (see `diffkern generate --help`), bench, info",
              file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    args = _generate_parser().parse_args(argv[1:])
    try:
        generate(args)
    except UsageError as e:
        print(f"diffkern generate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
