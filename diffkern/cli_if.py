"""`diffkern generate --model if`: DeepFloyd IF / Imagen's cascade (--if-stage1), a family of diffkern.cli.

    diffkern generate --model if --stages 1 --if-stage1 ./IF-I-XL-v1.0 --prompt "a red cat" --output cat64.png
    diffkern generate --model if --stages 3 --if-stage1 ./IF-I-XL-v1.0 --if-stage2 ./IF-II-L-v1.0 \\
        --if-stage3 ./stable-diffusion-x4-upscaler --prompt "a red cat" --output cat.png --sequential

Stage I (text -> 64 x 64), stage II (-> 256) and stage III (the SD x4 upscaler, -> 1024) run in one
diffkern.pipelines.IFCascadePipeline: T5 once, each stage's settings from --if-steps / --if-guidance
(--guidance is stage I's) / --if-noise-levels / --if-timesteps, --sequential to hold one stage in memory
at a time.
"""

from __future__ import annotations

from pathlib import Path

from diffkern.cli_common import (
    DTYPES,
    UsageError,
    backend_context,
    check_backend,
    check_output,
    pick_device,
    write_images,
)

NAME = "DeepFloyd IF"
SELECT = "--if-stage1"
SHARED = ("negative_prompt",)
# --prompts: the per-line keys IFRunner takes
LINE_KEYS = ("guidance", "negative_prompt")
FOLDERS = {1: ("if_stage1", "IF-I-XL-v1.0 (or IF-I-L / IF-I-M)", "DeepFloyd/IF-I-XL-v1.0"),
           2: ("if_stage2", "IF-II-L-v1.0 (or IF-II-M)", "DeepFloyd/IF-II-L-v1.0"),
           3: ("if_stage3", "stable-diffusion-x4-upscaler", "stabilityai/stable-diffusion-x4-upscaler")}

WHERE_TO_PUT_WEIGHTS = """\
diffkern downloads nothing: put the diffusers folders on this machine and pass them, one per stage:
  --if-stage1 IF-I-XL-v1.0 (or IF-I-L-v1.0 / IF-I-M-v1.0; it holds the T5-XXL text encoder)
  --if-stage2 IF-II-L-v1.0 (or IF-II-M-v1.0)       for --stages 2 and 3
  --if-stage3 stable-diffusion-x4-upscaler          for --stages 3
e.g. `huggingface-cli download DeepFloyd/IF-I-XL-v1.0 --local-dir ./IF-I-XL-v1.0`
(accept the IF license on its model page first)."""


def add_arguments(group):
    """IF's own options (every default None: a given one is noticed by the other families)."""
    group.add_argument("--if-stage1", help="IF stage I diffusers folder (IF-I-XL-v1.0, ...): T5 + the "
                       "64 x 64 UNet")
    group.add_argument("--if-stage2", help="IF stage II diffusers folder (IF-II-L-v1.0, ...): 64 -> 256")
    group.add_argument("--if-stage3", help="stage III: the stable-diffusion-x4-upscaler diffusers folder "
                       "(-> 1024)")
    group.add_argument("--stages", type=int, choices=[1, 2, 3], default=None,
                       help="how many stages to run (default: as many as folders given)")
    group.add_argument("--if-steps", default=None, help="comma-separated steps per stage (default 100,50,75)")
    group.add_argument("--if-guidance", default=None, help="guidance of stages II and III (default 4,9; "
                       "--guidance is stage I's, default 7)")
    group.add_argument("--if-noise-levels", default=None, help="noise augmentation of stages II and III "
                       "(default 250,100)")
    group.add_argument("--if-timesteps", default=None, help="comma-separated IF schedule names per stage, "
                       "'-' for none (e.g. smart100,smart50 or fast27,super27)")
    group.add_argument("--if-low-res-noise", choices=["once", "per_call"], default=None,
                       help="stage II's noise augmentation of its low-res input: once (diffusers, default) or "
                       "per_call (DeepFloyd IF's own code: fresh noise at every UNet call, per guidance half)")
    group.add_argument("--sequential", action="store_const", const=True, default=None,
                       help="load each stage when it runs and free it after (T5 right after the prompt)")


def selected_by(args):
    """--model auto: IF when --if-stage1 is given."""
    return args.if_stage1 is not None


def _per_stage(text, name, count, convert, offset=0):
    """A comma-separated list -> a 3-tuple (None where not given); offset 1 = values start at stage II."""
    values = [None, None, None]
    if text is None:
        return tuple(values)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > count - offset:
        raise UsageError(f"--{name}: at most {count - offset} values (one per stage), got {text!r}")
    for i, p in enumerate(parts):
        if p not in ("", "-"):
            try:
                values[i + offset] = convert(p)
            except ValueError:
                raise UsageError(f"--{name}: {p!r} is not a valid value") from None
    return tuple(values)


def _stages(args):
    """The number of stages, after checking every folder it needs exists (UsageError naming them)."""
    given = [i for i in (1, 2, 3) if getattr(args, FOLDERS[i][0]) is not None]
    stages = args.stages or (max(given) if given else 1)
    problems = []
    for i in range(1, stages + 1):
        dest, what, repo = FOLDERS[i]
        folder = getattr(args, dest)
        if folder is None:
            roman = "I" * i
            problems.append(f"--{dest.replace('_', '-')} is missing (stage {roman}: {what}, {repo})")
        elif not (Path(folder) / "model_index.json").is_file():
            problems.append(f"--{dest.replace('_', '-')} {folder}: not a diffusers folder "
                            "(no model_index.json)")
    if problems:
        raise UsageError(f"--stages {stages} needs weights that are not here:\n  " + "\n  ".join(problems)
                         + "\n" + WHERE_TO_PUT_WEIGHTS)
    return stages


