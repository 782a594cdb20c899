"""`diffkern generate` for GLIDE: OpenAI's released .pt files through diffkern's GlidePipeline.

    diffkern generate --base base.pt --upsampler upsample.pt --tokenizer ./glide_tokenizer \\
        --prompt "an oil painting of a corgi" --num-images 4 --output corgi.png
    diffkern generate --base base.pt --tokenizer ./glide_tokenizer --prompt "a corgi" --output small.png
    diffkern generate --base base.pt --upsampler upsample.pt --tokenizer ./glide_tokenizer \\
        --clip-image clip_image_enc.pt --clip-text clip_text_enc.pt --prompt "a corgi" --output clip.png
    diffkern generate --base base_inpaint.pt --upsampler upsample_inpaint.pt --tokenizer ./glide_tokenizer \\
        --inpaint-image grass.png --mask mask.png --prompt "a corgi in a field" --output fill.png

As OpenAI's notebooks: the base model samples 64x64 with DDPM over --base-respacing steps and
classifier-free guidance (or CLIP guidance), the upsampler goes to 256x256 with DDIM over
--upsample-respacing steps. diffkern.cli parses the command line and dispatches here (a family of
diffkern.cli.FAMILIES: NAME, SELECT, SHARED, add_arguments, selected_by, generate, make_runner).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffkern.cli_common import (
    UsageError,
    backend_context,
    check_backend,
    check_finite,
    check_image,
    check_output,
    fill_defaults,
    flag,
    pick_device,
    write_images,
)

WHERE_TO_PUT_GLIDE = """\
diffkern downloads nothing: put GLIDE's files on this machine and pass their paths.
OpenAI's glide-text2im release (https://openaipublic.blob.core.windows.net/diffusion/dec-2021/<file>):
  base.pt              --base         the 64x64 text-to-image model
  upsample.pt          --upsampler    the 64 -> 256 upsampler (optional: without it, 64x64 images are written)
  base_inpaint.pt      --base         for inpainting, with --inpaint-image and --mask
  upsample_inpaint.pt  --upsampler    for inpainting
  clip_image_enc.pt    --clip-image   the noised CLIP, for CLIP guidance (with --clip-text)
  clip_text_enc.pt     --clip-text
The tokenizer files ship inside OpenAI's glide_text2im package (glide_text2im/tokenizer/ of
github.com/openai/glide-text2im, or of its pip install):
  --tokenizer       that folder: encoder.json.gz + vocab.bpe.gz (GPT-2's BPE; a Hugging Face gpt2 folder
                    with vocab.json + merges.txt works too)
  --clip-tokenizer  bpe_simple_vocab_16e6.txt.gz (default: looked for in the --tokenizer folder)
