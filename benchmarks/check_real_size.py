"""Manual check (not in CI: ~4 GB of disk, about a minute on a 2-core CPU): a random-weight Stable
Diffusion 1.5 pipeline at the released sizes (UNet 860M, VAE, CLIP ViT-L text encoder), saved by
diffusers as a pipeline folder, loaded by diffkern.pipelines.load_pipeline, and compared image for image
with diffusers' own pipeline (same seed, DDIM, classifier-free guidance).

    python benchmarks/check_real_size.py [--folder /tmp/sd15-random] [--steps 3] [--size 256]

Uses the tiny CLIP vocabulary of the tests (the real one cannot be downloaded here); the text encoder
itself has the real size and vocabulary.
"""

import argparse
import pathlib
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def make_folder(out):
    import diffusers
    import transformers

    from diffkern.bench.models import SD15_UNET, SD_VAE
    from tests.pipelines import clip_tokenizer

    torch.manual_seed(0)
    text_config = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                              num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408,
                                              hidden_act="quick_gelu", projection_dim=768)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(**SD15_UNET), vae=diffusers.AutoencoderKL(**SD_VAE),
        text_encoder=transformers.CLIPTextModel(text_config), tokenizer=clip_tokenizer(pathlib.Path(tempfile.mkdtemp())),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=None, help="where to write the pipeline folder (default: a temp dir)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args()
    import diffusers

    from diffkern.pipelines import load_pipeline

    folder = args.folder or tempfile.mkdtemp(prefix="sd15-random-")
    if not (pathlib.Path(folder) / "model_index.json").is_file():
        make_folder(folder)
    ours = load_pipeline(folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    # diffkern's SD pipelines patch old scheduler configs as diffusers' pipeline __init__ does (clip_sample False)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, clip_sample=False)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=args.steps, height=args.size, width=args.size, guidance_scale=7.5, output_type="np")
    a = np.asarray(ours("a red fox", generator=torch.Generator().manual_seed(0), **kw).images)
    b = np.asarray(ref("a red fox", generator=torch.Generator().manual_seed(0), **kw).images)
    diff = float(np.abs(a - b).max())
    print(f"{folder}: diffkern vs diffusers, {args.steps} DDIM steps at {args.size}x{args.size}: max |diff| {diff:.3g}")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
