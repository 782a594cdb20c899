"""The `diffkern` command: generate images, run the benchmarks, show what was built.

    diffkern generate --checkpoint ./stable-diffusion-v1-5 --prompt "a red fox in the snow" --output fox.png
    diffkern generate --checkpoint ./sd15 --prompt "oil painting" --init-image photo.png --strength 0.6
    diffkern generate --base base.pt --upsampler upsample.pt --tokenizer ./glide_tokenizer \\
        --prompt "an oil painting of a corgi" --output corgi.png          # GLIDE 64 -> 256
    diffkern generate --checkpoint ./sd15 --prompts prompts.jsonl --outdir out/ --batch-size 4 --resume
    torchrun --nproc-per-node 4 -m diffkern generate --checkpoint ./sd15 --prompts prompts.txt --outdir out/
    diffkern bench --device cpu --quick        # = python -m diffkern.bench
    diffkern info                              # = python -m diffkern.info

`generate` serves every model family in FAMILIES; --model picks one, auto (the default) takes
the family whose selecting option is given (--checkpoint: sd, --base: glide), else sd.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffkern.cli_common import (  # noqa: F401 (UsageError, flag: re-exported)
    DTYPES,
    UsageError,
    check_finite,
    check_positive,
    check_writable_dir,
    flag,
)

# Model families of `diffkern generate`: name -> module. To add one, write diffkern/cli_<name>.py
# with the attributes below and add ONE line here; nothing else in this file changes.
#
#   NAME: str                 what the family is called in messages ("GLIDE")
#   SELECT: str               the option that selects it under --model auto ("--base")
#   SHARED: tuple of str      dests of the shared sampling options below it takes (negative_prompt,
#                             steps, height, width); given to a family that does not list them,
#                             they are refused with a message naming a family that takes them
#   add_arguments(group)      its own options on an argparse group, every default None (a given one
#                             is refused by the other families); flags must not repeat another
#                             family's: an option two families take goes to the shared group here
#   selected_by(args) -> bool True when its own selecting option was given (--model auto)
#   generate(args) -> paths   one --prompt to --output (and --num-images)
#   make_runner(args, device) --prompts mode: load the pipeline on `device` (cuda:LOCAL_RANK or cpu)
#                             and return a diffkern.distributed runner (runner(jobs, generators) ->
#                             PIL images, with accepts / defaults / metadata; see
#                             diffkern/distributed/runners.py). diffkern.distributed then shards,
#                             batches, seeds, writes PNG + manifest; for --cfg-parallel it wraps
#                             the denoisers (unet / base_model / upsampler_model) of runner.pipe, or
#                             of each pipeline in runner.cfg_parallel_pipes (a list) when given.
#   optional, for --prompts files, checked before make_runner loads anything:
#   LINE_KEYS: tuple of str     the per-line keys its runner takes (others refused with the line number)
#   STEPS_AS_TEXT: bool         a line's "steps" may be a string (GLIDE's respacing "ddim50"); else ints only
#   check_line(spec, args)      -> None, or what is wrong with a line's values (said with its line number)
# Raise cli_common.UsageError for anything the user can fix (printed as one line, exit status 2), and
# check everything (options, files, the --output / --outdir folder) BEFORE loading a model: a run that
# fails on its arguments must fail before it spends minutes loading or generating.
FAMILIES = {
    "sd": "diffkern.cli_sd",  # Stable Diffusion 1.x / 2.x, LDM text2im (--checkpoint)
    "glide": "diffkern.cli_glide",  # GLIDE 64 -> 256, CLIP guidance, inpainting (--base)
    "unclip": "diffkern.cli_unclip",  # DALL-E 2 / Karlo, variations, interpolations, text diffs (--karlo)
    "if": "diffkern.cli_if",  # DeepFloyd IF / Imagen cascade 64 -> 256 -> 1024, --stages 1|2|3 (--if-stage1)
    "sdxl": "diffkern.cli_sdxl",  # SDXL base / refiner hand-off / img2img / inpainting (--sdxl)
    "ldm": "diffkern.cli_ldm",  # LDM release: unconditional, 4x SR, class-conditional, inpainting (--ldm)
}


def families():
    """{name: module} of every family in FAMILIES, imported (the modules import nothing heavy)."""
    return {name: importlib.import_module(module) for name, module in FAMILIES.items()}


def _generate_parser():
    fams = families()
    p = argparse.ArgumentParser(prog="diffkern generate",
                                description="Text-to-image on diffkern's kernels with "
                                + ", ".join(f"{m.NAME} ({m.SELECT})" for m in fams.values())
                                + "; one --prompt, or a --prompts file (also under torchrun).")
    p.add_argument("--model", choices=["auto", *fams], default="auto",
                   help="model family (default auto: the one whose " + " / ".join(m.SELECT for m in fams.values())
                   + " is given, else sd)")
    p.add_argument("--prompt", help="the text to draw")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: "
                   "7.5 for sd, 3.0 for GLIDE text-to-image, 5.0 for GLIDE inpainting)")
    p.add_argument("--seed", type=int, default=0, help="seed of a CPU torch.Generator (the same noise on any "
                   "device); with --prompts, image i gets seed + i")
    p.add_argument("--num-images", dest="num_images", type=int, default=None,
                   help="images per prompt (default 1)")
    p.add_argument("--tokenizer", default=None, help="sd: CLIP tokenizer folder, for single-file "
                   "checkpoints; GLIDE: the folder of its GPT-2 BPE files (encoder.json.gz + vocab.bpe.gz)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights and compute dtype (default fp32; GLIDE: fp16 = OpenAI's use_fp16)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--backend", default=None, help="force one diffkern backend for every op that has it "
                   "(e.g. triton, sdpa, cpu, cuda, reference); see `diffkern info`")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", default=None, help="image file to write (default out.png); with "
                   "--num-images N > 1, NAME-0.png ... NAME-{N-1}.png")
    shared = p.add_argument_group("sampling (the families that take them: see each option's family)")
    shared.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    shared.add_argument("--steps", type=int, default=None, help="sampling steps (default 50 for sd)")
    shared.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    shared.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    batch = p.add_argument_group("prompt files and several processes (see diffkern.distributed)")
    batch.add_argument("--prompts", metavar="FILE", help="a .txt (one prompt per line) or .jsonl file (one "
                       "{\"prompt\", \"seed\", \"steps\", \"guidance\", \"negative_prompt\", \"height\", "
                       "\"width\"} object per line) instead of --prompt")
    batch.add_argument("--outdir", metavar="DIR", help="with --prompts: folder for 000000.png ... and "
                       "manifest.jsonl")
    batch.add_argument("--batch-size", type=int, default=None, help="with --prompts: images per pipeline "
                       "call (default 1); with --prompt: the same as --num-images")
    batch.add_argument("--resume", action="store_true", help="with --prompts: skip images that exist")
    batch.add_argument("--cfg-parallel", action="store_true", help="under torchrun with an even number of "
                       "processes: each pair of ranks splits every guided step's two halves")
    owned = {}
    for name, module in fams.items():
        group = p.add_argument_group(f"{module.NAME} (--model {name})")
        module.add_arguments(group)
        owned[name] = tuple(a.dest for a in group._group_actions)
    p.set_defaults(_owned=owned)
    return p


def _family(args):
    """The family name from --model and the options given; refuses the other families' options."""
    fams = families()
    name = args.model
    if name == "auto":
        chosen = [n for n, m in fams.items() if m.selected_by(args)]
        if len(chosen) > 1:
            raise UsageError(" or ".join(f"give {fams[n].SELECT} ({fams[n].NAME})" if i == 0 else
                                         f"{fams[n].SELECT} ({fams[n].NAME})" for i, n in enumerate(chosen))
                             + ", not both")
        name = chosen[0] if chosen else "sd"
    module = fams[name]
    for other, dests in args._owned.items():
        given = [flag(d) for d in dests if other != name and getattr(args, d) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: {fams[other].NAME} options, not {module.NAME}'s"
                             f"{getattr(module, 'OTHER_OPTIONS_HINT', '')}")
    refused = [d for d in ("negative_prompt", "steps", "height", "width")
               if getattr(args, d) is not None and d not in module.SHARED]
    if refused:
        takers = [m.NAME for n, m in fams.items() if set(refused) <= set(m.SHARED)] or ["other families"]
        raise UsageError(f"{', '.join(flag(d) for d in refused)}: {takers[0]} options, not {module.NAME}'s"
                         f"{getattr(module, 'OTHER_OPTIONS_HINT', '')}")
    return name