Example: diffkern generate --base base.pt --upsampler upsample.pt --tokenizer ./glide_tokenizer \\
    --prompt "an oil painting of a corgi" --output corgi.png"""

NAME = "GLIDE"
SELECT = "--base"
SHARED = ()  # GLIDE samples with --base-respacing; its sizes are the checkpoints'; no negative prompt
OTHER_OPTIONS_HINT = " (GLIDE samples with --base-respacing / --upsample-respacing; its sizes are the checkpoints')"

# --prompts: the per-line keys GlideRunner takes; "steps" may be a respacing string ("100", "ddim50")
LINE_KEYS = ("steps", "guidance")
STEPS_AS_TEXT = True

GLIDE_DEFAULTS = {"base_respacing": "100", "upsample_respacing": "fast27", "upsample_temp": 0.997,
                  "clip_guidance_scale": 3.0}
# GLIDE's own options: argparse leaves them None so that one given to Stable Diffusion is noticed.
GLIDE_ONLY = ("base", "upsampler", "base_respacing", "upsample_respacing", "upsample_temp", "clip_image",
              "clip_text", "clip_tokenizer", "clip_guidance_scale", "inpaint_image", "mask", "base_options",
              "upsampler_options")
CLIP_BPE_NAMES = ("bpe_simple_vocab_16e6.txt.gz", "bpe_simple_vocab_16e6.txt")


def add_arguments(group):
    """GLIDE's options, on an argparse parser or argument group (every default None, see GLIDE_ONLY)."""
    add = group.add_argument
    add("--base", metavar="PT", help="GLIDE base model: base.pt (text-to-image) or base_inpaint.pt "
        "(with --inpaint-image / --mask); giving it selects GLIDE")
    add("--upsampler", metavar="PT", help="upsample.pt or upsample_inpaint.pt: 64 -> 256 (default: none, "
        "the base model's 64x64 samples are written)")
    add("--base-respacing", metavar="STEPS", help="base model steps, OpenAI's timestep_respacing: "
        "'100' (default), 'ddim50', '10,10,3,2,2', ...")
    add("--upsample-respacing", metavar="STEPS", help="upsampler steps (DDIM for text-to-image; "
        "default 'fast27')")
    add("--upsample-temp", type=float, metavar="T", help="scale of the upsampler's starting noise "
        "(default 0.997)")
    add("--clip-image", metavar="PT", help="clip_image_enc.pt: with --clip-text, CLIP guidance (instead of "
        "classifier-free guidance, or on top of it when --guidance is also given)")
    add("--clip-text", metavar="PT", help="clip_text_enc.pt")
    add("--clip-tokenizer", metavar="PATH", help="CLIP's BPE file bpe_simple_vocab_16e6.txt(.gz) or a "
        "CLIP tokenizer folder (default: bpe_simple_vocab_16e6.txt.gz in the --tokenizer folder)")
    add("--clip-guidance-scale", type=float, metavar="S", help="CLIP guidance strength (default 3.0)")
    add("--inpaint-image", metavar="IMAGE", help="image to edit (inpainting; needs --mask and the "
        "*_inpaint.pt models)")
    add("--mask", metavar="IMAGE", help="mask for --inpaint-image, any size: white (>= 128 in grey) = "
        "keep, black = the region GLIDE repaints")
    add("--base-options", metavar="JSON", help="JSON object or .json file overriding OpenAI's model "
        "options of the base model (e.g. '{\"num_res_blocks\": 2}' for a fine-tuned checkpoint)")
    add("--upsampler-options", metavar="JSON", help="the same for the upsampler")


def selected_by(args):
    """--model auto: GLIDE when --base is given, or another GLIDE option without --checkpoint."""
    return args.base is not None or (getattr(args, "checkpoint", None) is None
                                     and any(getattr(args, n) is not None for n in GLIDE_ONLY))


def _file(path, option):
    if not Path(path).is_file():
        raise UsageError(f"{option}: file not found: {path}\n" + WHERE_TO_PUT_GLIDE)


def _model_options(text, option):
    """An option dict from a JSON object or a .json file; unknown names rejected."""
    from diffkern.models.glide import model_and_diffusion_defaults

    if text is None:
        return None
    if not text.lstrip().startswith("{"):
        if not Path(text).is_file():
            raise UsageError(f"{option}: neither a JSON object nor a file: {text!r}")
        try:
            text = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{option}: cannot read {text} ({e})") from None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{option}: not valid JSON ({e})") from None
    if not isinstance(options, dict):
        raise UsageError(f"{option}: expected a JSON object of model options, got {type(options).__name__}")
    unknown = sorted(set(options) - set(model_and_diffusion_defaults()))
    if unknown:
        raise UsageError(f"{option}: unknown option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(model_and_diffusion_defaults()))}")
    return options