def _settings(args, stages):
    from diffkern.pipelines.if_timesteps import TIMESTEPS

    def schedule(name):
        if name not in TIMESTEPS:
            raise ValueError(name)
        return name

    try:
        timesteps = _per_stage(args.if_timesteps, "if-timesteps", 3, schedule)
    except UsageError as e:
        raise UsageError(f"{e}; valid schedules: {', '.join(TIMESTEPS)}") from None
    guidance = list(_per_stage(args.if_guidance, "if-guidance", 3, _finite, offset=1))
    guidance[0] = args.guidance
    steps = _per_stage(args.if_steps, "if-steps", 3, int)
    for i, n in enumerate(steps):
        if n is not None and n < 1:
            raise UsageError(f"--if-steps: stage {'I' * (i + 1)} needs at least 1 step, got {n}")
    noise = _per_stage(args.if_noise_levels, "if-noise-levels", 3, int, offset=1)
    for i, (level, top) in enumerate(zip(noise[1:], (999, _max_noise_level(args.if_stage3, stages))), 2):
        if level is not None and not 0 <= level <= top:
            raise UsageError(f"--if-noise-levels: stage {'I' * i}'s must be in [0, {top}], got {level}")
    if args.if_low_res_noise is not None and stages < 2:
        raise UsageError("--if-low-res-noise: stage II's option; give --if-stage2 (or --stages 2 / 3)")
    return dict(stages=stages, num_inference_steps=steps, guidance_scale=tuple(guidance), timesteps=timesteps,
                noise_level=noise, low_res_noise=args.if_low_res_noise or "once")


def _finite(text):
    import math

    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _max_noise_level(folder, stages):
    """Stage III's max_noise_level (the x4 upscaler's model_index.json; 350 as released), read before loading."""
    import json

    if folder is None or stages < 3:
        return 350
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
        level = index.get("max_noise_level", 350) if isinstance(index, dict) else 350
        return level if isinstance(level, int) and not isinstance(level, bool) else 350
    except (OSError, ValueError):
        return 350  # the loader then names the unreadable file


def _load(args, device, stages):
    import torch

    from diffkern.pipelines import IFCascadePipeline

    folders = [getattr(args, FOLDERS[i][0]) if i <= stages else None for i in (1, 2, 3)]
    try:
        return IFCascadePipeline.from_pretrained(*folders, dtype=getattr(torch, DTYPES[args.dtype]),
                                                 device=device, sequential=bool(args.sequential))
    except (OSError, ValueError, NotImplementedError) as e:
        raise UsageError(f"cannot load IF from {', '.join(f for f in folders if f)}: {e}") from e


def generate(args):
    """One --prompt to --output (and --num-images): the written paths."""
    import torch

    if not args.prompt:
        raise UsageError("--prompt: give the text to draw")
    stages = _stages(args)
    settings = _settings(args, stages)
    if args.backend is not None:
        check_backend(args.backend)
    paths = check_output(args.output, args.num_images)  # before loading: a bad --output fails first
    cascade = _load(args, pick_device(args.device), stages)
    try:
        with backend_context(args.backend):
            out = cascade(args.prompt, args.negative_prompt, num_images_per_prompt=args.num_images,
                          generator=torch.Generator().manual_seed(args.seed), output_type="pil",
                          progress=not args.quiet, **settings)
    except ValueError as e:  # argument problems the pipelines found (sizes, noise levels, ...)
        raise UsageError(str(e)) from e
    if len(out.images) != len(paths):
        raise RuntimeError(f"the cascade returned {len(out.images)} images for --num-images {args.num_images}")
    return write_images(out.images, paths)


class IFRunner:
    """--prompts mode: guidance (stage I's) and negative_prompt per line; the rest from the command line."""

    accepts = ("guidance", "negative_prompt")

    def __init__(self, cascade, args, settings):
        import diffkern

        self.cascade, self.settings = cascade, settings
        self.defaults = {"guidance": settings["guidance_scale"][0] or 7.0,
                         "negative_prompt": args.negative_prompt}
        self.metadata = {"model": Path(args.if_stage1).name, "scheduler": "DDPMScheduler (IF)",
                         "diffkern_version": diffkern.__version__}

    def __call__(self, jobs, generators):
        s = jobs[0].settings
        guidance = (float(s["guidance"]),) + tuple(self.settings["guidance_scale"][1:])
        settings = dict(self.settings, guidance_scale=guidance)
        negatives = [j.negative_prompt or "" for j in jobs]
        # one generator per image: every stage draws each image's noise from its own generator
        return self.cascade([j.prompt for j in jobs], negatives, generator=list(generators),
                            output_type="pil", progress=False, **settings).images


def make_runner(args, device):
    """A prompt file (--prompts, --outdir): text-to-image through the stages asked for."""
    stages = _stages(args)
    settings = _settings(args, stages)  # checked before the stages are loaded
    if args.backend is not None:
        check_backend(args.backend)
    return IFRunner(_load(args, device, stages), args, settings)