def _check_values(args):
    """The shared options' values (before any family looks at them, so before anything is loaded)."""
    check_positive(args, "steps", "height", "width", "num_images", "batch_size")
    check_finite(args, "guidance")
    if not -2 ** 63 <= args.seed < 2 ** 63 - 2 ** 32:  # seed + image index must still fit in 64 bits
        raise UsageError(f"--seed: must fit in 64 bits, got {args.seed}")


def _check_modes(args):
    """--prompt/--output (one prompt) or --prompts/--outdir (a file); fills the mode's defaults."""
    _check_values(args)
    if args.prompts is None:
        for dest in ("outdir", "cfg_parallel", "resume"):
            if getattr(args, dest):
                raise UsageError(f"{flag(dest)}: goes with --prompts FILE")
        if args.num_images is None:  # --batch-size was once another name of --num-images
            args.num_images = args.batch_size or 1
        args.output = args.output or "out.png"
        return False
    if args.prompt is not None:
        raise UsageError("--prompt, --prompts: give one of them")
    if args.output is not None:
        raise UsageError("--output: with --prompts the images go to --outdir DIR")
    if args.outdir is None:
        raise UsageError("--prompts: give --outdir DIR for the images and manifest.jsonl")
    args.num_images = 1 if args.num_images is None else args.num_images
    args.batch_size = 1 if args.batch_size is None else args.batch_size
    if args.num_images < 1 or args.batch_size < 1:
        raise UsageError("--num-images and --batch-size must be positive")
    check_writable_dir(args.outdir, "--outdir")
    return True


def generate(args):
    """Run `diffkern generate` with parsed arguments; returns the written paths (or the batch result)."""
    module = families()[_family(args)]
    if _check_modes(args):  # every check of the command line and its files comes before a model is loaded
        from diffkern.cli_batch import generate_batch

        return generate_batch(module, args)
    return module.generate(args)


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
        result = generate(args)
    except UsageError as e:
        print(f"diffkern generate: error: {e}", file=sys.stderr)
        return 2
    return 1 if getattr(result, "failures", None) else 0


if __name__ == "__main__":
    sys.exit(main())