def _check_respacing(respacing, options, option):
    from diffkern.schedulers.schedules import space_timesteps

    steps = (options or {}).get("diffusion_steps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"diffusion_steps: expected a positive int, got {steps!r}")
    try:
        if not space_timesteps(steps, respacing):
            raise ValueError("no steps")
    except ValueError as e:
        raise UsageError(f"{option}: {respacing!r} does not respace {steps} diffusion steps: {e}") from None


def _tokenizers(args, clip):
    """GlideTokenizer of --tokenizer, and the ClipTokenizer when CLIP guides (None otherwise)."""
    from diffkern.models.glide.tokenizer import ClipTokenizer, GlideTokenizer

    if args.tokenizer is None:
        raise UsageError("no tokenizer given: GLIDE needs --tokenizer FOLDER with its GPT-2 BPE files "
                         "(encoder.json.gz + vocab.bpe.gz).\n" + WHERE_TO_PUT_GLIDE)
    try:
        tokenizer = GlideTokenizer.from_path(args.tokenizer)
    except (OSError, ValueError) as e:
        raise UsageError(f"--tokenizer: {e}\n" + WHERE_TO_PUT_GLIDE) from None
    if not clip:
        return tokenizer, None
    path = args.clip_tokenizer
    if path is None:
        found = [Path(args.tokenizer) / n for n in CLIP_BPE_NAMES if (Path(args.tokenizer) / n).is_file()]
        if not found:
            raise UsageError(f"CLIP guidance needs CLIP's tokenizer: give --clip-tokenizer "
                             f"bpe_simple_vocab_16e6.txt.gz (none in {args.tokenizer}).\n"
                             + WHERE_TO_PUT_GLIDE)
        path = found[0]
    try:
        return tokenizer, ClipTokenizer.from_path(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--clip-tokenizer: {e}\n" + WHERE_TO_PUT_GLIDE) from None


def _check_args(args, batch=False):
    """Everything that can be said before reading weights; returns (clip, inpaint)."""
    if not args.base:
        raise UsageError("no GLIDE base model given (--base base.pt).\n" + WHERE_TO_PUT_GLIDE)
    for option in ("base", "upsampler", "clip_image", "clip_text"):
        if getattr(args, option) is not None:
            _file(getattr(args, option), flag(option))
    if not batch and not args.prompt:
        raise UsageError("--prompt: give the text to draw")
    if args.num_images < 1:
        raise UsageError("--num-images must be positive")
    if args.dtype == "bf16":
        raise UsageError("--dtype bf16: GLIDE runs in fp32 or fp16 (fp16 = OpenAI's use_fp16 mixed "
                         "precision)")
    if args.upsampler is None and args.upsampler_options is not None:
        raise UsageError("--upsampler-options: given without --upsampler")
    if (args.clip_image is None) != (args.clip_text is None):
        raise UsageError("CLIP guidance needs both --clip-image clip_image_enc.pt and --clip-text "
                         "clip_text_enc.pt")
    clip, inpaint = args.clip_image is not None, args.inpaint_image is not None
    if batch and inpaint:
        raise UsageError("--inpaint-image: inpainting takes one --prompt, not --prompts")
    if not clip and (args.clip_tokenizer is not None or args.clip_guidance_scale is not None):
        raise UsageError("--clip-tokenizer / --clip-guidance-scale: CLIP guidance needs --clip-image and "
                         "--clip-text")
    if inpaint != (args.mask is not None):
        raise UsageError("inpainting needs both --inpaint-image IMAGE and --mask MASK (white = keep, black = "
                         "repaint)")
    if clip and inpaint:
        raise UsageError("CLIP guidance is for text-to-image; inpainting uses classifier-free guidance "
                         "(--guidance)")
    for option in ("inpaint_image", "mask"):
        if getattr(args, option) is not None:
            check_image(getattr(args, option), flag(option))
    check_finite(args, "upsample_temp", "clip_guidance_scale")
    if args.upsample_temp is not None and args.upsample_temp <= 0:
        raise UsageError(f"--upsample-temp: must be positive, got {args.upsample_temp}")
    if args.backend is not None:
        check_backend(args.backend)
    return clip, inpaint


def check_line(spec, args):
    """A --prompts line's "steps" must respace the base model's diffusion steps (checked before loading)."""
    if "steps" not in spec:
        return None
    try:
        _check_respacing(str(spec["steps"]), _model_options(args.base_options, "--base-options"), '"steps"')
    except UsageError as e:
        return str(e)
    return None


def _inpaint_inputs(args):
    """(PIL image, mask array of 1 = keep / 0 = repaint) from --inpaint-image and --mask."""
    import numpy as np
    from PIL import Image

    try:
        image = Image.open(args.inpaint_image).convert("RGB")
        mask = np.asarray(Image.open(args.mask).convert("L")) >= 128
    except OSError as e:
        raise UsageError(f"cannot read the inpainting image or mask: {e}") from None
    if mask.all():
        print("note: --mask is white everywhere: nothing to repaint", file=sys.stderr)
    return image, mask.astype(np.float32)


def _load_hint(error, inpaint):
    if "do not fit" not in str(error):
        return ""
    if inpaint:
        return ("\n(--inpaint-image takes the inpainting models: --base base_inpaint.pt, --upsampler "
                "upsample_inpaint.pt; other model shapes need --base-options / --upsampler-options)")
    return ("\n(text-to-image takes --base base.pt and --upsampler upsample.pt; base_inpaint.pt and "
            "upsample_inpaint.pt need --inpaint-image and --mask; other model shapes need --base-options / "
            "--upsampler-options)")


def _load(args, device, batch):
    """Checks, defaults, then the GlidePipeline: (pipe, clip, inpaint)."""
    from diffkern.pipelines.glide import GlidePipeline

    clip, inpaint = _check_args(args, batch)
    fill_defaults(args, GLIDE_DEFAULTS)
    if args.guidance is None and not clip:
        args.guidance = 5.0 if inpaint else 3.0  # OpenAI's notebooks (inpaint, text2im)
    base_options = _model_options(args.base_options, "--base-options")
    upsampler_options = _model_options(args.upsampler_options, "--upsampler-options")
    _check_respacing(args.base_respacing, base_options, "--base-respacing")
    if args.upsampler is not None:
        _check_respacing(args.upsample_respacing, upsampler_options, "--upsample-respacing")
    if not batch:
        check_output(args.output, args.num_images)  # a bad --output fails before the weights are read
    tokenizer, clip_tokenizer = _tokenizers(args, clip)
    try:
        pipe = GlidePipeline.from_checkpoints(
            args.base, args.upsampler, tokenizer=tokenizer, inpaint=inpaint, base_options=base_options,
            upsampler_options=upsampler_options, clip_image_path=args.clip_image,
            clip_text_path=args.clip_text, clip_tokenizer=clip_tokenizer, device=device,
            use_fp16=args.dtype == "fp16")
    except (OSError, ValueError, TypeError) as e:  # missing, corrupt or mis-shaped files, said by the loader
        raise UsageError(f"cannot load the GLIDE checkpoints: {e}{_load_hint(e, inpaint)}") from e
    if args.upsampler is None:
        size = pipe.base_options["image_size"]
        print(f"note: no --upsampler: writing the base model's {size}x{size} samples", file=sys.stderr)
    return pipe, clip, inpaint


def _fixed_kwargs(args, clip):
    """Pipeline arguments that are the same for every image of a run."""
    kw = dict(upsample_respacing=args.upsample_respacing, upsample_temp=args.upsample_temp)
    if clip:
        kw.update(use_clip_guidance=True, clip_guidance_scale=args.clip_guidance_scale)
    return kw


def generate(args):
    """One prompt (--prompt, --output): the written paths."""
    import torch

    device = pick_device(args.device)
    if args.inpaint_image is not None and args.mask is not None:
        _check_args(args)
        inputs = _inpaint_inputs(args)  # read before the weights: a bad image fails first
    else:
        inputs = ()
    pipe, clip, inpaint = _load(args, device, batch=False)
    paths = check_output(args.output, args.num_images)
    kw = dict(guidance_scale=args.guidance, batch_size=args.num_images, base_respacing=args.base_respacing,
              upsample_respacing=args.upsample_respacing, upsample_temp=args.upsample_temp,
              generator=torch.Generator().manual_seed(args.seed), output_type="pil", progress=not args.quiet)
    try:
        with backend_context(args.backend):
            if inpaint:
                images = pipe.inpaint(*inputs, args.prompt, **kw).images
            else:
                images = pipe(args.prompt, use_clip_guidance=clip,
                              clip_guidance_scale=args.clip_guidance_scale, **kw).images
    except ValueError as e:  # argument problems the pipeline found
        raise UsageError(str(e)) from e
    return write_images(images, paths)


generate_glide = generate  # the name of earlier releases


def make_runner(args, device):
    """A prompt file (--prompts, --outdir): text-to-image (classifier-free and / or CLIP guidance);
    per-line "steps" is the base respacing ("100", "ddim50", or an int), "guidance" the scale."""
    from diffkern.distributed import GlideRunner

    pipe, clip, _ = _load(args, device, batch=True)
    return GlideRunner(pipe, model=Path(args.base).name, steps=args.base_respacing, guidance=args.guidance,
                       extra=_fixed_kwargs(args, clip))
