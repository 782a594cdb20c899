"""The `diffkern` command: generate images, run the benchmarks, show what was built.

    diffkern generate --checkpoint ./stable-diffusion-v1-5 --prompt "a red fox in the snow" --output fox.png
    diffkern generate --checkpoint ./sd15 --prompt "oil painting" --init-image photo.png --strength 0.6
    diffkern bench --device cpu --quick        # = python -m diffkern.bench
    diffkern info                              # = python -m diffkern.info
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
Example: diffkern generate --checkpoint ./sd15 --prompt "a red fox in the snow" --output fox.png"""


class UsageError(Exception):
    """A problem with the command line or its files: printed as one message, exit status 2."""


def _generate_parser():
    p = argparse.ArgumentParser(prog="diffkern generate",
                                description="Text-to-image (or image-to-image) with a Stable Diffusion 1.x / "
                                "2.x or LDM text2im checkpoint on diffkern's kernels.")
    p.add_argument("--checkpoint", help="diffusers pipeline folder, or a single .ckpt / .safetensors file")
    p.add_argument("--prompt", help="the text to draw")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of a CPU torch.Generator (the same noise on any device)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim", help="sampler (default ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
    p.add_argument("--init-image", default=None, help="image file: run image-to-image from it")
    p.add_argument("--strength", type=float, default=0.8,
                   help="image-to-image strength in [0, 1] (default 0.8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights and compute dtype (default fp32)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--backend", default=None, help="force one diffkern backend for every op that has it "
                   "(e.g. triton, sdpa, cpu, cuda, reference); see `diffkern info`")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, for single-file checkpoints")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="override the checkpoint's (single SD 2.x 768-v files need v_prediction)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", default="out.png", help="image file to write (default out.png); with "
                   "--num-images N > 1, NAME-0.png ... NAME-{N-1}.png")
    return p


def _output_paths(output, n):
    from PIL import Image

    path = Path(output)
    if path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--output: {output!r} needs an image extension PIL can write (.png, .jpg, ...)")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def _check_backend(name):
    from diffkern import _dispatch  # importing diffkern registers the ops

    known = sorted({b for op in _dispatch.registered_ops() for b in _dispatch.op_family(op).backends})
    if name not in known:
        raise UsageError(f"--backend: unknown backend {name!r}; choose from {', '.join(known)}")


def _check_args(args):
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
        _check_backend(args.backend)


def generate(args):
    """Run `diffkern generate` with parsed arguments; returns the written paths."""
    import torch

    import diffkern
    from diffkern.pipelines import load_pipeline

    _check_args(args)
    paths = _output_paths(args.output, args.num_images)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here; use --device cpu")
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
        with diffkern.use_backend(args.backend) if args.backend else contextlib.nullcontext():
            images = pipe(*inputs, **kw).images
    except ValueError as e:  # argument problems the pipeline found (sizes, strength, ...)
        raise UsageError(str(e)) from e
    for image, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"wrote {path}")
    return paths


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
